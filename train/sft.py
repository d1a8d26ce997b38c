"""Supervised fine-tuning on conversations, with trl's SFTTrainer.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/sft.py recipe=NAME [key=value ...]
    python train/sft.py recipe=demo_sft dataset=runs/demo/magpie output_dir=runs/demo/sft

Keys are the shared `ScriptArgs` (train/common.py) plus every field of trl's `SFTConfig`.
"""

from __future__ import annotations

import sys

import datasets
from trl import SFTConfig, SFTTrainer

from core.chat import check_messages
from core.config import ConfigError, cli
from core.io import load_rows
from train.common import ScriptArgs, load_model, load_tokenizer, start, train_and_save


def load_conversations(script: ScriptArgs) -> datasets.Dataset:
    """A `datasets.Dataset` with only the `messages` column, every row validated (errors name the row)."""
    rows = load_rows(script.dataset, script.dataset_split)
    if script.max_samples is not None:
        rows = rows[: script.max_samples]
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise ConfigError(f"{script.dataset}: row {i} has no 'messages' column (columns: {sorted(row)})")
        check_messages(row["messages"], f"{script.dataset}: row {i}")
    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])


def build_trainer(script: ScriptArgs, args: SFTConfig) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order (alignment-handbook's shape)."""
    dataset = load_conversations(script)
    tokenizer = load_tokenizer(script, args, assistant_only_loss=args.assistant_only_loss)
    model, lora = load_model(script, args)
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )


@cli
def main(argv: list[str] | None = None) -> None:
    script, args, state = start("sft", argv, SFTConfig)
    trainer = build_trainer(script, args)
    train_and_save(trainer, script, args, state, "SFT")


if __name__ == "__main__":
    main(sys.argv[1:])

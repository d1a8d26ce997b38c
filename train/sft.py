"""Supervised fine-tuning on conversations, with trl's SFTTrainer.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/sft.py recipe=NAME [key=value ...]
    python train/sft.py recipe=demo_sft dataset=runs/demo/magpie output_dir=runs/demo/sft

Keys are the shared `ScriptArgs` (train/common.py) plus every field of trl's `SFTConfig`.
"""

from __future__ import annotations

import random
import sys

import datasets
from trl import SFTConfig, SFTTrainer

from core.chat import check_messages, to_messages
from core.config import ConfigError, cli
from core.io import load_rows
from train.common import ScriptArgs, load_model, load_tokenizer, start, train_and_save


def mixture(script: ScriptArgs) -> list[tuple[str, int, dict]]:
    """(source, row index, row) for `dataset`, or for every source of `dataset_mixture` at its weight: the share
    of its rows to take, sampled with the seed; a weight above 1 repeats the source (oversampling)."""
    if not script.dataset_mixture:
        return [(script.dataset, i, r) for i, r in enumerate(load_rows(script.dataset, script.dataset_split))]
    rng = random.Random(script.mixture_seed)
    out = []
    for source, weight in script.dataset_mixture.items():
        if weight < 0:
            raise ConfigError(f"dataset_mixture.{source}: weight must be >= 0, got {weight}")
        rows = list(enumerate(load_rows(source, script.dataset_split)))
        full, rest = divmod(round(weight * len(rows)), len(rows)) if rows else (0, 0)
        picked = rows * full + rng.sample(rows, rest)
        out += [(source, i, r) for i, r in picked]
    rng.shuffle(out)
    return out


def load_conversations(script: ScriptArgs) -> datasets.Dataset:
    """A `datasets.Dataset` with only the `messages` column. Every row is validated: a bad one fails naming its
    source and index, or with `drop_invalid=true` is dropped and counted. ShareGPT-style `conversations`
    (Magpie's own releases use them) are converted."""
    rows = mixture(script)
    if script.max_samples is not None:
        rows = rows[: script.max_samples]
    kept, dropped = [], 0
    for source, i, row in rows:
        where = f"{source}: row {i}"
        try:
            messages = to_messages(row, where)  # messages, ShareGPT conversations, instruction/response, ...
            check_messages(messages, where)
        except ConfigError:
            if not script.drop_invalid:
                raise
            dropped += 1
            continue
        kept.append({"messages": messages})
    if dropped:
        print(f"dropped {dropped} invalid rows of {len(rows)} (drop_invalid=true)")
    return datasets.Dataset.from_list(kept)


def build_trainer(script: ScriptArgs, args: SFTConfig) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order (alignment-handbook's shape)."""
    dataset = load_conversations(script)
    tokenizer = load_tokenizer(script, args, assistant_only_loss=args.assistant_only_loss)
    model, lora = load_model(script, args, tokenizer)
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

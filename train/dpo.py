"""Direct preference optimization on (prompt, chosen, rejected) conversations, with trl's DPOTrainer.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/dpo.py recipe=NAME [key=value ...]
    python train/dpo.py recipe=demo_dpo dataset=runs/demo/pairs output_dir=runs/demo/dpo

Keys are the shared `ScriptArgs` (train/common.py) plus every field of trl's `DPOConfig` (beta, loss_type, ...).
Rows are trl's conversational preference format; rows whose `chosen`/`rejected` hold the whole conversation
(UltraFeedback-binarized style) are split into prompt and final assistant turn.
"""

from __future__ import annotations

import sys

import datasets
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt

from core.chat import check_messages
from core.config import ConfigError, cli
from core.data import batch_rows, open_dataset
from train.common import ScriptArgs, load_model, load_tokenizer, start, train_and_save


def normalize_preference(row: dict, where: str) -> dict:
    """{"prompt": [...messages ending with a user turn], "chosen": [assistant], "rejected": [assistant]}."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ConfigError(f"{where}: missing '{key}' (columns: {sorted(row)})")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) and len(chosen) > 1:
        # Whole conversations: trl's rule, the prompt is their longest common prefix (a given `prompt` repeats it)
        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
        if not all(isinstance(r, list) and r and r[0].get("role") == "assistant" for r in (chosen, rejected)):
            raise ConfigError(
                f"{where}: 'chosen' and 'rejected' differ before their replies: they must share the "
                "prompt (every turn up to the last assistant turn)"
            )
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        check_messages([*prompt, *reply], f"{where} ({key})")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preferences(script: ScriptArgs) -> datasets.Dataset:
    """prompt/chosen/rejected as trl reads them, converted and validated in Arrow batches by `datasets.map`."""
    ds = open_dataset(script.dataset, script.dataset_split)
    if script.max_samples is not None:
        ds = ds.select(range(min(script.max_samples, len(ds))))

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {"prompt": [], "chosen": [], "rejected": []}
        for i, raw in zip(indices, batch_rows(batch), strict=True):
            row = normalize_preference(raw, f"{script.dataset}: row {i}")
            for key in out:
                out[key].append(row[key])
        return out

    return ds.map(
        convert, batched=True, with_indices=True, remove_columns=ds.column_names, desc="preferences"
    )


def build_trainer(script: ScriptArgs, args: DPOConfig) -> DPOTrainer:
    """Data, tokenizer, model and trainer; with LoRA the frozen base doubles as the reference model."""
    dataset = load_preferences(script)
    tokenizer = load_tokenizer(script, args)
    model, lora = load_model(script, args, tokenizer)
    return DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )


@cli
def main(argv: list[str] | None = None) -> None:
    script, args, state = start("dpo", argv, ScriptArgs, DPOConfig)
    trainer = build_trainer(script, args)
    train_and_save(trainer, script, args, state, "DPO")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Supervised fine-tuning on conversations, with trl's SFTTrainer.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/sft.py recipe=NAME [key=value ...]
    python train/sft.py recipe=demo_sft dataset=runs/demo/magpie output_dir=runs/demo/sft

Keys are this script's `ScriptArgs` plus every field of trl's `SFTConfig` (learning_rate, num_train_epochs, ...).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from core.chat import check_messages, training_chat_template
from core.config import ConfigError, cli, load_config, prepare_output_dir, resolved
from core.io import atomic_write_text, load_rows
from core.models import resolve_model


@dataclass
class ScriptArgs:
    model_name_or_path: str = "embedded"
    dataset: str = "runs/demo/magpie"  # a local Parquet/JSONL file or directory, or a Hub dataset id
    dataset_split: str = "train"
    max_samples: int | None = None
    peft: Literal["none", "lora", "qlora"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    torch_dtype: str = "auto"  # float32 / bfloat16 / auto (bf16 on GPU, float32 on CPU)
    attn_implementation: str | None = None
    chat_template: str | None = None  # a .jinja file, or the name of one trl ships (llama3, qwen2_5, ...)
    merge_lora: bool = False  # also write a merged full model to output_dir/merged
    overwrite: bool = False


def load_conversations(script: ScriptArgs):
    """A `datasets.Dataset` with only the `messages` column, every row validated (errors name the row)."""
    import datasets

    rows = load_rows(script.dataset, script.dataset_split)
    if script.max_samples is not None:
        rows = rows[: script.max_samples]
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise ConfigError(f"{script.dataset}: row {i} has no 'messages' column (columns: {sorted(row)})")
        check_messages(row["messages"], f"{script.dataset}: row {i}")
    return datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])


def read_chat_template(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text()
    import trl

    bundled = Path(trl.__file__).parent / "chat_templates" / f"{name_or_path}.jinja"
    if bundled.is_file():
        return bundled.read_text()
    names = sorted(p.stem for p in bundled.parent.glob("*.jinja") if not p.stem.endswith("_training"))
    raise ConfigError(
        f"chat_template '{name_or_path}' is neither a file nor one of trl's templates: {', '.join(names)}"
    )


def peft_and_quantization(script: ScriptArgs, dtype: torch.dtype):
    if script.peft == "none":
        return None, None
    from peft import LoraConfig

    targets = script.lora_target_modules
    lora = LoraConfig(
        r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    quant = None
    if script.peft == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # Under ZeRO-3 the 4-bit weights are sharded like any parameter: storage must be the model dtype.
            bnb_4bit_quant_storage=dtype,
        )
    return lora, quant


def build_trainer(script: ScriptArgs, args: SFTConfig) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order (alignment-handbook's shape)."""
    dataset = load_conversations(script)

    model_path = resolve_model(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    if script.chat_template:
        tokenizer.chat_template = read_chat_template(script.chat_template)
    if args.assistant_only_loss:
        template = training_chat_template(tokenizer)
        if template is not None:
            tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if script.torch_dtype == "auto":  # bf16 on GPUs; CPUs train much faster in float32
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        dtype = getattr(torch, script.torch_dtype)
    lora, quant = peft_and_quantization(script, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        attn_implementation=script.attn_implementation,
        quantization_config=quant,
        trust_remote_code=args.trust_remote_code,
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )


@cli
def main(argv: list[str] | None = None) -> None:
    script, args = load_config("sft", argv, ScriptArgs, SFTConfig)
    state = PartialState()
    if state.is_main_process:
        prepare_output_dir(
            args.output_dir, resolved(script, args), may_differ=("overwrite",), overwrite=script.overwrite
        )
    state.wait_for_everyone()
    set_seed(args.seed)

    trainer = build_trainer(script, args)
    last = get_last_checkpoint(args.output_dir)
    if last and state.is_main_process:
        print(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)

    trainer.save_model(args.output_dir)
    if state.is_main_process:
        trainer.processing_class.save_pretrained(args.output_dir)
        if script.merge_lora and script.peft != "none":
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(Path(args.output_dir) / "merged")
            trainer.processing_class.save_pretrained(Path(args.output_dir) / "merged")
        atomic_write_text(
            Path(args.output_dir) / "README.md",
            f"# {Path(args.output_dir).name}\n\nSFT of `{script.model_name_or_path}` on `{script.dataset}` "
            f"({len(trainer.train_dataset)} conversations), peft={script.peft}. Full settings: config.yaml.\n",
        )


if __name__ == "__main__":
    main(sys.argv[1:])

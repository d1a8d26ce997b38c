"""What sft.py and dpo.py share: the script's own keys, tokenizer and model loading (LoRA/QLoRA), the run's
start (config, output directory, seed) and its end (resume, save, merged export, model card)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

from core.chat import end_of_turn_ids, training_chat_template
from core.config import ConfigError, load_config, resolved
from core.data import data_files
from core.io import atomic_file, atomic_write_json, atomic_write_text, digest, follow_umask
from core.models import default_dtype, padded, resolve_model
from core.rundir import prepare_output_dir


@dataclass
class ScriptArgs:
    """The keys sft.py and dpo.py share (sft.py adds its data options in `SFTScriptArgs`)."""

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
    # A base model (Llama-3-8B) never trained the rows of its chat-template tokens (<|start_header_id|>,
    # <|eot_id|>): they are ~zero, and a LoRA-tuned model would never emit <|eot_id|>. Such rows (input and
    # output embeddings) start from the mean of the trained rows instead. Trained rows are left alone.
    init_untrained_template_tokens: bool = True
    # The batch the recipe's paper trained with, in rows per optimizer step. Set, it fixes gradient_accumulation_steps
    # to effective_batch_size / (processes x per_device_train_batch_size), so 4 or 8 GPUs train the same recipe.
    effective_batch_size: int | None = None
    overwrite: bool = False

    def sources(self) -> list[str]:
        """The data sets the run trains on."""
        return [self.dataset]

    def inputs(self) -> tuple[str, ...]:
        """What the run reads (its output directory must not be or hold any of them)."""
        return (self.model_name_or_path, *self.sources())


def start(
    stage: str, argv: list[str] | None, script_class: type[ScriptArgs], config_class: type
) -> tuple[Any, Any, PartialState]:
    """Parse `recipe=NAME key=value ...`, claim the output directory (main process only), seed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        # ZeRO on CPU (tests, CPU clusters): DeepSpeed's CPU accelerator needs the gloo process group before
        # the training config is built, and the config must name gloo too, or accelerate counts one process
        # and DeepSpeed rejects the batch size.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        if not any(a.startswith("ddp_backend=") for a in argv):
            argv.append("ddp_backend=gloo")
    script, args = load_config(stage, argv, script_class, config_class, checks=[settle_batch])
    state = PartialState()
    if state.is_main_process:
        prepare_output_dir(
            args.output_dir,
            resolved(script, args),
            command=f"train/{stage}.py",
            inputs=script.inputs(),
            overwrite=script.overwrite,
        )
        check_same_data(script, Path(args.output_dir))
    state.wait_for_everyone()
    set_seed(args.seed)
    return script, args, state


def settle_batch(script: ScriptArgs, args: Any) -> list[str]:
    """Set gradient_accumulation_steps from effective_batch_size and the number of processes (WORLD_SIZE, which
    accelerate and torchrun set), or say why the two cannot agree. A preflight check: nothing has loaded yet."""
    if script.effective_batch_size is None:
        return []
    world, per_device = int(os.environ.get("WORLD_SIZE", "1")), args.per_device_train_batch_size
    steps, rest = divmod(script.effective_batch_size, world * per_device)
    if rest or not steps:
        return [
            f"effective_batch_size={script.effective_batch_size} is not a multiple of {world} processes x "
            f"per_device_train_batch_size={per_device}: launch with --num_processes dividing it, or change "
            "per_device_train_batch_size"
        ]
    if args.gradient_accumulation_steps not in (1, steps):
        return [
            f"gradient_accumulation_steps={args.gradient_accumulation_steps} with {world} processes x "
            f"per_device_train_batch_size={per_device} is a batch of "
            f"{world * per_device * args.gradient_accumulation_steps}, not effective_batch_size="
            f"{script.effective_batch_size}: leave gradient_accumulation_steps out (it follows from "
            "effective_batch_size), or set effective_batch_size=null"
        ]
    args.gradient_accumulation_steps = steps
    return []


def data_signature(script: ScriptArgs) -> dict[str, Any]:
    """What the training data is, by content: for each local file, a hash of its size and its first and last MB
    (a Parquet footer holds every row group's size and statistics); a Hub data set by its id."""
    signature: dict[str, Any] = {}
    for source in script.sources():
        path = Path(source)
        files = data_files(path, script.dataset_split) if path.is_dir() else [path] if path.is_file() else []
        hashes = []
        for f in files:
            with open(f, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(0)
                head = fh.read(1 << 20)
                fh.seek(max(0, size - (1 << 20)))
                hashes.append(digest([str(size), head, fh.read()]))
        signature[source] = hashes or "hub"
    return signature


def check_same_data(script: ScriptArgs, out: Path) -> None:
    """A run resumes from its checkpoints only on the data it started with: the Trainer resumes by step, so other
    rows under the same path would silently continue the epoch on different data."""
    path = out / ".data_signature.json"  # hidden: bookkeeping, not a result
    signature = data_signature(script)
    if path.is_file() and last_complete_checkpoint(out) and json.loads(path.read_text()) != signature:
        raise ConfigError(
            f"{out}: the training data changed since its checkpoints were written ({', '.join(script.sources())}); "
            "resuming would continue on other rows. Use a new output_dir, or overwrite=true to move this run aside"
        )
    atomic_write_json(path, signature)


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


def load_tokenizer(script: ScriptArgs, args: Any, assistant_only_loss: bool = False) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(script.model_name_or_path), trust_remote_code=args.trust_remote_code
    )
    if script.chat_template:
        tokenizer.chat_template = read_chat_template(script.chat_template)
    if assistant_only_loss:
        template = training_chat_template(tokenizer)
        if template is not None:
            tokenizer.chat_template = template
    return padded(tokenizer)


def template_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the special tokens the chat template writes (role headers, end-of-turn markers)."""
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return sorted({i for i in ids if i in special})


@torch.no_grad()
def init_untrained_rows(model: Any, token_ids: list[int], rel_norm: float = 1e-3) -> list[int]:
    """Set embedding rows of `token_ids` whose norm is ~0 (never trained) to the mean trained row, in the input
    embeddings and, when untied, the output head: the fix Unsloth and others apply to Llama-3 base. (trl's fused
    LM head reads `lm_head.weight` directly, so PEFT's trainable-token rows on the head would not train.)"""
    fixed = []
    embeddings = {
        id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
    }
    for emb in embeddings.values():
        with gathered([emb.weight]):  # under ZeRO-3 each process holds an empty shard until gathered
            weight = emb.weight
            norms = weight.float().norm(dim=-1)
            cutoff = rel_norm * norms.median()
            untrained = [i for i in token_ids if i < weight.shape[0] and norms[i] <= cutoff]
            if untrained:
                trained = norms > cutoff
                weight[untrained] = weight[trained].float().mean(0).to(weight.dtype)
                fixed += untrained
    return sorted(set(fixed))


def gathered(params: list[Any]) -> Any:
    """The full tensors of `params` inside the block, edits kept: under ZeRO-3 (zero3_init_flag) parameters are
    partitioned to empty tensors as they load, and an edit outside this context silently touches nothing. Every
    process computes the same edit; rank 0's is the one re-partitioned."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def peft_and_quantization(script: ScriptArgs, dtype: torch.dtype) -> tuple[Any, Any]:
    """The LoRA config and (QLoRA) the 4-bit quantization config, made by trl's own get_peft_config and
    get_quantization_config from our recipe keys: NF4 with nested quantization, computing in the model's dtype."""
    if script.peft == "none":
        return None, None
    from trl import ModelConfig, get_peft_config, get_quantization_config

    targets = script.lora_target_modules
    dtype_name = str(dtype).removeprefix("torch.")
    model_args = ModelConfig(
        dtype=dtype_name,
        use_peft=True,
        lora_r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        lora_target_modules=targets[0] if targets == ["all-linear"] else targets,
        load_in_4bit=script.peft == "qlora",
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        # Under ZeRO-3 the 4-bit weights are sharded like any parameter: storage must be the model dtype.
        bnb_4bit_quant_storage=dtype_name,
    )
    return get_peft_config(model_args), get_quantization_config(model_args)


def model_dtype(script: ScriptArgs) -> torch.dtype:
    if script.torch_dtype == "auto":  # bf16 on GPUs; CPUs train much faster in float32
        return default_dtype("cuda" if torch.cuda.is_available() else "cpu")
    return getattr(torch, script.torch_dtype)


def load_model(script: ScriptArgs, args: Any, tokenizer: Any) -> tuple[Any, Any]:
    """The model to train and its LoRA config (None for full fine-tuning)."""
    dtype = model_dtype(script)
    lora, quant = peft_and_quantization(script, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(script.model_name_or_path),
        dtype=dtype,
        attn_implementation=script.attn_implementation,
        quantization_config=quant,
        trust_remote_code=args.trust_remote_code,
    )
    # 4-bit weights: the embeddings stay unquantized, but QLoRA users fix the base first
    if script.init_untrained_template_tokens and quant is None:
        fixed = init_untrained_rows(model, template_token_ids(tokenizer))
        if fixed and PartialState().is_main_process:
            print(
                f"initialized untrained embedding rows of template tokens {tokenizer.convert_ids_to_tokens(fixed)}"
            )
        if fixed and lora is not None:
            model.fixed_template_rows = fixed  # to be saved with the adapter: see save_template_rows
    return model, lora


def save_template_rows(model: Any, out: Path, is_main: bool) -> None:
    """Add the embedding layers to the adapter in `out` when load_model fixed template rows in them. An adapter
    holds only LoRA weights and its base loads from the Hub untouched: without the fixed rows a LoRA-tuned model
    would never emit <|eot_id|>. peft loads such layers back with the adapter (its `save_embedding_layers`
    layout), but the Trainer cannot be asked to save them, and under ZeRO-3 it leaves frozen weights out of its
    gathered state dict; so they are gathered here, on every process, and written by the main one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if not getattr(base, "fixed_template_rows", None):
        return
    names = {id(p): n for n, p in model.named_parameters()}
    params = list(
        {
            id(m.weight): m.weight
            for m in (base.get_input_embeddings(), base.get_output_embeddings())
            if m is not None
        }.values()
    )
    with gathered(params):
        layers = {names[id(p)]: p.detach().cpu().clone().contiguous() for p in params} if is_main else {}
    if is_main:
        from safetensors.torch import load_file, save_file

        path = out / "adapter_model.safetensors"
        with atomic_file(path) as tmp:
            save_file({**load_file(path), **layers}, tmp, metadata={"format": "pt"})


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Make the chat template's end-of-turn token an eos of the saved model's generation_config, as Llama-3-Instruct's
    own lists <|eot_id|> beside <|end_of_text|>: transformers, vLLM and `vllm serve` then stop every answer there."""
    config = model.generation_config if hasattr(model, "generation_config") else None
    ends = end_of_turn_ids(tokenizer)
    if config is None or not ends:
        return
    current = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = [current] if isinstance(current, int) else list(current or [])
    config.eos_token_id = eos + [i for i in ends if i not in eos]


def merge_adapter(script: ScriptArgs, args: Any, out: Path, tokenizer: Any) -> None:
    """out/merged: the base model, unquantized in the training dtype, plus the adapter saved in `out` (and the
    template rows saved with it), as alignment-handbook merges. Loaded again from disk rather than merged in memory:
    under ZeRO-3 the training model's weights are empty shards, and a QLoRA model's are 4-bit."""
    from peft import PeftModel
    from transformers.integrations import deepspeed as hf_deepspeed

    # This process alone loads the base: under ZeRO-3, transformers would partition it across all of them and wait
    # for the others forever. The config is set again afterwards for whatever follows.
    zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        base = AutoModelForCausalLM.from_pretrained(
            resolve_model(script.model_name_or_path),
            dtype=model_dtype(script),
            trust_remote_code=args.trust_remote_code,
        )
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
        stop_at_end_of_turn(merged, tokenizer)
        merged.save_pretrained(out / "merged")
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N that was written to the end (the Trainer writes trainer_state.json last).

    A run killed while saving leaves a partial checkpoint that transformers' get_last_checkpoint would pick
    and fail on; such leftovers are removed here (they hold nothing a resume could use)."""
    out = Path(output_dir)
    checkpoints = sorted(
        out.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    for ckpt in reversed(checkpoints):
        if (ckpt / "trainer_state.json").is_file():
            return str(ckpt)
        if PartialState().is_main_process:
            print(f"removing incomplete {ckpt} (a killed save)")
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def train_and_save(trainer: Any, script: ScriptArgs, args: Any, state: PartialState, what: str) -> None:
    """Resume from the last complete checkpoint if there is one, train, save (adapter or full model), card."""
    last = last_complete_checkpoint(args.output_dir)
    state.wait_for_everyone()
    if last and state.is_main_process:
        print(f"resuming from {last}", flush=True)
    trainer.add_callback(SharedCheckpoints())
    stop_at_end_of_turn(trainer.model, trainer.processing_class)
    trainer.train(resume_from_checkpoint=last)
    # every process saves: under ZeRO-3 the weights are gathered from all of them
    trainer.save_model(args.output_dir)
    save_template_rows(trainer.model, Path(args.output_dir), state.is_main_process)
    if state.is_main_process:
        out = Path(args.output_dir)
        trainer.processing_class.save_pretrained(out)
        if script.merge_lora and script.peft != "none":
            merge_adapter(script, args, out, trainer.processing_class)
            trainer.processing_class.save_pretrained(out / "merged")
        atomic_write_text(
            out / "README.md",
            f"# {out.name}\n\n{what} of `{script.model_name_or_path}` on `{script.dataset}` "
            f"({len(trainer.train_dataset)} rows), peft={script.peft}. Full settings: config.yaml.\n",
        )
        follow_umask(out)
    # No process may exit while another still writes: a rank leaving with its process group alive aborts in
    # gloo's thread teardown ("terminate called without an active exception", SIGABRT), failing the launch.
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class SharedCheckpoints(TrainerCallback):
    """Each checkpoint readable by whoever the umask lets read the run (safetensors writes 0600 files)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            follow_umask(args.output_dir)

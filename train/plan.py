"""Will a training recipe fit? Per-GPU memory for weights, gradients, optimizer states and activations.

    python -m train.plan recipe=magpie_pro_300k accelerate_config=deepspeed_zero3 gpus=8 gpu_mem_gb=80 [peft=qlora ...]

Counts come from the model's config (parameters per layer) and the recipe (peft, lora_r, batch size,
max_length, bf16, activation checkpointing); sharding from the accelerate config (DDP, ZeRO-2, ZeRO-3,
offload, FSDP). The usual rules of thumb: mixed-precision AdamW keeps bf16 weights and gradients plus fp32
master weights and two moments (2 + 2 + 12 bytes per trainable parameter); activations per layer and token
are ~34 x hidden bytes with flash attention (Korthikanti et al., 2022), ~2 x hidden with checkpointing plus
one layer recomputed, and LoRA adds each adapted layer's dropped-out input; logits are batch x length x vocab
in fp32. benchmarks/plan_check.py compares the estimate with peaks measured on CPU.

The optimizer (`optim`, transformers' names) sets the optimizer-state and gradient terms (`optimizer_memory`):
AdamW keeps two fp32 moments (8 bytes per trainable parameter), 8-bit AdamW two 8-bit ones (2 bytes, plus a
scale per 256-value block; the Trainer keeps the embeddings' in 32 bits), Adafactor and AdaLomo a factored
second moment (rows + columns of each matrix); GaLore and APOLLO keep Adam's moments in a rank-r projection of each targeted matrix plus the projection; LOMO and
AdaLomo apply each gradient as backward produces it, and so do the `*_layerwise` variants, so only one tensor's
gradient is held at a time. benchmarks/train_memory.py measures these on CPU beside the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.config import ConfigError, build, cli, coerce, parse_argv
from core.recipes import merge_recipe

GB = 1024**3


@dataclass
class PlanConfig:
    recipe: str = "demo_sft"
    stage: str = "sft"
    accelerate_config: str = "cpu"
    gpus: int = 1
    gpu_mem_gb: float = 80.0
    overhead_gb: float = 1.5  # CUDA context, allocator fragmentation, buffers
    model: str | None = None  # override the recipe's model (a local path or Hub id whose config is read)


def count_params(cfg: Any) -> dict[str, int]:
    """Parameters of a Llama-style decoder from its config."""
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * h * i
    embed = v * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    per_layer = attn + mlp + 2 * h
    return {
        "total": embed + layers * per_layer + h,
        "embeddings": embed,
        "per_layer": per_layer,
        "linear_per_layer": attn + mlp,
        "layers": layers,
        "hidden": h,
        "intermediate": i,
        "vocab": v,
        "kv_dim": kv * head_dim,
        "q_dim": heads * head_dim,
    }


def matrices(p: dict[str, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """The model's weight matrices as (rows, columns): the blocks' linear layers, the embeddings (and untied head),
    and the count of the remaining (vector) parameters."""
    h, i, q, kv = p["hidden"], p["intermediate"], p["q_dim"], p["kv_dim"]
    per_layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    linear = per_layer * p["layers"]
    embeddings = [(p["vocab"], h)] * (p["embeddings"] // (p["vocab"] * h))
    vectors = p["total"] - sum(a * b for a, b in linear + embeddings)
    return linear, embeddings, vectors


ADAM_LIKE = ("adamw", "adam", "lion", "rmsprop", "sgd", "ademamix")


def optimizer_memory(
    p: dict[str, int], trainable: int, recipe: dict[str, Any], full: bool, grad_bytes: int
) -> tuple[float, float]:
    """(optimizer-state bytes, gradient bytes) on one process before sharding, for the recipe's `optim`.

    Full fine-tuning counts per matrix (factored and low-rank states depend on shapes); LoRA's small matrices are
    counted per parameter. GaLore/APOLLO target the blocks' linear layers (their usual `optim_target_modules`);
    everything else they update with plain AdamW."""
    name = str(recipe.get("optim") or "adamw_torch").lower()
    args = dict(
        kv.split("=", 1) for kv in str(recipe.get("optim_args") or "").replace(" ", "").split(",") if kv
    )
    rank = int(args.get("rank", 128))
    grads = float(trainable * grad_bytes)
    fused = "lomo" in name or name.endswith("layerwise")  # each gradient is applied and freed during backward
    linear, embeddings, vectors = matrices(p) if full else ([], [], trainable)
    largest = max((a * b for a, b in linear + embeddings), default=trainable)
    if fused:
        grads = float(min(largest, trainable) * grad_bytes)

    def factored(shapes: list[tuple[int, int]]) -> float:
        return sum(4.0 * (a + b) for a, b in shapes)

    if name == "lomo":
        return 0.0, grads
    if name in ("adafactor", "adalomo"):  # second moment factored into row and column sums; no first moment
        if not full:
            return 4.0 * trainable, grads
        return factored(linear + embeddings) + 4.0 * vectors, grads
    if "galore" in name or "apollo" in name:
        if not full or not recipe.get("optim_target_modules"):
            return 8.0 * trainable, grads
        projected = sum(
            2 * 4.0 * max(a, b) * min(rank, a, b) + 4.0 * min(a, b) * min(rank, a, b) for a, b in linear
        )
        rest = 8.0 * (sum(a * b for a, b in embeddings) + vectors)
        if "8bit" in name:
            projected, rest = projected / 4, rest / 4
        return projected + rest, grads
    if not any(k in name for k in ADAM_LIKE):
        raise ConfigError(
            f"optim={name}: the planner does not know its memory; it knows {', '.join(PLANNED_OPTIMIZERS)}"
        )
    if "8bit" not in name:
        return 8.0 * trainable, grads
    # bitsandbytes: one byte per moment plus an fp32 scale per 256-value block; the Trainer keeps the embeddings'
    # states in 32 bits (as bitsandbytes advises for stability)
    eight_bit = 2 * (1 + 4 / 256)
    embedded = p["vocab"] * p["hidden"] if full else 0  # nn.Embedding only: an untied head is a Linear
    return eight_bit * (trainable - embedded) + 8.0 * embedded, grads


PLANNED_OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit",
    "adafactor", "lomo", "adalomo", "galore_adamw", "galore_adamw_8bit", "galore_adamw_layerwise", "apollo_adamw",
    "apollo_adamw_layerwise",
)  # fmt: skip


def lora_params(p: dict[str, int], r: int) -> int:
    """LoRA on every linear layer of every block (q, k, v, o, gate, up, down): r x (in + out) each."""
    h, i, q, kv = p["hidden"], p["intermediate"], p["q_dim"], p["kv_dim"]
    per_layer = r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)
    return p["layers"] * per_layer


def sharding(accelerate_yaml: dict[str, Any]) -> dict[str, Any]:
    """What each process holds: the fraction of weights, gradients and optimizer states, and what is offloaded."""
    kind = str(accelerate_yaml.get("distributed_type", "NO"))
    if kind == "DEEPSPEED":
        ds = accelerate_yaml.get("deepspeed_config", {})
        stage = int(ds.get("zero_stage", 0))
        return {
            "name": f"ZeRO-{stage}",
            "weights": stage >= 3,
            "grads": stage >= 2,
            "optim": stage >= 1,
            "offload_optim": ds.get("offload_optimizer_device", "none") not in ("none", None),
            "offload_params": ds.get("offload_param_device", "none") not in ("none", None),
        }
    if kind == "FSDP":
        fsdp = accelerate_yaml.get("fsdp_config", {})
        return {
            "name": "FSDP full shard",
            "weights": True,
            "grads": True,
            "optim": True,
            "offload_optim": bool(fsdp.get("fsdp_offload_params")),
            "offload_params": bool(fsdp.get("fsdp_offload_params")),
        }
    return {
        "name": "DDP" if kind == "MULTI_GPU" else "single process",
        "weights": False,
        "grads": False,
        "optim": False,
        "offload_optim": False,
        "offload_params": False,
    }


def estimate(
    p: dict[str, int], recipe: dict[str, Any], shard: dict[str, Any], gpus: int, reference: bool = False
) -> dict[str, float]:
    """Bytes per GPU by component; `reference`: a frozen copy of the model is held too (DPO's family, KTO)."""
    peft = recipe.get("peft", "lora")
    bf16 = bool(recipe.get("bf16", False)) or recipe.get("torch_dtype") == "bfloat16"
    wbytes = 2 if bf16 else 4
    trainable = p["total"] if peft == "none" else lora_params(p, int(recipe.get("lora_r", 16)))
    if peft == "qlora":  # 4-bit linear weights (+ double-quantized scales), embeddings kept in 16 bits
        weights = (
            p["layers"] * p["linear_per_layer"] * 0.5 * 1.03
            + (p["total"] - p["layers"] * p["linear_per_layer"]) * 2
        )
    else:
        weights = p["total"] * wbytes
    if reference and peft == "none":  # with LoRA the base behind the adapter is the reference
        weights *= 2
    adapter = 0 if peft == "none" else trainable * 4  # LoRA weights stay fp32 (PEFT's default autocast)
    optim, grads = optimizer_memory(p, trainable, recipe, peft == "none", wbytes if peft == "none" else 4)
    if bf16 and peft == "none" and "lomo" not in str(recipe.get("optim")):
        # mixed precision: an fp32 master copy of the bf16 weights (LOMO updates them in place)
        optim += 4 * trainable
    n = max(gpus, 1)
    if shard["weights"] and peft == "none":
        weights /= n
    if shard["offload_params"]:
        weights = 0.0
    if shard["grads"]:
        grads /= n
    if shard["optim"]:
        optim /= n
    if shard["offload_optim"]:
        optim = 0.0
    tokens = int(recipe.get("per_device_train_batch_size", 1)) * int(recipe.get("max_length", 1024))
    h, layers, abytes = p["hidden"], p["layers"], (2 if bf16 else 4)
    per_layer_full = 17 * tokens * h * abytes  # 34 x h bytes/token in 16 bits, flash attention (no s^2 term)
    checkpointing = recipe.get("activation_checkpointing", recipe.get("gradient_checkpointing", False))
    activations = (
        layers * 2 * tokens * h * abytes / 2 + per_layer_full if checkpointing else layers * per_layer_full
    )
    if peft in ("lora", "qlora"):  # each adapted linear saves its dropped-out input (and mask) for backward
        # inputs of q, k, v, o, gate, up (hidden) and down (intermediate)
        h_in = p["hidden"] * 6 + p["intermediate"]
        lora_acts = tokens * h_in * (abytes + 1)
        activations += lora_acts if checkpointing else layers * lora_acts
    logits = tokens * p["vocab"] * 4
    return {
        "weights": weights + adapter,
        "gradients": grads,
        "optimizer": optim,
        "activations": activations,
        "logits": logits,
        "trainable_params": trainable,
        "total_params": p["total"],
    }


# The recipe keys the planner reads, typed as ScriptArgs and trl's SFTConfig/DPOConfig type them.
RECIPE_KEYS_READ = {
    "peft": str,
    "bf16": bool,
    "torch_dtype": str,
    "lora_r": int,
    "per_device_train_batch_size": int,
    "max_length": int,
    "activation_checkpointing": bool,
    "gradient_checkpointing": bool,
    "model_name_or_path": str,
    "optim": str,
    "optim_args": str,
    "method": str,
    "precompute_ref_log_probs": bool,
}

SHIPPED_CONFIGS = Path(__file__).with_name("model_configs.json")


def model_config(name: str) -> Any:
    """The model's config: the copy shipped for the recipes' models (published configs do not change, and a
    sweep's dry run plans many stages without a round trip to the Hub each), else the Hub or a checkpoint."""
    from transformers import AutoConfig, LlamaConfig

    shipped = {k: v for k, v in json.loads(SHIPPED_CONFIGS.read_text()).items() if not k.startswith("_")}
    if name in shipped:
        return LlamaConfig(**{k: v for k, v in shipped[name].items() if k != "model_type"})
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model '{name}': its config could not be read ({cause}). Offline the planner knows "
            f"{', '.join(sorted(shipped))}; pass model=ONE_OF_THEM or a local checkpoint directory"
        ) from None


def needs_reference(stage: str, recipe: dict[str, Any]) -> bool:
    """Whether training holds a reference model: the preference methods that have one, unless its log-probabilities
    are computed before training."""
    if stage != "dpo" or recipe.get("precompute_ref_log_probs"):
        return False
    from train.dpo import method_settings

    return method_settings({"method": recipe.get("method", "dpo")})[
        0
    ].reference  # an unknown method: one line


def plan(cfg: PlanConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`overrides` change recipe keys, as on a training command line (peft=qlora, max_length=4096, ...)."""
    from core.models import resolve_model

    recipe = merge_recipe(cfg.stage, cfg.recipe, overrides or {})
    for key, hint in RECIPE_KEYS_READ.items():  # what training would refuse (`bf16=no`) is not misread here
        if recipe.get(key) is not None:
            recipe[key] = coerce(recipe[key], hint, key)
    acc_path = Path(__file__).resolve().parents[1] / "accelerate_configs" / f"{cfg.accelerate_config}.yaml"
    if not acc_path.is_file():
        raise ConfigError(f"accelerate_config '{cfg.accelerate_config}': no {acc_path}")
    shard = sharding(yaml.safe_load(acc_path.read_text()))
    p = count_params(model_config(resolve_model(cfg.model or recipe.get("model_name_or_path", "embedded"))))
    est = estimate(p, recipe, shard, cfg.gpus, reference=needs_reference(cfg.stage, recipe))
    parts = {k: est[k] / GB for k in ("weights", "gradients", "optimizer", "activations", "logits")}
    total = sum(parts.values()) + cfg.overhead_gb
    return {
        "recipe": cfg.recipe,
        "model": recipe.get("model_name_or_path"),
        "sharding": shard["name"],
        "gpus": cfg.gpus,
        "params_billion": round(p["total"] / 1e9, 3),
        "trainable_params_million": round(est["trainable_params"] / 1e6, 2),
        "per_gpu_gb": {k: round(v, 2) for k, v in parts.items()},
        "overhead_gb": cfg.overhead_gb,
        "total_gb": round(total, 2),
        "gpu_mem_gb": cfg.gpu_mem_gb,
        "fits": total <= cfg.gpu_mem_gb,
        "optim": recipe.get("optim") or "adamw_torch",
    }


@cli
def main(argv: list[str] | None = None) -> None:
    import sys

    # Parsed as every command parses `key=value` (save_strategy=no stays "no"); the planner's own keys build
    # PlanConfig, the others override the recipe's keys.
    recipe, overrides = parse_argv(sys.argv[1:] if argv is None else argv)
    raw = {k: overrides.pop(k) for k in list(overrides) if k in PlanConfig.__dataclass_fields__}
    if recipe is not None:
        raw["recipe"] = recipe
    (cfg,) = build(raw, PlanConfig)
    result = plan(cfg, overrides)
    print(json.dumps(result, indent=2))
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(
        f"\n{cfg.recipe} on {cfg.gpus} x {cfg.gpu_mem_gb:g} GB with {result['sharding']}: ~{result['total_gb']} GB per GPU, {verdict}"
    )


if __name__ == "__main__":
    main()

"""Will a training recipe fit? Per-GPU memory for weights, gradients, optimizer states and activations.

    python -m train.plan recipe=magpie_pro_300k accelerate_config=deepspeed_zero3 gpus=8 gpu_mem_gb=80 [peft=qlora ...]

Counts come from the model's config (parameters per layer) and the recipe (peft, lora_r, batch size,
max_length, bf16, activation checkpointing); sharding from the accelerate config (DDP, ZeRO-2, ZeRO-3,
offload, FSDP). The usual rules of thumb: mixed-precision AdamW keeps bf16 weights and gradients plus fp32
master weights and two moments (2 + 2 + 12 bytes per trainable parameter); activations per layer and token
are ~34 x hidden bytes with flash attention (Korthikanti et al., 2022), ~2 x hidden with checkpointing plus
one layer recomputed, and LoRA adds each adapted layer's dropped-out input; logits are batch x length x vocab
in fp32. benchmarks/plan_check.py compares the estimate with peaks measured on CPU.
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


def estimate(p: dict[str, int], recipe: dict[str, Any], shard: dict[str, Any], gpus: int) -> dict[str, float]:
    """Bytes per GPU by component."""
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
    adapter = 0 if peft == "none" else trainable * 4  # LoRA weights stay fp32 (PEFT's default autocast)
    grads = trainable * (wbytes if peft == "none" else 4)
    optim = trainable * (12 if bf16 and peft == "none" else 8)  # fp32 master + 2 moments, or just 2 moments
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
    est = estimate(p, recipe, shard, cfg.gpus)
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

"""Preference optimization on (prompt, chosen, rejected) conversations: DPO and its family behind one switch.

    accelerate launch [--config_file accelerate_configs/X.yaml] train/dpo.py recipe=NAME [method=M] [key=value ...]
    python train/dpo.py recipe=demo_dpo method=simpo dataset=runs/demo/pairs output_dir=runs/demo/simpo

`method` picks trl's trainer and loss (METHODS below); the other keys are the shared `ScriptArgs` (train/common.py)
plus every field of that trainer's config (DPOConfig, CPOConfig, ORPOConfig, KTOConfig). A key that belongs to
another method's config, or that the chosen loss ignores, fails naming the methods it applies to.
Rows are trl's conversational preference format; rows whose `chosen`/`rejected` hold the whole conversation
(UltraFeedback-binarized style) are split into prompt and final assistant turn. KTO also reads unpaired rows
(`prompt`, `completion`, `label`: thumbs up or down) and otherwise unpairs the pairs itself.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
from trl.data_utils import extract_prompt

from core.chat import check_messages
from core.config import ConfigError, cli, parse_argv
from core.data import batch_rows, open_dataset
from core.recipes import merge_recipe
from train.common import ScriptArgs, load_model, load_tokenizer, start, train_and_save

# SimPO, SLiC and ORPO run on trl.experimental's CPO and ORPO trainers, chosen knowingly (README, Training)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@dataclass(frozen=True)
class Method:
    """A preference method: trl's trainer and config for it, the settings that make it this method (`fixed`) and
    the defaults it starts from (`defaults`, which a recipe may change)."""

    trainer: str  # "module:Class"
    config: str
    paper: str
    # needs the reference model (with LoRA, the frozen base; else a second copy or precomputed log-probabilities)
    reference: bool
    unpaired: bool = False  # trains on single completions labelled good or bad, not on pairs
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def trainer_class(self) -> type:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)


DPO, CPO = (
    ("trl:DPOTrainer", "trl:DPOConfig"),
    ("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig"),
)
METHODS = {
    # DPOTrainer's losses. method=dpo with an explicit loss_type passes any of trl's (a list combines them: MPO).
    "dpo": Method(*DPO, "Rafailov et al. 2023, arXiv:2305.18290", True, defaults={"loss_type": ["sigmoid"]}),
    "ipo": Method(*DPO, "Azar et al. 2023, arXiv:2310.12036", True, fixed={"loss_type": ["ipo"]}),
    "robust": Method(
        *DPO,
        "Chowdhury et al. 2024, arXiv:2403.00409",
        True,
        fixed={"loss_type": ["robust"]},
        defaults={"label_smoothing": 0.1},
    ),
    "apo_zero": Method(
        *DPO, "D'Oosterlinck et al. 2024, arXiv:2408.06266", True, fixed={"loss_type": ["apo_zero"]}
    ),
    # Reference-free, with trl's CPO trainer. SLiC-HF as its paper (and SimPO's baseline) states it: a hinge on the
    # policy's own log-probabilities with margin delta = 1/beta, plus lambda (cpo_alpha) times the NLL of the chosen
    # reply; trl's DPO `hinge` would instead put the hinge on log-ratios to a reference model.
    "slic": Method(
        *CPO,
        "Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425",
        False,
        fixed={"loss_type": "hinge"},
        defaults={"beta": 1.0, "cpo_alpha": 0.1},
    ),
    "simpo": Method(
        *CPO,
        "Meng et al. 2024, arXiv:2405.14734",
        False,
        fixed={"loss_type": "simpo"},
        defaults={"cpo_alpha": 0.0},
    ),
    "orpo": Method(
        "trl.experimental.orpo:ORPOTrainer",
        "trl.experimental.orpo:ORPOConfig",
        "Hong et al. 2024, arXiv:2403.07691",
        False,
    ),
    # KTO estimates its KL term from the other completions of the same batch, in a fixed order: trl requires
    # sequential sampling (load_preferences shuffles the rows once, seeded, instead) and more than one row per device.
    "kto": Method(
        "trl:KTOTrainer",
        "trl:KTOConfig",
        "Ethayarajh et al. 2024, arXiv:2402.01306",
        True,
        unpaired=True,
        fixed={"loss_type": "kto", "train_sampling_strategy": "sequential"},
    ),
}
# Keys of a shared config that only some of its methods read: set for another, they would be silently ignored.
ONLY_FOR = {
    "label_smoothing": ("dpo", "robust", "simpo"),  # cDPO / robust DPO's flip rate; conservative SimPO
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("slic", "simpo"),
    "alpha": ("simpo",),  # AlphaPO's reward shape, a SimPO variant
    "loss_weights": ("dpo",),  # combining several of trl's losses: method=dpo with a loss_type list
    "f_divergence_type": ("dpo", "ipo", "robust"),
    "discopop_tau": ("dpo",),
}


@dataclass
class PreferenceArgs(ScriptArgs):
    method: str = "dpo"  # a key of train.dpo.METHODS: dpo, ipo, robust, apo_zero, slic, simpo, orpo, kto


def method_settings(raw: dict[str, Any]) -> tuple[Method, dict[str, Any]]:
    """The method a merged recipe asks for, and the recipe with the method's settings applied; a key the method does
    not read fails naming the methods that do."""
    name = raw.get("method", "dpo")
    if name not in METHODS:
        raise ConfigError(f"method '{name}': choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    own = {f.name for f in fields(method.config_class())} | {f.name for f in fields(PreferenceArgs)}
    for key in raw:
        if key in own and name in ONLY_FOR.get(key, (name,)):
            continue
        readers = [m for m, other in METHODS.items() if key in {f.name for f in fields(other.config_class())}]
        readers = [m for m in readers if m in ONLY_FOR.get(key, readers)]
        if readers:
            raise ConfigError(
                f"{key}: method={name} does not use it (it is a setting of method {', '.join(readers)}); "
                "remove it or choose that method"
            )
    for key, value in method.fixed.items():
        if key in raw and _listed(raw[key]) != _listed(value):
            raise ConfigError(f"{key}={raw[key]}: method={name} is {key}={value}; leave {key} out")
    batch = raw.get("per_device_train_batch_size")
    if method.unpaired and isinstance(batch, int) and batch < 2:
        raise ConfigError(
            f"per_device_train_batch_size={batch}: method={name} estimates its KL term from the other rows of a "
            "batch, so it needs at least 2 per device"
        )
    if raw.get("padding_free") and method.config == DPO[1]:
        raise ConfigError(
            "padding_free=true: trl's DPOTrainer ignores it at present (it warns and pads); leave it out"
        )
    return method, {**method.defaults, **raw, **method.fixed}


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def schemas(raw: dict[str, Any]) -> tuple[type, type]:
    """The dataclasses a recipe builds: ours and the chosen method's trl config (experiments.commands reads this)."""
    return PreferenceArgs, method_settings(raw)[0].config_class()


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
    prompt = _prompt(prompt, where)
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        check_messages([*prompt, *reply], f"{where} ({key})")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalize_unpaired(row: dict, where: str) -> dict:
    """{"prompt": [...], "completion": [assistant], "label": bool}: trl's unpaired preference format."""
    if not isinstance(row.get("label"), bool):
        raise ConfigError(
            f"{where}: 'label' must be true (a good reply) or false (a bad one), got {row.get('label')!r}"
        )
    prompt, completion = _prompt(row.get("prompt"), where), row.get("completion")
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    check_messages([*prompt, *(completion or [])], f"{where} (completion)")
    return {"prompt": prompt, "completion": completion, "label": row["label"]}


def _prompt(prompt: Any, where: str) -> list[dict]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    return prompt


def load_preferences(script: PreferenceArgs, seed: int = 0) -> datasets.Dataset:
    """The rows as the method's trainer reads them, converted and validated in Arrow batches by `datasets.map`: pairs
    (prompt/chosen/rejected), or for KTO unpaired rows, each pair giving its chosen reply (label true) and then its
    rejected one (false), so that every batch of KTO's fixed order holds both kinds."""
    method = METHODS[script.method]
    ds = open_dataset(script.dataset, script.dataset_split)
    if script.max_samples is not None:
        ds = ds.select(range(min(script.max_samples, len(ds))))
    unpaired_rows = "label" in ds.column_names and "completion" in ds.column_names
    if unpaired_rows and not method.unpaired:
        raise ConfigError(
            f"{script.dataset}: rows hold a single labelled 'completion'; method={script.method} needs pairs "
            "('chosen' and 'rejected'): use method=kto"
        )
    keys = ("prompt", "completion", "label") if method.unpaired else ("prompt", "chosen", "rejected")

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in keys}
        for i, raw in zip(indices, batch_rows(batch), strict=True):
            where = f"{script.dataset}: row {i}"
            if unpaired_rows:
                rows = [normalize_unpaired(raw, where)]
            else:
                pair = normalize_preference(raw, where)
                rows = [pair] if not method.unpaired else [
                    {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
                ]  # fmt: skip
            for row in rows:
                for key in keys:
                    out[key].append(row[key])
        return out

    if method.unpaired:  # trl samples KTO's rows in order: shuffle them once here
        ds = ds.shuffle(seed=seed)
    return ds.map(
        convert, batched=True, with_indices=True, remove_columns=ds.column_names, desc="preferences"
    )


def build_trainer(script: PreferenceArgs, args: Any) -> Any:
    """Data, tokenizer, model and the method's trainer; with LoRA the frozen base doubles as the reference model."""
    method = METHODS[script.method]
    dataset = load_preferences(script, args.seed)
    tokenizer = load_tokenizer(script, args)
    model, lora = load_model(script, args, tokenizer)
    return method.trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )


def config_from(argv: list[str]) -> tuple[list[str], type]:
    """argv with the method's settings added, and its trl config class."""
    recipe, overrides = parse_argv([a for a in argv if "=" in a])  # --help and --preflight are load_config's
    raw = merge_recipe("dpo", recipe, overrides)
    method, settings = method_settings(raw)
    added = [f"{key}={value}" for key, value in settings.items() if key not in raw or raw[key] != value]
    return [*argv, *added], method.config_class()


@cli
def main(argv: list[str] | None = None) -> None:
    argv, config_class = config_from(sys.argv[1:] if argv is None else argv)
    script, args, state = start("dpo", argv, PreferenceArgs, config_class)
    trainer = build_trainer(script, args)
    train_and_save(trainer, script, args, state, f"Preference optimization (method={script.method})")


if __name__ == "__main__":
    main(sys.argv[1:])

"""What a resolved config needs from the machine, checked before any weights load.

Every command runs `check` when its config loads (core.config.load_config), and `python -m <command> ...
--preflight` runs nothing else. A recipe names packages indirectly (an attention implementation, a `report_to`
integration, an optimizer, an engine backend); each is looked up here, so a missing one fails in one line naming
the key and the fix instead of raising from deep inside transformers after an 8B model has loaded.
tests/test_recipes.py runs the package check (`problems`) over every shipped recipe against the environment the
README's GPU setup resolves to.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_SETUP = "make setup-gpu (the gpu and vllm extras)"


@dataclass(frozen=True)
class Need:
    """`key` set to `value` needs one of the distributions `dists` installed; `fix` says how."""

    key: str
    value: Any
    dists: tuple[str, ...]
    fix: str

    def message(self) -> str:
        wanted = " or ".join(self.dists)
        return f"{self.key}={self.value} needs the package {wanted}, which is not installed: {self.fix}"


# report_to names (transformers' integrations) -> the distribution each imports
REPORTERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet-ml",),
    "neptune": ("neptune",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "trackio": ("trackio",),
    "swanlab": ("swanlab",),
}
# optim name patterns (transformers' OptimizerNames) -> the distribution each needs
OPTIMIZERS = [
    (r"bnb|8bit|paged|ademamix|lion_8bit", ("bitsandbytes",)),
    (r"galore", ("galore-torch",)),
    (r"apollo", ("apollo-torch",)),
    (r"lomo", ("lomo-optim",)),
    (r"schedule_free", ("schedulefree",)),
    (r"torchao", ("torchao",)),
    (r"grokadamw", ("grokadamw",)),
]


def leaves(config: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) for every value of a nested config; a list is one value."""
    if isinstance(config, dict):
        for k, v in config.items():
            yield from leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), config


def flash_attention(key: str, value: Any) -> bool:
    return key.rsplit(".", 1)[-1] == "attn_implementation" and str(value).startswith("flash_attention")


def needs(config: dict[str, Any]) -> list[Need]:
    """The packages `config` (a resolved config, nested dicts) names, wherever the key sits (an engine inside a
    judge, a training key inside a sweep's overrides)."""
    out = []
    for key, value in leaves(config):
        leaf = key.rsplit(".", 1)[-1]
        if flash_attention(key, value):
            out.append(
                Need(
                    key,
                    value,
                    ("flash-attn", "kernels"),
                    f"{GPU_SETUP} brings transformers' `kernels`, which fetches a flash-attention kernel "
                    "from the Hub; or set attn_implementation=sdpa (the same results, a little slower)",
                )
            )
        elif leaf == "report_to":
            for name in [value] if isinstance(value, str) else value or []:
                if name in REPORTERS:
                    out.append(
                        Need(
                            key,
                            name,
                            REPORTERS[name],
                            f"{GPU_SETUP} brings tensorboard; pip install {REPORTERS[name][0]}; "
                            "or set report_to=none",
                        )
                    )
        elif leaf == "optim" and isinstance(value, str):
            for pattern, dists in OPTIMIZERS:
                if re.search(pattern, value):
                    out.append(Need(key, value, dists, f"pip install {dists[0]}, or set optim=adamw_torch"))
                    break
        elif leaf == "use_liger_kernel" and value is True:
            out.append(Need(key, value, ("liger-kernel",), f"{GPU_SETUP}, or set use_liger_kernel=false"))
        elif leaf == "backend" and value == "vllm":
            out.append(
                Need(
                    key,
                    value,
                    ("vllm",),
                    f"{GPU_SETUP} on a machine with a CUDA GPU; or set {key}=transformers",
                )
            )
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> set[str]:
    """The distributions of this environment, by normalised name."""
    return {_normal(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}


def problems(config: dict[str, Any], available: set[str] | None = None) -> list[str]:
    """One line for each package `config` needs that is not among `available` (default: this environment)."""
    have = installed() if available is None else {_normal(n) for n in available}
    return [n.message() for n in needs(config) if not any(_normal(d) in have for d in n.dists)]


REASONING_MODEL = re.compile(r"o\d|gpt-5")  # OpenAI's reasoning families, by name


def api_problems(config: Any, prefix: str = "") -> list[str]:
    """Settings OpenAI's reasoning models refuse, wherever a model sits beside an engine that calls api.openai.com
    (a judge, a hosted baseline): a temperature other than 1, and logprobs (a weighted judge needs them)."""
    out: list[str] = []
    if not isinstance(config, dict):
        return out
    engine, model = config.get("engine"), config.get("model")
    hosted = isinstance(engine, dict) and any("api.openai.com" in u for u in engine.get("base_urls") or [])
    if hosted and isinstance(model, str) and REASONING_MODEL.match(model):
        if config.get("temperature") not in (None, 1, 1.0):
            out.append(
                f"{prefix}temperature={config['temperature']}: OpenAI's reasoning model {model} accepts only "
                f"temperature 1; set {prefix}temperature=1.0"
            )
        if config.get("logprobs"):
            out.append(
                f"{prefix}logprobs={config['logprobs']}: OpenAI's reasoning model {model} returns no "
                f"logprobs; set {prefix}logprobs=null, or choose a judge that returns them"
            )
    for key, value in config.items():
        out += api_problems(value, f"{prefix}{key}.")
    return out


def device_problems(config: dict[str, Any]) -> list[str]:
    """What this machine cannot run: flash-attention and Liger's Triton kernels exist only for CUDA GPUs."""
    import torch

    if torch.cuda.is_available():
        return []
    out = []
    for key, value in leaves(config):
        if flash_attention(key, value):
            out.append(
                f"{key}={value} runs on a CUDA GPU only and this machine has none: set {key}=sdpa to run here"
            )
        elif key.rsplit(".", 1)[-1] == "use_liger_kernel" and value is True:
            out.append(
                f"{key}=true: Liger's Triton kernels run on a CUDA GPU only and this machine has none: set {key}=false"
            )
    return out


def optimizer_problems(config: dict[str, Any]) -> list[str]:
    """GaLore and APOLLO project chosen linear layers; transformers fails after loading the model when none are named."""
    optim = str(config.get("optim") or "")
    if ("galore" in optim or "apollo" in optim) and not config.get("optim_target_modules"):
        return [
            f"optim={optim} needs optim_target_modules, the linear layers it projects (as its paper: "
            "optim_target_modules=[attn,mlp])"
        ]
    return []


def check(stage: str, built: tuple[Any, ...], config: dict[str, Any]) -> list[str]:
    """Every problem this machine has with a command's config (`built`, resolved as `config`): packages, device,
    hosted-judge settings, and inputs under runs/ that an earlier stage has not written."""
    found = problems(config) + device_problems(config) + api_problems(config) + optimizer_problems(config)
    if stage == "sweeps":  # a sweep's inputs are written by its own earlier stages; each cell checks its own
        return found
    # A schema that says what it reads (`inputs()`: training reads dataset_mixture's sources, not `dataset`) is
    # taken at its word; otherwise every runs/ path in the config but its outputs is an input.
    declared = next((b.inputs() for b in built if hasattr(b, "inputs")), None)
    if declared is None:
        reads = [(k, v) for k, v in leaves(config) if not k.endswith("output_dir")]
    else:
        named = {v: k for k, v in config.items() if isinstance(v, str)}
        reads = [(named.get(path, "dataset_mixture"), path) for path in declared]
    return found + [line for key, value in reads for line in missing_input(key, value)]


def missing_input(key: str, value: Any) -> list[str]:
    """A line for each path under runs/ (where stages write) in `value` that does not exist, naming the recipe that
    writes it; Hub ids and other strings are left to the loaders."""
    out = []
    for path in value if isinstance(value, list) else [value]:
        if isinstance(path, str) and path.startswith("runs/") and not Path(path).exists():
            writers = writers_of(path)
            hint = f"; it is written by {', '.join(writers)}" if writers else ""
            out.append(f"{key}={path} does not exist: it is an earlier stage's output{hint}")
    return out


def writers_of(path: str) -> list[str]:
    """The shipped recipes whose output_dir is `path` or holds it (`runs/x/merged` is written by runs/x's)."""
    from core.recipes import RECIPES_DIR, load_recipe

    out = []
    for recipe in sorted(RECIPES_DIR.glob("*/*.yaml")):
        try:
            output_dir = load_recipe(recipe.parent.name, recipe.stem).get("output_dir")
        except Exception:  # a broken recipe is reported by its own command, not by a hint
            continue
        if isinstance(output_dir, str) and (
            path == output_dir or path.startswith(output_dir.rstrip("/") + "/")
        ):
            out.append(f"recipe={recipe.stem} ({recipe.parent.name})")
    return out

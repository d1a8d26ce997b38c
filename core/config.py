"""Recipes and `key=value` overrides, validated against the dataclasses they feed.

A recipe is `recipes/<stage>/NAME.yaml`. A command line is `recipe=NAME key=value a.b=value ...`:
the recipe is loaded, overrides are merged on top (dots reach into nested groups), then every key is
checked against the command's dataclasses (trl's SFTConfig/DPOConfig for training). Unknown keys,
wrong types and unknown recipes fail with a message that says what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.errors import ConfigError, EngineError, OutageError, first_line
from core.recipes import merge_recipe


def cli(main: typing.Callable[[list[str] | None], Any]) -> typing.Callable[[list[str] | None], Any]:
    """Run a command's main; a user error prints one clear line and exits 2, an engine outage exits 3 (re-run to
    finish), and our own bugs keep their traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> Any:
        try:
            return main(argv)
        except OutageError as e:
            _close_progress_bars()
            print(
                f"error: {e}; nothing it failed to produce was written: re-run the same command to redo it",
                file=sys.stderr,
            )
            raise SystemExit(3) from None
        except (ConfigError, EngineError) as e:
            _close_progress_bars()
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def _close_progress_bars() -> None:
    """Close the bars an error left open: else each is redrawn at exit, below the error line."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


# YAML 1.1 reads these as booleans; on the command line only true/false are.
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    recipe, overrides = None, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument '{arg}' is not of the form key=value")
        key = key.lstrip("-").replace("-", "_")
        if key == "recipe":
            recipe = value
        elif value.lower() in _YAML11_BOOLS:  # `save_strategy=no` means the string, not False
            overrides.append(f"{key}='{value}'")
        else:
            overrides.append(f"{key}={value}")
    return recipe, overrides


def parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """`recipe=NAME key=value a.b=value ...` as (NAME or None, the overrides as a nested dict). Values are read
    as YAML except yes/no/on/off, which stay strings; `--key-name=v` is `key_name=v`; dots nest."""
    recipe, dotlist = _split_argv(argv)
    try:  # interpolations stay unresolved until merged onto the recipe
        return recipe, OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))
    except Exception as e:  # omegaconf reports malformed dotlists with its own types
        raise ConfigError(f"could not parse overrides {dotlist}: {first_line(e)}") from e


def parse_config(stage: str, argv: list[str], *schemas: type) -> tuple[Any, ...]:
    """One instance of each schema from `recipe=NAME key=value ...` (flat keys, as alignment-handbook), validated
    but not preflighted: what the machine has and which inputs exist are not looked at."""
    recipe, overrides = parse_argv(argv)
    return build(merge_recipe(stage, recipe, overrides), *schemas)


def load_config(
    stage: str, argv: list[str] | None, *schemas: type, checks: typing.Iterable[typing.Callable] = ()
) -> tuple[Any, ...]:
    """A command's config: `parse_config`, then the preflight (core/preflight.py, plus `checks`: the command's
    own, each given the built instances and returning problem lines). `--preflight` stops there, before anything
    loads or is written; `--help` lists the keys."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(describe(*schemas))
        raise SystemExit(0)
    built = parse_config(stage, [a for a in argv if a != "--preflight"], *schemas)
    preflight(stage, built, checks, only="--preflight" in argv)
    return built


def preflight(
    stage: str, built: tuple[Any, ...], checks: typing.Iterable[typing.Callable], only: bool
) -> None:
    from core import preflight as pf

    config = resolved(*built)
    found = pf.check(stage, built, config) + [line for check in checks for line in check(*built)]
    if found:
        raise ConfigError("\nerror: ".join(found))
    if only:
        named = sorted({n.dists[0] if len(n.dists) == 1 else " or ".join(n.dists) for n in pf.needs(config)})
        print(
            f"preflight: {stage} is ready to run (the packages it names: {', '.join(named) or 'none beyond the base install'}; "
            "the settings and the inputs under runs/ are checked)"
        )
        raise SystemExit(0)


def build(raw: dict[str, Any], *schemas: type) -> tuple[Any, ...]:
    """Route flat keys to the dataclass that owns them and coerce each value to its field's type."""
    owner: dict[str, type] = {}
    for schema in schemas:
        for f in dataclasses.fields(schema):
            if f.init:
                owner.setdefault(f.name, schema)
    unknown = [k for k in raw if k not in owner]
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0], "", schemas))
    kwargs: dict[type, dict[str, Any]] = {s: {} for s in schemas}
    for key, value in raw.items():
        schema = owner[key]
        kwargs[schema][key] = coerce(value, _hints(schema)[key], key)
    out = []
    for schema in schemas:
        try:
            out.append(schema(**kwargs[schema]))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid {schema.__name__}: {e}") from e
    return tuple(out)


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    """Each field's type. One that cannot be resolved (a forward reference a library upgrade broke) is our bug,
    raised with its traceback: never a schema whose keys go unchecked."""
    try:
        return typing.get_type_hints(schema)
    except NameError as e:
        raise TypeError(
            f"{schema.__name__}: its field types cannot be resolved ({e}), so its keys cannot be checked"
        ) from e


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        keys.append(prefix + f.name)
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys.extend(_all_keys(hint, prefix + f.name + "."))
    return keys


def _unknown_key_message(key: str, prefix: str, schemas: tuple[type, ...]) -> str:
    valid = [k for s in schemas for k in _all_keys(s, prefix)]
    full = prefix + key
    close = difflib.get_close_matches(full, valid, n=5, cutoff=0.5)
    names = ", ".join(s.__name__ for s in schemas)
    hint = f" Closest valid keys: {', '.join(close)}." if close else ""
    return f"unknown key '{full}' (not a field of {names}).{hint}"


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: [low, high], either end open or absent, plus `also` (-1 = no limit)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, x: float) -> bool:
        if x in self.also:
            return True
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below and math.isfinite(x)

    def __str__(self) -> str:
        if self.low is None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        elif self.high is None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return text + "".join(f" or {a:g}" for a in self.also)


COUNT, NONNEGATIVE, POSITIVE = Bounds(1), Bounds(0), Bounds(0, low_open=True)
FRACTION, PROBABILITY = Bounds(0, 1, high_open=True), Bounds(0, 1)
# Every numeric setting, by the last part of its key, whatever command or group it is in: checked when the config
# loads, so a value that makes no sense is one line naming the key and the range, never a silent truncation, an
# empty result or a hang. A `None` (where the field allows it) means "no limit"; 0 is refused unless listed here.
# tests/core/test_ranges.py fails for a numeric field of ours that is missing here.
RANGES: dict[str, Bounds] = {
    # sizes of work: chunks, batches, shards, limits
    **dict.fromkeys(
        [
            "batch_size",
            "chunk_size",
            "concurrency",
            "cpus_per_task",
            "docs_per_shard",
            "embed_batch_size",
            "iterations",
            "limit",
            "max_instances",
            "max_instructions",
            "max_model_len",
            "max_passages",
            "max_points",
            "max_prompts",
            "max_questions",
            "max_samples",
            "max_tokens",
            "base_max_tokens",
            "n_conversations",
            "n_turns",
            "neighbors_block",
            "neighbors_k",
            "neighbors_nprobe",
            "nodes",
            "reward_batch_size",
            "rows",
            "rows_per_shard",
            "tensor_parallel_size",
            "tokens_per_row",
            "top_k",
            "lora_r",
            "min_chars",
            "max_chars",
            "logprobs",
        ],
        COUNT,
    ),
    "n_samples": Bounds(2),  # a pair needs two responses
    "n_bootstrap": Bounds(10),  # fewer resamples give intervals of noise (and 0 a zero-width or NaN one)
    "threshold": Bounds(1, 5),  # Humpback's curation scores
    # data_synth.decontaminate: n-gram size and the share of a prompt's tokens (a row is flagged above it: 0 = any
    # shared n-gram, GPT-3's rule); a cosine above which two texts are near-exact copies
    "ngram_size": COUNT,
    "embed_max_tokens": COUNT,
    **dict.fromkeys(["ngram_threshold", "embed_threshold"], FRACTION),
    "dataset_mixture": NONNEGATIVE,
    "prefix_cache_gb": NONNEGATIVE,  # 0: no prefix cache  # a source's weight: the share of its rows to take (above 1 repeats it)
    "system_prompt_mix": PROBABILITY,
    **dict.fromkeys(
        [
            "gpus",
            "retries",
            "max_retries",
            "num_fewshot",
            "seed",
            "mixture_seed",
            "data_seed",
            "dataloader_num_workers",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "near_duplicate_distance",
        ],
        NONNEGATIVE,
    ),
    # sampling
    **dict.fromkeys(["temperature", "retry_temperature"], NONNEGATIVE),
    "top_p": Bounds(0, 1, low_open=True),
    "repetition_penalty": POSITIVE,
    # shares and fractions
    **dict.fromkeys(["share", "min_letter_share", "max_engine_errors"], PROBABILITY),
    **dict.fromkeys(["test_size", "lora_dropout"], FRACTION),
    **dict.fromkeys(["gpu_memory_utilization", "mfu"], Bounds(0, 1, low_open=True)),
    **dict.fromkeys(["timeout", "gpu_peak_tflops", "lora_alpha"], POSITIVE),
    # trl's SFTConfig / DPOConfig (transformers accepts a negative learning rate or a batch of 0 without a word)
    **dict.fromkeys(
        ["learning_rate", "num_train_epochs", "beta", "logging_steps", "save_steps", "eval_steps"], POSITIVE
    ),
    **dict.fromkeys(
        [
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "effective_batch_size",
            "max_length",
            "max_prompt_length",
            "max_completion_length",
            "save_total_limit",
        ],
        COUNT,
    ),
    "max_steps": Bounds(1, also=(-1,)),  # -1: train for num_train_epochs
    "label_smoothing": Bounds(0, 0.5, high_open=True),  # robust DPO divides by 1 - 2 x it
    # the preference methods' own weights (train/dpo.py)
    **dict.fromkeys(["simpo_gamma", "cpo_alpha"], NONNEGATIVE),
    **dict.fromkeys(["desirable_weight", "undesirable_weight"], POSITIVE),
}


class RangeError(ConfigError):
    """A number of the right type outside its setting's range."""


def coerce(value: Any, hint: Any, key: str, setting: str | None = None) -> Any:
    """Check `value` against a type hint, converting where the intent is unambiguous (int -> float), and a number
    against the range of its setting (`RANGES`; the setting is the key's last part, or the mapping it is in)."""
    value = _coerce_type(value, hint, key)
    bounds = RANGES.get(setting or key.rsplit(".", 1)[-1])
    if (
        bounds is not None
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value not in bounds
    ):
        raise RangeError(f"key '{key}': must be {bounds}, got {value!r}")
    return value


def _coerce_type(value: Any, hint: Any, key: str) -> Any:
    if hint is Any or hint is None or isinstance(hint, str):
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"key '{key}': expected {_type_name(hint)}, got null")
        # str accepts almost anything, so it is tried last.
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for arg in ordered:
            try:
                return _coerce_type(value, arg, key)
            except RangeError:  # a field of a nested group out of range: the alternatives will not fit better
                raise
            except ConfigError:
                continue
        quote = (
            " (YAML reads unquoted yes/no/on/off as booleans: quote the value)"
            if isinstance(value, bool)
            else ""
        )
        raise ConfigError(
            f"key '{key}': expected {_type_name(hint)}, got {value!r} ({type(value).__name__}){quote}"
        )
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"key '{key}': expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple, typing.Sequence, set) or hint in (list, tuple):
        if isinstance(value, str):  # `compare=a,b,c` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r} ({type(value).__name__})")
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin in (dict, typing.Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r} ({type(value).__name__})")
        if len(args) == 2:
            return {k: coerce(v, args[1], f"{key}.{k}", key.rsplit(".", 1)[-1]) for k, v in value.items()}
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping of {hint.__name__} fields, got {value!r}")
        field_hints = _hints(hint)
        names = {f.name for f in dataclasses.fields(hint) if f.init}
        for k in value:
            if k not in names:
                raise ConfigError(_unknown_key_message(k, key + ".", (hint,)))
        fields = {k: coerce(v, field_hints[k], f"{key}.{k}") for k, v in value.items()}
        try:
            return hint(**fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"key '{key}': {e}") from e
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(
                f"key '{key}': expected one of {[m.value for m in hint]}, got {value!r}"
            ) from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}': expected bool (true/false), got {value!r} ({type(value).__name__})")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}': expected int, got {value!r} ({type(value).__name__})")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"key '{key}': expected float, got {value!r} ({type(value).__name__})")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        quote = (
            " (YAML reads unquoted yes/no/on/off as booleans: quote the value)"
            if isinstance(value, bool)
            else ""
        )
        raise ConfigError(f"key '{key}': expected str, got {value!r} ({type(value).__name__}){quote}")
    return value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def to_plain(obj: Any) -> Any:
    """Dataclasses, enums and paths as plain YAML-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):  # transformers' TrainingArguments hides tokens and resolves enums there
            return to_plain(obj.to_dict())
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def resolved(*instances: Any) -> dict[str, Any]:
    """One flat dict of every field of every instance: what `config.yaml` records."""
    out: dict[str, Any] = {}
    for inst in instances:
        out.update(to_plain(inst))
    return out


def config_yaml(config: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config))


def describe(*schemas: type) -> str:
    """`--help`: every key with its type and default."""
    lines = ["keys (set in a recipe or as key=value):"]
    for schema in schemas:
        hints = _hints(schema)
        for f in dataclasses.fields(schema):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(factory)"
            doc = (f.metadata or {}).get("help", "")
            lines.append(f"  {f.name}: {_type_name(hints.get(f.name))} = {default!r}  {doc}".rstrip())
    return "\n".join(lines)

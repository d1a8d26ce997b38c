"""Every numeric setting is range-checked when the config loads: a value that makes no sense is one line naming the
key and the allowed range (exit 2), never a silent truncation, an empty result, a NaN interval or a hang."""

import dataclasses
import re
import typing

import pytest

from core.config import RANGES, ConfigError, _hints, parse_config
from experiments.commands import COMMANDS
from tests.core.test_output_dir import main
from tests.test_recipes import schemas


def numeric_fields(schema: type, prefix: str = "") -> list[str]:
    """Dotted names of every int/float field of `schema` and of the groups inside it (lists of groups too)."""
    out = []
    for f in dataclasses.fields(schema):
        hint = _hints(schema)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(hint):
            out += numeric_fields(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(args[0]):
            out += numeric_fields(args[0], f"{prefix}{f.name}[].")
        elif any(a in (int, float) for a in args) and f.init:
            out.append(prefix + f.name)
    return out


def test_every_numeric_setting_of_ours_has_a_range():
    ours = [s for c in COMMANDS.values() for s in c.schemas() if s.__module__.split(".")[0] != "trl"]
    missing = sorted({k for s in ours for k in numeric_fields(s) if k.rsplit(".", 1)[-1] not in RANGES})
    assert not missing, f"add these keys to core.config.RANGES: {missing}"


@pytest.mark.parametrize(
    "stage, key, value, expected",
    [
        ("select", "top_k", -2, ">= 1"),  # kept 2 of 4
        ("select", "top_k", 0, ">= 1"),  # wrote 0 rows, exit 0
        ("generate", "max_questions", -2, ">= 1"),  # answered 4 of 6
        ("alpaca_eval", "max_instances", -1, ">= 1"),  # judged 3 of 4
        ("alpaca_eval", "max_instances", 0, ">= 1"),
        ("pairs", "chunk_size", -1, ">= 1"),  # did nothing, "prompts: 0"
        ("pairs", "chunk_size", 0, ">= 1"),
        ("pairs", "n_samples", 1, ">= 2"),
        ("magpie", "chunk_size", 0, ">= 1"),  # looped forever at 0/4
        ("magpie", "rows_per_shard", 0, ">= 1"),
        ("magpie", "engine.batch_size", 0, ">= 1"),
        ("magpie", "instruction.max_tokens", 0, ">= 1"),
        ("magpie", "response.top_p", 0, "in (0, 1]"),
        ("arena_hard", "n_bootstrap", 0, ">= 10"),  # printed a zero-width interval
        ("pairwise", "n_bootstrap", 0, ">= 10"),  # wrote NaN intervals
        ("tag", "judge.chunk_size", 0, ">= 1"),
        ("tag", "judge.max_engine_errors", 1.5, "in [0, 1]"),
        ("pairs", "test_size", 1, "in [0, 1)"),
        ("sft", "learning_rate", -1e-5, "> 0"),  # transformers takes these without a word
        ("sft", "per_device_train_batch_size", 0, ">= 1"),
        ("sft", "max_steps", -5, ">= 1 or -1"),
        ("dpo", "beta", 0, "> 0"),
        ("sweeps", "mfu", 0, "in (0, 1]"),
        ("sft", "dataset_mixture.a", -1, ">= 0"),  # a mapping's values: the mapping's range
        ("magpie", "system_prompt_mix.math", 2, "in [0, 1]"),
    ],
)
def test_a_value_out_of_range_names_the_key_and_the_range(stage, key, value, expected):
    args = [f"{key}={value}"] + (["output_dir=/tmp/x"] if stage in ("sft", "dpo") else [])
    with pytest.raises(ConfigError) as err:
        parse_config(stage, args, *schemas(stage))
    got = f"{value}(\\.0)?"  # a float setting shows 0 as 0.0
    assert re.fullmatch(
        f"key '{re.escape(key)}': must be {re.escape(expected)}, got {got}", str(err.value)
    ), err.value


def test_limits_that_mean_no_limit_still_load():
    (cfg,) = parse_config("select", ["top_k=null"], *schemas("select"))
    assert cfg.top_k is None
    (_, args) = parse_config("sft", ["max_steps=-1", "output_dir=/tmp/x", "bf16=false"], *schemas("sft"))
    assert args.max_steps == -1


def test_a_range_error_is_exit_2_from_the_command(tmp_path):
    code, err = main("data_synth.select", "top_k=0", f"output_dir={tmp_path / 'x'}")
    assert code == 2 and err.strip() == "error: key 'top_k': must be >= 1, got 0"
    assert not (tmp_path / "x").exists()  # refused before anything was written

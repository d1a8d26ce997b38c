import subprocess
import sys

import datasets
import pytest

from core.engines import Completion
from data_synth.magpie import GridPoint, MagpieConfig, clean_instruction, grid_point, run, steering_choice


def test_clean_instruction_rules():
    c = lambda t, r="stop": Completion(t, 5, r)  # noqa: E731
    assert clean_instruction(c("  Question: How do magnets work?  ")) == ("How do magnets work?", "")
    assert clean_instruction(c("What is 2+2? Answer: 4")) == ("What is 2+2?", "")
    assert clean_instruction(c("List the steps:")) == (None, "ends_with_colon")
    assert clean_instruction(c("   ")) == (None, "empty")
    assert clean_instruction(c("A long unfinished", "length")) == (None, "truncated")


def test_grid_assignment_follows_shares():
    grid = [GridPoint(1.0, 1.0, 0.5), GridPoint(1.1, 0.995, 0.3), GridPoint(1.25, 0.99, 0.2)]
    points = [grid_point(i, 100, grid) for i in range(100)]
    assert [points.count(g) for g in grid] == [50, 30, 20]


def test_bad_settings_fail_before_generation():
    from core.config import ConfigError, build

    with pytest.raises(ConfigError, match="key 'n_conversations': must be >= 1, got 0"):
        build({"n_conversations": 0}, MagpieConfig)
    with pytest.raises(ValueError, match="shares must sum to 1"):
        MagpieConfig(instruction=_grid(0.5))


def _grid(share):
    from data_synth.magpie import InstructionSampling

    return InstructionSampling(grid=[GridPoint(share=share)])


@pytest.mark.integration
def test_cli_rejects_nonpositive_n_naming_the_field():
    out = subprocess.run(
        [sys.executable, "-m", "data_synth.magpie", "recipe=magpie_demo", "n_conversations=0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "key 'n_conversations': must be >= 1, got 0" in out.stderr


def test_magpie_writes_parseable_conversations_and_resumes(tmp_path, embedded_path):
    cfg = MagpieConfig(n_conversations=4, output_dir=str(tmp_path / "magpie"), chunk_size=4, seed=1)
    cfg.instruction.max_tokens = 48
    cfg.response.max_tokens = 32
    summary = run(cfg)
    ds = datasets.load_dataset("parquet", data_dir=cfg.output_dir, split="train")
    assert len(ds) == summary["rows"] == 4
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
        assert row["pre_query_template"].startswith("<|im_start|>system")
        assert row["instruction_tokens"] > 0 and row["response_tokens"] > 0
    # The same command with a larger target resumes: old rows kept, new ones added, no duplicates.
    cfg.n_conversations = 6
    run(cfg)
    ds2 = datasets.load_dataset("parquet", data_dir=cfg.output_dir, split="train")
    assert len(ds2) == 6
    firsts = [r["messages"][0]["content"] for r in ds2]
    assert len(set(firsts)) == 6
    assert firsts[:4] == [r["messages"][0]["content"] for r in ds]


def test_steering_keys_are_validated_and_mixed():
    with pytest.raises(
        ValueError, match=r"system_prompt: unknown system-prompt key 'mathh'; known keys: code, math"
    ):
        MagpieConfig(system_prompt="mathh")
    with pytest.raises(ValueError, match="system_prompt_mix shares must sum to 1"):
        MagpieConfig(system_prompt_mix={"math": 0.5, "code": 0.4})
    cfg = MagpieConfig(
        system_prompt_mix={"math": 0.5, "poetry": 0.5}, system_prompts={"poetry": "You write poems."}
    )
    picks = [steering_choice(i, cfg.steering())[0] for i in range(100)]
    assert abs(picks.count("math") - 50) <= 2 and abs(picks.count("poetry") - 50) <= 2
    assert MagpieConfig(system_prompt="You are a chess coach.").steering() == [
        ("custom", "You are a chess coach.", 1.0)
    ]


@pytest.mark.integration
def test_cli_rejects_unknown_steering_key_before_loading_a_model():
    out = subprocess.run(
        [sys.executable, "-m", "data_synth.magpie", "recipe=magpie_demo", "system_prompt=mathh"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unknown system-prompt key 'mathh'" in out.stderr


def test_multi_turn_and_steering_on_the_embedded_model(tmp_path, embedded_path):
    cfg = MagpieConfig(
        n_conversations=2,
        n_turns=2,
        output_dir=str(tmp_path / "mt"),
        chunk_size=3,
        seed=2,
        system_prompt_mix={"math": 0.5, "code": 0.5},
    )
    cfg.instruction.max_tokens = 64
    cfg.response.max_tokens = 24
    run(cfg)
    ds = datasets.load_dataset("parquet", data_dir=cfg.output_dir, split="train")
    assert len(ds) == 2
    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
        assert row["n_turns"] == 2 and row["system_prompt_key"] in ("math", "code")
        assert row["pre_query_template"].startswith("<|im_start|>system\nYou are an AI assistant")
        assert row["messages"][2]["content"] != row["messages"][0]["content"]


@pytest.mark.integration
def test_a_setting_that_never_yields_a_row_fails_instead_of_spinning(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_synth.magpie",
            "recipe=magpie_demo",
            "n_conversations=2",
            "chunk_size=2",
            "instruction.max_tokens=1",
            f"output_dir={tmp_path / 'm'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "no valid conversation in the last 10 rounds" in out.stderr
    assert "'truncated'" in out.stderr  # says why rows were dropped

import random
import subprocess
import sys

import datasets
import pytest

import data_synth.magpie as magpie
from core.engines import Completion, TransformersEngine
from core.models import resolve_model
from core.shards import ShardWriter
from data_synth.magpie import (
    GridPoint,
    MagpieConfig,
    _normalize,
    _Spares,
    clean_instruction,
    grid_point,
    run,
    steering_choice,
)


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


class Recording(TransformersEngine):
    """The transformers engine, noting for each call its samplings and how many entries its prefix cache gained."""

    calls: list = []

    def complete(self, prompts, sampling, demand=None):
        entries = lambda: len(self.prefix_cache.entries) if self.prefix_cache else 0  # noqa: E731
        before = entries()
        out = super().complete(prompts, sampling, demand)
        self.calls.append((sampling, entries() - before))
        return out


def test_multi_turn_and_steering_on_the_embedded_model(tmp_path, embedded_path, monkeypatch):
    monkeypatch.setattr(magpie, "make_engine", lambda model, cfg: Recording(resolve_model(model), cfg))
    monkeypatch.setattr(Recording, "calls", [])
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
    # instructions, replies, follow-ups, last replies: the KV of every request but a last reply stays cached for
    # the prompts that extend it (nothing extends a last reply)
    kinds = ["instructions", "replies", "follow-ups", "last replies"]
    assert len(Recording.calls) == len(kinds)
    for kind, (samplings, gained) in zip(kinds, Recording.calls, strict=True):
        assert all(s.keep_kv == (kind != "last replies") for s in samplings), kind
        assert (gained > 0) == (kind != "last replies"), kind


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


def kept_in_order(groups, completions, need, seen):
    """What `_instructions` keeps when every candidate runs: per group, in candidate order, the first `need`
    valid instructions not seen before (a text kept in one group is seen by all)."""
    seen, taken, kept = set(seen), dict.fromkeys(need, 0), set()
    for i, (g, c) in enumerate(zip(groups, completions, strict=True)):
        if taken[g] == need[g]:
            continue
        text, _ = clean_instruction(c)
        if text is not None and _normalize(text) not in seen:
            seen.add(_normalize(text))
            taken[g] += 1
            kept.add(i)
    return kept


def test_spares_never_drop_a_candidate_that_would_be_kept():
    """`_Spares` against the rule it must not change, over random rounds: two groups or one, duplicates within
    and across groups, texts seen before, invalid candidates, and candidates finishing in any order."""
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randint(4, 30)
        groups = [rng.choice("AB" if seed % 2 else "A") for _ in range(n)]
        words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
        completions = [
            Completion(rng.choice(words), 3, "length" if rng.random() < 0.2 else "stop") for _ in range(n)
        ]
        need = {g: rng.randint(1, 4) for g in set(groups)}
        seen = set(rng.sample(words, 2))
        spares = _Spares(groups, need, rng.uniform(0.3, 1.0), seen)
        keep = kept_in_order(groups, completions, need, seen)
        queued, running, dropped, started = list(range(n)), [], set(), []
        while queued or running:
            start, drop = spares.triage(list(queued))
            assert not set(drop) & keep, f"seed {seed}: dropped a candidate that would be kept"
            dropped |= set(drop)
            queued = [i for i in queued if i not in dropped]
            begin = [i for i in start if i in queued][: rng.randint(0, 3)]
            if not begin and not running and queued:
                begin = queued[:1]  # what the engine does when nothing runs
            queued = [i for i in queued if i not in begin]
            running += begin
            started += begin
            for i in rng.sample(running, rng.randint(0, len(running))):
                running.remove(i)
                spares.finished(i, completions[i])
        assert keep <= set(started), f"seed {seed}"


class EveryRequest(TransformersEngine):
    """The transformers engine running every request of a call, as vLLM and servers do."""

    def complete(self, prompts, sampling, demand=None):
        return super().complete(prompts, sampling)


def test_spare_candidates_are_held_back_without_changing_the_rows(tmp_path, embedded_path, monkeypatch):
    """A round draws more candidates than it needs; the engine runs the spares only if the others fall short,
    and the rows are those of the same command on an engine that runs every candidate."""

    def synthesize(name):
        cfg = MagpieConfig(n_conversations=6, output_dir=str(tmp_path / name), chunk_size=6, seed=3)
        cfg.engine.batch_size = 1  # one row at a time: no batched float rounding tells the two runs apart
        cfg.instruction.max_tokens = 48
        cfg.response.max_tokens = 24
        summary = run(cfg)
        rows = [r["messages"] for r in ShardWriter(tmp_path / name).rows()]
        return rows, summary["instructions_sampled"]

    held, sampled_held = synthesize("held")
    monkeypatch.setattr(magpie, "make_engine", lambda model, cfg: EveryRequest(resolve_model(model), cfg))
    every, sampled_every = synthesize("every")
    assert held == every
    assert sampled_held < sampled_every

import json
import math

import pandas as pd
import pytest

import eval.pairwise as pw
from core.engines import Completion


def test_preference_from_logprobs_and_from_text():
    c = Completion(
        "A", 1, "stop", {"A": math.log(0.6), " A": math.log(0.1), "B": math.log(0.2), "The": math.log(0.05)}
    )
    assert pw.preference_a(c) == pytest.approx(0.7 / 0.9)
    assert pw.preference_a(Completion("B is better", 3, "stop", None)) == 0.0
    assert pw.preference_a(Completion("Response A.", 3, "stop", {"Response": -0.1})) == 1.0
    assert pw.preference_a(Completion("I cannot decide", 3, "stop", None)) is None


def _j(q, a, b, p):
    return {"id": q, "model_a": a, "model_b": b, "preference_a": p, "failed": p is None}


def test_leaderboard_arithmetic_on_a_constructed_table():
    answers = {m: [{"id": q, "n_tokens": 10} for q in ("q1", "q2")] for m in ("x", "y")}
    judgments = [
        _j("q1", "x", "y", 1.0),
        _j("q1", "y", "x", 0.0),  # x wins q1 in both orders
        _j("q2", "x", "y", 0.5),
        _j("q2", "y", "x", 0.9),  # q2: x gets (0.5 + 0.1) / 2 = 0.3
        _j("q2", "x", "y", None),  # a failed judgment counts as failed, not as a tie
    ]
    rows = {r["model"]: r for r in pw.leaderboard(judgments, answers, n_bootstrap=200, seed=0)}
    assert rows["x"]["win_rate"] == pytest.approx(65.0)  # mean(1.0, 0.3)
    assert rows["y"]["win_rate"] == pytest.approx(35.0)
    assert 30.0 <= rows["x"]["ci_low"] <= 65.0 <= rows["x"]["ci_high"] <= 100.0
    assert rows["x"]["n_failed"] == 1


@pytest.mark.integration
def test_real_judging_of_identical_models_is_exactly_even_and_resumes(tmp_path, monkeypatch):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "instruction": q}) + "\n"
            for i, q in enumerate(["Name a fruit.", "What is 2 + 2?"])
        )
    )
    cfg = pw.PairwiseConfig(
        models={"one": "embedded", "two": "embedded"},
        instructions=str(questions),
        max_tokens=24,
        output_dir=str(tmp_path / "eval"),
        n_bootstrap=100,
    )
    rows = pw.run(cfg)
    # Same answers judged in both orders: any position bias cancels exactly.
    assert [r["win_rate"] for r in rows] == [50.0, 50.0]
    judgments = [
        json.loads(line) for line in (tmp_path / "eval" / "judgments.jsonl").read_text().splitlines()
    ]
    assert len(judgments) == 4 and not any(j["failed"] for j in judgments)
    table = pd.read_csv(tmp_path / "eval" / "leaderboard.csv")
    assert list(table.columns[:4]) == ["model", "win_rate", "ci_low", "ci_high"]
    assert (
        "| one |" in (tmp_path / "eval" / "leaderboard.md").read_text()
        or "| two |" in (tmp_path / "eval" / "leaderboard.md").read_text()
    )

    def no_engine(*a, **k):
        raise AssertionError("a finished evaluation must not load a model again")

    import core.judge
    import eval.generate

    monkeypatch.setattr(eval.generate, "make_engine", no_engine)  # answers come from answers/*.jsonl
    monkeypatch.setattr(core.judge, "make_engine", no_engine)  # judgments from the judge's cache
    assert pw.run(cfg) == rows
    scores = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert {(s["model"], s["metric"], s["value"]) for s in scores} == {
        ("one", "win_rate", 50.0),
        ("two", "win_rate", 50.0),
    }


def test_bad_instruction_file_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"instruction": "ok"}\n{"prompt": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: missing 'instruction'"):
        pw.load_instructions(str(path))

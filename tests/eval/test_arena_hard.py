import json
import math
import subprocess
import sys

import pytest

from eval.arena_hard import battles_from_judgments, bradley_terry, leaderboard, parse_verdict, score


def test_every_verdict_form():
    assert parse_verdict("A is better. My final verdict is [[A>B]].") == "A>B"
    assert parse_verdict("First [[B>A]], on reflection [[A>>B]]") == "A>>B"  # the last one wins
    assert parse_verdict("Verdict: [B>>A]") == "B>>A"  # single-bracket fallback
    assert parse_verdict("[[A=B]] but also [A>B]") == "A=B"  # double brackets take precedence
    assert parse_verdict("[[C>A]] no valid label") is None
    assert parse_verdict("no verdict at all") is None


def test_battles_count_strong_verdicts_three_times_and_swap_game_two():
    rows = [
        {"question_id": "q1", "model": "m", "games": [{"score": "A>>B"}, {"score": "A>B"}]},
        {"question_id": "q2", "model": "m", "games": [{"score": "A=B"}, {"score": None}]},
    ]
    battles = battles_from_judgments(rows, "base")
    assert battles.count(("base", "m", "model_a")) == 3  # game 1: baseline (A) much better
    assert battles.count(("base", "m", "model_b")) == 1  # game 2: A is the model, and it won
    assert battles.count(("base", "m", "tie")) == 1 and len(battles) == 5  # the unparsed game is no battle


def test_bradley_terry_two_models_reduces_to_the_win_rate():
    # The model wins 3 of 4 battles: rating 1000 + 400 log10(3), score 75%.
    battles = [("base", "m", "model_b")] * 3 + [("base", "m", "model_a")]
    ratings = bradley_terry(battles, "base")
    assert ratings["base"] == pytest.approx(1000.0)
    assert ratings["m"] == pytest.approx(1000 + 400 * math.log10(3), abs=0.5)
    assert score(ratings["m"]) == pytest.approx(75.0, abs=0.05)
    # ties count as half a win each way: 2 ties + 1 win + 1 loss is even
    even = bradley_terry(
        [("base", "m", "tie")] * 2 + [("base", "m", "model_a"), ("base", "m", "model_b")], "base"
    )
    assert score(even["m"]) == pytest.approx(50.0, abs=0.05)


def test_interval_narrows_as_battles_grow():
    few = [("base", "m", "model_b")] * 6 + [("base", "m", "model_a")] * 4
    many = few * 10
    width = lambda rows: next(r["rating_q975"] - r["rating_q025"] for r in rows if r["model"] == "m")  # noqa: E731
    narrow, wide = width(leaderboard(many, "base", 100, seed=1)), width(leaderboard(few, "base", 100, seed=1))
    assert narrow < wide / 2


def test_cli_scores_arena_hard_auto_judgment_files(tmp_path):
    d = tmp_path / "model_judgment" / "judge"
    d.mkdir(parents=True)
    games = {"strong": ({"score": "B>A"}, {"score": "A>B"}), "weak": ({"score": "A>>B"}, {"score": "B>>A"})}
    for model, (g1, g2) in games.items():
        (d / f"{model}.jsonl").write_text(
            "".join(
                json.dumps({"question_id": f"q{i}", "model": model, "judge": "judge", "games": [g1, g2]})
                + "\n"
                for i in range(5)
            )
        )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.arena_hard",
            f"judgments={d}",
            "baseline=gpt-4-0314",
            "n_bootstrap=20",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    board = {r["model"]: r for r in json.loads(out.stdout)["leaderboard"]}
    assert board["gpt-4-0314"]["score"] == 50.0 and board["strong"]["score"] > 50.0 > board["weak"]["score"]
    header = (tmp_path / "leaderboard.csv").read_text().splitlines()[0]
    assert header == "model,score,rating,rating_q025,rating_q975,CI"

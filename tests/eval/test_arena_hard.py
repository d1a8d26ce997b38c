import json
import math
import subprocess
import sys

import numpy as np
import pytest

from core.config import ConfigError
from eval.arena_hard import (
    battles_from_judgments,
    bradley_terry,
    leaderboard,
    main,
    parse_verdict,
    score,
    style_controlled_leaderboard,
)
from eval.generate import main as generate


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
    assert header == "model,score,rating_q025,rating_q975,CI,avg_tokens"  # arena-hard-auto's columns


def _meta(n):
    return {"token_len": n, "header_count": {"h1": 0}, "list_count": {"ordered": 0}, "bold_count": {"**": 0}}


def test_style_control_credits_length_to_length():
    # "long" is longer than the baseline on 3 questions in 4 and wins 80% of those, 20% of the rest; "even"
    # matches the baseline's length and wins 60% everywhere. Plain BT ranks long first; once length is a
    # feature of its own, even is ahead.
    rng = np.random.default_rng(0)
    rows, answers = [], {"base": {}, "long": {}, "even": {}}
    for i in range(200):
        q, longer = f"q{i}", i % 4 != 0
        answers["base"][q], answers["even"][q] = {"meta": _meta(200)}, {"meta": _meta(200)}
        answers["long"][q] = {"meta": _meta(400 if longer else 100)}
        for model, p in (("long", 0.8 if longer else 0.2), ("even", 0.6)):
            g1, g2 = ("B>A" if rng.random() < p else "A>B"), ("A>B" if rng.random() < p else "B>A")
            rows.append({"question_id": q, "model": model, "games": [{"score": g1}, {"score": g2}]})
    plain = {r["model"]: r["score"] for r in leaderboard(battles_from_judgments(rows, "base"), "base", 10)}
    styled = {r["model"]: r["score"] for r in style_controlled_leaderboard(rows, answers, "base", 10)}
    assert plain["long"] > plain["even"] and styled["even"] > styled["long"]
    assert styled["base"] == 50.0


def test_embedded_judge_in_both_orders_and_a_cached_rerun(embedded_path, tmp_path):
    questions = tmp_path / "question.jsonl"
    asks = ["Name a fruit.", "What is 2+2?"]
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "turns": [{"content": a}]}) + "\n"
                                 for i, a in enumerate(asks)))  # fmt: skip
    answers = tmp_path / "data" / "model_answer"
    answers.mkdir(parents=True)
    (answers / "gpt-4-0314.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{i}", "model_id": "gpt-4-0314",
                    "choices": [{"index": 0, "turns": [{"content": "I do not know.", "token_len": 5}]}]}) + "\n"
        for i in range(2)))  # fmt: skip
    generate([f"model={embedded_path}", "name=smol", "bench=arena_hard", f"questions={questions}",
              "max_tokens=12", f"output_dir={tmp_path / 'gen'}"])  # fmt: skip
    (answers / "smol.jsonl").write_text((tmp_path / "gen" / "model_answer" / "smol.jsonl").read_text())
    args = [f"answers={answers}", f"questions={questions}", f"judge.model={embedded_path}", "judge.max_tokens=6",
            'judge.prefill="My final verdict is: [["', "n_bootstrap=10"]  # fmt: skip
    main(args)
    judged = [
        json.loads(line)
        for line in (tmp_path / "data/model_judgment/SmolLM2-135M-Instruct/smol.jsonl").open()
    ]
    assert [j["question_id"] for j in judged] == ["q0", "q1"] and all(len(j["games"]) == 2 for j in judged)
    game1, game2 = judged[0]["games"]  # game 1 shows the baseline as A, game 2 as B
    assert game1["user_prompt"].index("I do not know.") < game1["user_prompt"].index("Assistant B's Answer")
    assert game2["user_prompt"].index("I do not know.") > game2["user_prompt"].index("Assistant B's Answer")
    result = json.loads((tmp_path / "data" / "arena_hard" / "results.json").read_text())
    board = {r["model"]: r for r in result["leaderboard"]}
    assert board["gpt-4-0314"]["score"] == 50.0 and board["gpt-4-0314"]["avg_tokens"] == 5.0
    n_games = 4 - result["unparsed_games"]["smol"]
    assert result["judge_calls"]["calls"] >= 4 and n_games > 0  # the prefilled 135M judge gives labels
    assert 0 < board["smol"]["avg_tokens"] <= 12

    main(args)  # re-running the finished evaluation: every judgment comes from the cache
    again = json.loads((tmp_path / "data" / "arena_hard" / "results.json").read_text())
    assert again["judge_calls"]["calls"] == 0 and again["leaderboard"] == result["leaderboard"]

    lines = (answers / "smol.jsonl").read_text().splitlines()
    (answers / "smol.jsonl").write_text(lines[0] + "\n")  # q1 is no longer answered
    with pytest.raises(
        ConfigError, match=r"smol.jsonl does not match the benchmark's questions: missing question_ids 'q1'"
    ):
        from eval.arena_hard import ArenaHardConfig, load_config, run

        run(load_config("eval", args, ArenaHardConfig)[0])


def test_answers_from_several_directories_and_one_model_twice_is_an_error(tmp_path):
    from eval.arena_hard import answer_files

    for d, models in (("a", ["m1", "gpt-4-0314"]), ("b", ["m2"]), ("c", ["m1"])):
        (tmp_path / d).mkdir()
        for m in models:
            (tmp_path / d / f"{m}.jsonl").write_text("")
    assert sorted(answer_files([str(tmp_path / "a"), str(tmp_path / "b")])) == ["gpt-4-0314", "m1", "m2"]
    with pytest.raises(ConfigError, match=r"answers: m1 has two answer files, .*a/m1.jsonl and .*c/m1.jsonl"):
        answer_files([str(tmp_path / "a"), str(tmp_path / "c")])

import csv
import json
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from core.config import ConfigError
from eval.arena_hard import (
    CREATIVE_SYSTEM,
    JUDGE_SYSTEM,
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


def test_verdicts_are_read_as_the_version_whose_layout_is_written():
    # HEAD (v2): the reply upper-cased, mirrored labels scored as their plain ones
    assert parse_verdict("my final verdict: [[b<a]]") == "A>B"
    assert [parse_verdict(f"[[{m}]]") for m in ("B<<A", "B=A", "A<B", "A<<B")] == [
        "A>>B",
        "A=B",
        "B>A",
        "B>>A",
    ]
    # pre-v2.0 (v0.1): [[...]] as written, and only when every match is the same label
    assert parse_verdict("my final verdict: [[b<a]]", "v0.1") is None
    assert parse_verdict("[[A>B]] ... so once more: [[A>B]]", "v0.1") == "A>B"
    assert parse_verdict("First [[B>A]], on reflection [[A>>B]]", "v0.1") is None
    assert parse_verdict("Verdict: [B>>A]", "v0.1") is None  # no single-bracket pattern before v2.0


def test_a_v2_question_with_a_null_game_is_left_out_whole_as_head_does(tmp_path):
    """HEAD's show_result.py drops the whole question when either of its games has no verdict; we dropped only
    the failed game. Here: q0 has a model win and a null game, q1 two wins, q2 and q3 two losses. HEAD scores
    q1-q3: 2 wins of 6 battles, 33.33; counting q0's game gave 3 of 7, 42.86."""
    d = tmp_path / "model_judgment" / "gpt-4.1"
    games = {
        0: ("B>A", None),
        1: ("B>A", "B<A"),
        2: ("A>B", "B>A"),
        3: ("A>B", "B>A"),
    }  # B<A: A (the model) won
    _judgments(d, "v2", "m", lambda i: games[i], n=4, category="hard_prompt", baseline="o3-mini-2025-01-31")
    main([f"judgments={d}", "n_bootstrap=10", f"output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "arena_hard" / "results.json").read_text())
    assert {r["model"]: r["score"] for r in result["leaderboard"]}["m"] == pytest.approx(
        100 * 2 / 6, abs=0.01
    )
    assert result["null_judgments"] == {"m": 1} and result["unparsed_games"] == {"m": 1}


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


def _judgments(d, layout, model, games, n=5, category="arena-hard-v0.1", baseline="gpt-4-0314"):
    """A judgment file in arena-hard-auto's own layout: gen_judgment.py before v2.0 (question_id) and since (uid,
    category, baseline; a failed game is null)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        g1, g2 = games(i)
        if layout == "v0.1":
            rows.append({"question_id": f"q{i}", "model": model, "judge": "gpt-4-1106-preview",
                         "games": [{"user_prompt": "...", "judgment": "...", "score": g1},
                                   {"user_prompt": "...", "judgment": "...", "score": g2}]})  # fmt: skip
        else:
            game = {None: None} | {
                g: {"score": g, "judgment": {"answer": f"[[{g}]]"}, "prompt": []} for g in (g1, g2)
            }
            rows.append({"uid": f"q{i}", "category": category, "judge": "gpt-4.1", "model": model,
                         "baseline": baseline, "games": [game[g1], game[g2]]})  # fmt: skip
    (d / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.integration
def test_leaderboard_csv_is_what_show_result_writes_with_output(tmp_path):
    # 3 questions won in both games (6 battles), 2 lost decisively in both (12): a 6/18 win rate. With one model
    # against the baseline, Bradley-Terry's score is that share, as in arena-hard-auto (both versions).
    d = tmp_path / "model_judgment" / "gpt-4-1106-preview"
    _judgments(d, "v0.1", "mixed", lambda i: ("B>A", "A>B") if i < 3 else ("A>>B", "B>>A"))
    _judgments(d, "v0.1", "weak", lambda i: ("A>>B", "B>>A"))
    out = subprocess.run([sys.executable, "-m", "eval.arena_hard", f"judgments={d}", "n_bootstrap=20",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, check=True)  # fmt: skip
    board = {r["model"]: r for r in json.loads(out.stdout)["leaderboard"]}
    assert board["mixed"]["score"] == pytest.approx(100 * 6 / 18, abs=0.01)
    assert board["gpt-4-0314"]["score"] == 50.0 and board["weak"]["score"] < 1.0
    assert board["gpt-4-0314"]["elo"] == 1000.0  # Elo only in results.json, under names of its own
    with open(tmp_path / "arena_hard" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "score", "rating_q025", "rating_q975", "CI", "avg_tokens", "date"]
    assert [r["model"] for r in rows] == ["gpt-4-0314", "mixed", "weak"]  # by score, as show_result sorts
    mixed = next(r for r in rows if r["model"] == "mixed")
    low, sc, high = float(mixed["rating_q025"]), float(mixed["score"]), float(mixed["rating_q975"])
    assert 0 < low <= sc <= high < 100  # win rates (%), not Elo ratings
    assert mixed["score"] == "33.33" and re.fullmatch(r"\(-\d+\.\d\d, \+\d+\.\d\d\)", mixed["CI"])
    assert rows[0]["CI"] == "(-0.00, +0.00)" and rows[0]["date"] == time.strftime("%Y-%m-%d")
    assert mixed["avg_tokens"] == ""  # no answer files given: unknown, where show_result would write 0


def test_v2_judgments_score_per_category_against_each_baseline(tmp_path):
    d = tmp_path / "model_judgment" / "gpt-4.1"
    _judgments(d, "v2", "m", lambda i: ("B>A", "A>B") if i < 3 else ("A>B", "B>A"), category="hard_prompt",
               baseline="o3-mini-2025-01-31")  # fmt: skip
    cw = tmp_path / "cw"
    _judgments(cw, "v2", "m", lambda i: ("A=B", None) if i == 0 else ("B>>A", "A>>B"), category="creative_writing",
               baseline="gemini-2.0-flash-001")  # fmt: skip
    with open(d / "m.jsonl", "a") as f:
        f.write((cw / "m.jsonl").read_text().replace('"uid": "q', '"uid": "c'))
    main([f"judgments={d}", "n_bootstrap=10", f"output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "arena_hard" / "results.json").read_text())
    hard = {r["model"]: r["score"] for r in result["categories"]["hard_prompt"]}
    creative = {r["model"]: r["score"] for r in result["categories"]["creative_writing"]}
    assert hard == {"m": pytest.approx(60.0, abs=0.01), "o3-mini-2025-01-31": 50.0}
    assert creative["m"] > 90 and creative["gemini-2.0-flash-001"] == 50.0
    assert (
        result["leaderboard"] == result["categories"]["hard_prompt"]
    )  # the headline, as show_result's default
    assert result["unparsed_games"] == {"m": 1}  # the null game is counted, not dropped
    assert (tmp_path / "out" / "arena_hard" / "leaderboard_creative_writing.csv").exists()
    metrics = {
        json.loads(line)["metric"] for line in (tmp_path / "out" / "arena_hard" / "scores.jsonl").open()
    }
    assert metrics == {"hard_prompt_score", "creative_writing_score"}


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


def _v2_answer(uid, model, text, n):
    """One answer as arena-hard-auto's gen_answer.py writes it since v2.0."""
    meta = {"token_len": n, "header_count": {f"h{i}": 0 for i in range(1, 7)},
            "list_count": {"ordered": 0, "unordered": 0}, "bold_count": {"**": 0, "__": 0}}  # fmt: skip
    return {"uid": uid, "ans_id": "ndKLaFQXbU4eujaZBGjGZJ", "model": model, "tstamp": 1744155079.1,
            "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": {"answer": text}}],
            "metadata": meta}  # fmt: skip


def test_embedded_judge_on_v2_files_per_category_and_a_cached_rerun(embedded_path, tmp_path):
    # arena-hard-auto v2.0's own layouts: questions {uid, category, subcategory, prompt}, answers {uid, messages}
    questions = tmp_path / "question.jsonl"
    asks = [("q0", "hard_prompt", "What is 2+2?"), ("q1", "creative_writing", "Write a line about the sea.")]
    questions.write_text("".join(json.dumps({"uid": u, "category": c, "subcategory": c, "prompt": p}) + "\n"
                                 for u, c, p in asks))  # fmt: skip
    answers = tmp_path / "data" / "model_answer"
    answers.mkdir(parents=True)
    for base in ("o3-mini-2025-01-31", "gemini-2.0-flash-001"):
        (answers / f"{base}.jsonl").write_text(
            "".join(json.dumps(_v2_answer(u, base, "I do not know.", 5)) + "\n" for u, _, _ in asks)
        )
    generate([f"model={embedded_path}", "name=smol", "bench=arena_hard_v2", f"questions={questions}",
              "max_tokens=12", f"output_dir={tmp_path / 'gen'}"])  # fmt: skip
    (answers / "smol.jsonl").write_text((tmp_path / "gen" / "model_answer" / "smol.jsonl").read_text())
    args = [f"answers={answers}", f"questions={questions}", "bench=arena_hard_v2", f"judge.model={embedded_path}",
            "judge.max_tokens=6", 'judge.prefill="My final verdict is: [["', "n_bootstrap=10",
            "category_baselines={hard_prompt: o3-mini-2025-01-31, creative_writing: gemini-2.0-flash-001}"]  # fmt: skip
    main(args)
    judgments = tmp_path / "data/arena_hard/model_judgment/SmolLM2-135M-Instruct/smol.jsonl"
    judged = [json.loads(line) for line in judgments.open()]
    assert [set(j) for j in judged] == [{"uid", "category", "judge", "model", "baseline", "games"}] * 2
    assert [(j["uid"], j["baseline"]) for j in judged] == [
        ("q0", "o3-mini-2025-01-31"),
        ("q1", "gemini-2.0-flash-001"),
    ]
    assert all(
        set(g) >= {"score", "judgment", "prompt"} and "answer" in g["judgment"]
        for j in judged
        for g in j["games"]
    )
    (hard1, hard2), (creative1, _) = judged[0]["games"], judged[1]["games"]
    assert (
        hard1["prompt"][0]["content"] == JUDGE_SYSTEM and creative1["prompt"][0]["content"] == CREATIVE_SYSTEM
    )
    shown = lambda game: game["prompt"][1]["content"]  # noqa: E731  game 1: the baseline is A; game 2: B
    assert (
        shown(hard1).index("I do not know.")
        < shown(hard1).index("Assistant B's Answer")
        < shown(hard2).index("I do not know.")
    )
    result = json.loads((tmp_path / "data" / "arena_hard" / "results.json").read_text())
    scored = [
        *result.get("categories", {"hard_prompt": result["leaderboard"]}),
        *result.get("unscored_categories", []),
    ]
    assert sorted(scored) == ["creative_writing", "hard_prompt"]
    assert (
        result["judge_calls"]["calls"] >= 4 and sum(result["unparsed_games"].values()) < 4
    )  # labels came back
    board = {r["model"]: r for r in result["leaderboard"]}
    if "smol" in board:
        assert (
            board["o3-mini-2025-01-31"]["score"] == 50.0 and board["o3-mini-2025-01-31"]["avg_tokens"] == 5.0
        )
        assert 0 < board["smol"]["avg_tokens"] <= 12

    main([*args, "layout=v0.1"])  # re-running the finished evaluation: every judgment comes from the cache
    again = json.loads((tmp_path / "data" / "arena_hard" / "results.json").read_text())
    assert again["judge_calls"]["calls"] == 0 and again["leaderboard"] == result["leaderboard"]
    assert [set(json.loads(line)) for line in judgments.open()] == [
        {"question_id", "model", "judge", "games"}
    ] * 2

    lines = (answers / "smol.jsonl").read_text().splitlines()
    (answers / "smol.jsonl").write_text(lines[0] + "\n")  # q1 is no longer answered
    with pytest.raises(
        ConfigError, match=r"smol.jsonl does not match the benchmark's questions: missing question_ids 'q1'"
    ):
        from eval.arena_hard import ArenaHardConfig, load_config, run

        run(load_config("arena_hard", args, ArenaHardConfig)[0])


def test_answers_from_several_directories_and_one_model_twice_is_an_error(tmp_path):
    from eval.arena_hard import answer_files

    for d, models in (("a", ["m1", "gpt-4-0314"]), ("b", ["m2"]), ("c", ["m1"])):
        (tmp_path / d).mkdir()
        for m in models:
            (tmp_path / d / f"{m}.jsonl").write_text("")
    assert sorted(answer_files([str(tmp_path / "a"), str(tmp_path / "b")])) == ["gpt-4-0314", "m1", "m2"]
    with pytest.raises(ConfigError, match=r"answers: m1 has two answer files, .*a/m1.jsonl and .*c/m1.jsonl"):
        answer_files([str(tmp_path / "a"), str(tmp_path / "c")])


def test_the_same_judgments_twice_are_an_error_naming_both_files(tmp_path):
    """A copy of a judgment file under another name was counted twice (80.0 instead of 66.67)."""
    from tests.core.test_output_dir import main as run

    d = tmp_path / "model_judgment" / "gpt-4.1"
    _judgments(
        d, "v2", "m", lambda i: ("B>A", "A>B") if i < 3 else ("A>B", "B>A"), baseline="o3-mini-2025-01-31"
    )
    (d / "m-copy.jsonl").write_text((d / "m.jsonl").read_text())
    code, err = run("eval.arena_hard", f"judgments={d}", "n_bootstrap=10")
    assert code == 2 and "the judgment of m on question 'q0' appears twice:" in err
    assert f"{d / 'm-copy.jsonl'}:1 and {d / 'm.jsonl'}:1" in err


@pytest.mark.integration
def test_v01_intervals_are_pre_v2_show_results_on_the_same_judgments(tmp_path):
    """arena-hard-auto before v2.0 (3071ef9, vendored unchanged in tests/fixtures) seeds numpy with 42 at import
    (utils_math.py:10) and bootstraps with `battles.sample(frac=1.0, replace=True)` (utils_math.py:78), so its
    intervals are reproducible: ours, from the same judgments, are the same numbers."""
    import shutil

    from tests.conftest import ROOT

    work = tmp_path / "arena-hard-auto"
    shutil.copytree(ROOT / "tests" / "fixtures" / "arena_hard_auto_3071ef9", work)
    (work / "leaderboard").mkdir()
    bench = work / "data" / "arena-hard-v0.1"
    d = bench / "model_judgment" / "gpt-4-1106-preview"
    labels = ["A>>B", "A>B", "A=B", "B>A", "B>>A", "A>B", "B>A"]
    for k, model in enumerate(["alpha", "beta"]):  # two models: their files in the order glob lists them
        _judgments(d, "v0.1", model, lambda i, k=k: (labels[(i + k) % 7], labels[(2 * i + k) % 7]), n=40)
    answers = bench / "model_answer"
    answers.mkdir()
    for model in ("alpha", "beta", "gpt-4-0314"):
        rows = [{"question_id": f"q{i}", "model_id": model, "choices": [{"turns": [{"content": "x", "token_len": 10}]}]}
                for i in range(40)]  # fmt: skip
        (answers / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shim = "import numpy as np; np.NAN = np.nan; import runpy; runpy.run_path('show_result.py', run_name='__main__')"
    subprocess.run(
        [sys.executable, "-c", shim, "--output"], cwd=work, check=True, capture_output=True, text=True
    )
    (theirs,) = list((work / "leaderboard").glob("*.csv"))
    with open(theirs) as f:
        official = {r["model"]: r for r in csv.DictReader(f)}

    # the files in the order their glob read them: one row order, one battle order, the same draws
    order = [p.stem for p in (work / "data").glob("arena-hard-v0.1/model_judgment/gpt-4-1106-preview/*jsonl")]
    rows = [json.loads(line) for m in order for line in (d / f"{m}.jsonl").open()]
    ours = {r["model"]: r for r in leaderboard(battles_from_judgments(rows, "gpt-4-0314"), "gpt-4-0314")}
    for model in ("alpha", "beta", "gpt-4-0314"):
        for column in ("score", "rating_q025", "rating_q975"):
            assert ours[model][column] == float(official[model][column]), (
                model,
                column,
            )  # both to 2 decimals

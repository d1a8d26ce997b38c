"""MT-Bench judged as FastChat's llm_judge does it, checked against FastChat's own published files: the questions,
references, answers and GPT-4 judgments in tests/fixtures/mt_bench_0e6d3e4 (see its README), and FastChat's
show_result.py (vendored unchanged there) run on the files we write."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest

from eval.mt_bench import (
    PAIR_FIELDS,
    SINGLE_FIELDS,
    hub_prompt_id,
    load_prompts,
    pair_table,
    parse_rating,
    parse_winner,
    read_answers,
    read_judgments,
    read_questions,
    read_references,
    single_prompt,
    single_table,
)
from tests.conftest import ROOT
from tests.core.test_outages import judge_args
from tests.core.test_output_dir import main

FIXTURE = ROOT / "tests" / "fixtures" / "mt_bench_0e6d3e4"
DATA = FIXTURE / "data" / "mt_bench"
PUBLISHED = DATA / "model_judgment" / "gpt-4_single.jsonl"


def show_result(cwd, *args: str) -> dict[str, dict[str, float]]:
    """FastChat's show_result.py (vendored unchanged; it needs only pandas) run as a program in `cwd`:
    {"First turn" | "Second turn" | "Average": {model: score}} as it prints them (pandas' 6 decimals)."""
    shutil.copy(FIXTURE / "fastchat" / "show_result.py", cwd)
    out = subprocess.run([sys.executable, "show_result.py", *args], cwd=cwd, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return {
        title: {m: float(v) for m, v in re.findall(r"^(\S+)\s+(?:[12]\s+)?([0-9.]+)\s*$", body, re.MULTILINE)}
        for title, body in re.findall(r"########## (.+?) ##########\n(.*?)(?=\n\n|\Z)", out, re.DOTALL)
    }


def test_shipped_files_are_fastchats_and_the_fixture_is_cut_from_them():
    shipped = ROOT / "eval" / "data" / "mt_bench"
    md5 = {p: hashlib.md5((shipped / p).read_bytes()).hexdigest()
           for p in ("judge_prompts.jsonl", "question.jsonl", "reference_answer/gpt-4.jsonl")}  # fmt: skip
    assert md5 == {
        "judge_prompts.jsonl": "d59fdeda2ea87be6141beb0f8ecc6c24",
        "question.jsonl": "9d06961dbdbef8ffa751297a167785bc",
        "reference_answer/gpt-4.jsonl": "7a38d3c9d5253c5660a4972a8b5fa6d4",
    }
    assert (
        hashlib.md5((FIXTURE / "fastchat" / "show_result.py").read_bytes()).hexdigest()
        == "cbb9ab3b8ff2bfee175edff5310d15e1"
    )
    for name in ("question.jsonl", "reference_answer/gpt-4.jsonl"):
        full = set((shipped / name).read_text().splitlines())
        assert set((DATA / name).read_text().splitlines()) <= full
    assert len(read_questions(str(shipped / "question.jsonl"))) == 80


def test_every_published_judgment_has_our_prompt_and_our_rating():
    """All 80 GPT-4 judgment rows: the prompt FastChat chose (judge[1]) and the user prompt it sent are what we
    build from the question, the answer and the reference, byte for byte; the score is what we parse."""
    questions = {str(q["question_id"]): q for q in read_questions(str(DATA / "question.jsonl"))}
    refs = read_references(str(DATA / "reference_answer" / "gpt-4.jsonl"))
    answers = {
        p.stem: read_answers(p, list(questions.values())) for p in (DATA / "model_answer").glob("*.jsonl")
    }
    prompts = load_prompts()
    rows = read_judgments(PUBLISHED)
    assert len(rows) == 80 and {tuple(r) for r in rows} == {SINGLE_FIELDS}
    used = set()
    for r in rows:
        qid = str(r["question_id"])
        name, system, user = single_prompt(
            prompts, questions[qid], answers[r["model"]][qid], refs.get(qid), r["turn"]
        )
        assert (name, user) == (r["judge"][1], r["user_prompt"]), (r["model"], qid, r["turn"])
        assert system == prompts[name]["system_prompt"]
        rating = parse_rating(r["judgment"])
        assert (rating, type(rating)) == (r["score"], type(r["score"])), (r["model"], qid, r["turn"])
        used.add(name)
    assert used == {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    assert sum(isinstance(r["score"], float) for r in rows) == 1  # the one 8.5 stays a float


def test_ratings_are_parsed_as_fastchat_parses_them():
    assert parse_rating("The answer is fine. Rating: [[7]]") == 7
    assert parse_rating("Rating: [[8.5]]") == 8.5 and isinstance(parse_rating("[[8.5]]"), float)
    assert parse_rating("as [3] says ... Rating: [[6]]") == 6  # [[N]] anywhere first, then the backup
    assert parse_rating("Rating: [4]. Also [[x]]") == 4  # the single-bracket backup
    assert parse_rating("first [[2]] then [[9]]") == 2  # the first match
    assert parse_rating("[[11]]") == 11  # no range check, as FastChat
    assert parse_rating("Rating: 7/10") is None and parse_rating("[[ 7 ]]") is None  # FastChat writes -1
    assert parse_rating("[[08]]") == 8  # literal_eval refuses it (FastChat would crash)


@pytest.mark.integration  # runs show_result.py in a subprocess
def test_show_result_numbers_on_the_published_judgments_and_in_the_leaderboard(tmp_path):
    """show_result.py's single-mode numbers for the fixture (computed with its pandas code) are ours, scoring the
    published file through the command; eval.leaderboard shows them with two decimals."""
    expected = json.loads((FIXTURE / "expected_show_result_on_fixture.json").read_text())
    table = {r["model"]: r for r in single_table(read_judgments(PUBLISHED), n_bootstrap=100)}
    for model, e in expected.items():
        got = table[model]
        assert (got["score_turn1"], got["score_turn2"], got["score"]) == pytest.approx(
            (e["turn1"], e["turn2"], e["average"]), abs=1e-12
        )
        assert got["n_judgments"] == e["n"] and got["n_failed"] == 0
        assert got["score_ci"][0] <= got["score"] <= got["score_ci"][1]
    code, err = main("eval.mt_bench", f"judgments={PUBLISHED}", f"output_dir={tmp_path / 'published'}")
    assert code == 0, err
    scores = [json.loads(line) for line in (tmp_path / "published" / "mt_bench" / "scores.jsonl").open()]
    assert {
        (s["model"], s["metric"]): s["value"] for s in scores if s["model"] == "llama2_7b"
    } == pytest.approx(
        {("llama2_7b", "score"): 4.65, ("llama2_7b", "score_turn1"): 5.6, ("llama2_7b", "score_turn2"): 3.7}
    )
    assert {s["benchmark"] for s in scores} == {"mt_bench"} and len(scores) == 12
    # and FastChat's show_result.py itself, on the same file, prints the same 12 numbers
    printed = show_result(tmp_path, "--input-file", str(PUBLISHED))
    ours = {(s["model"], s["metric"]): s["value"] for s in scores}
    for section, metric in (
        ("First turn", "score_turn1"),
        ("Second turn", "score_turn2"),
        ("Average", "score"),
    ):
        assert len(printed[section]) == 4
        for model, value in printed[section].items():
            assert value == pytest.approx(ours[(model, metric)], abs=1e-5)
    code, err = main("eval.leaderboard", f"runs={tmp_path / 'published'}", f"output_dir={tmp_path / 'board'}")
    assert code == 0, err
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    header = board.splitlines()[0]
    assert (
        "mt_bench/score |" in header and "mt_bench/score_turn1" in header and "mt_bench/score_turn2" in header
    )
    assert re.search(r"\| claude-3-5-sonnet-20240620 \| 8\.82 \[\d\.\d\d, \d+\.\d\d\] \| 8\.95 ", board), (
        board
    )


def test_pairwise_verdicts_and_win_rates_are_show_results():
    """Six published pairwise rows (agreeing wins, a tie, disagreeing games, an "error" game): the verdicts we parse
    from each game's judgment and the pairwise-all table are FastChat's."""
    rows = read_judgments(FIXTURE / "pair_example" / "gpt-4_pair.jsonl")
    for r in rows:
        g1, g2 = parse_winner(r["g1_judgment"]), parse_winner(r["g2_judgment"])
        assert ({"A": "model_1", "B": "model_2"}.get(g1, g1) or "error") == r["g1_winner"]
        assert ({"A": "model_2", "B": "model_1"}.get(g2, g2) or "error") == r["g2_winner"]
    expected = json.loads((FIXTURE / "pair_example" / "expected_show_result_pairwise_all.json").read_text())
    table = {r.pop("model"): r for r in pair_table(rows, None, n_bootstrap=100)}
    assert {
        m: {k: v for k, v in r.items() if k != "win_rate_adjusted_ci"} for m, r in table.items()
    } == expected


def _write_answers(d, model, texts):
    """A FastChat answer file (gen_model_answer.py's fields) of `model`: {question_id: [turn 1, turn 2]}."""
    d.mkdir(exist_ok=True)
    rows = [{"question_id": q, "answer_id": f"{model}-{q}", "model_id": model,
             "choices": [{"index": 0, "turns": t}], "tstamp": 0.0} for q, t in texts.items()]  # fmt: skip
    (d / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / f"{model}.jsonl"


def test_embedded_judge_end_to_end_reruns_judge_only_what_changed_and_show_result_agrees(
    embedded_path, tmp_path
):
    """The real embedded judge grades two models on a writing question (82) and a math one (112, judged against
    GPT-4's reference), both turns (short answers: a 135M judge on a shared CPU reads ~100 tokens/s). FastChat's own
    show_result.py, run on the file we wrote from its default path, prints the averages of our scores.jsonl. A
    re-run judges nothing; an edited answer is judged again, alone."""
    answers = tmp_path / "answers"
    _write_answers(answers, "alpha", {82: ["Dear Sam, please review my report.", "It is clear."],
                                      112: ["$6000.", "$2000 in year three."]})  # fmt: skip
    _write_answers(answers, "beta", {82: ["Hi, can you look at my report?", "It is short."],
                                     112: ["$8000 in total.", "$3000."]})  # fmt: skip
    data = tmp_path / "work" / "data"
    args = [f"answers={answers}", "question_ids=[82,112]", f"judge.model={embedded_path}", "judge.max_tokens=3",
            'judge.prefill="Rating: [["', "n_bootstrap=20", f"output_dir={data}"]  # fmt: skip
    code, err = main("eval.mt_bench", *args)
    assert code == 0, err
    judge = "SmolLM2-135M-Instruct"
    path = data / "mt_bench" / "model_judgment" / f"{judge}_single.jsonl"
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == 8 and all(tuple(r) == SINGLE_FIELDS for r in rows)
    assert {(r["question_id"], r["turn"], r["judge"][1]) for r in rows} == {
        (82, 1, "single-v1"), (82, 2, "single-v1-multi-turn"),
        (112, 1, "single-math-v1"), (112, 2, "single-math-v1-multi-turn"),
    }  # fmt: skip
    ref = read_references(str(DATA / "reference_answer" / "gpt-4.jsonl"))["112"]
    assert all(ref[0] in r["user_prompt"] for r in rows if r["question_id"] == 112)
    assert all(ref[1] in r["user_prompt"] for r in rows if r["question_id"] == 112 and r["turn"] == 2)
    assert all(r["judge"][0] == judge and r["judgment"].startswith("Rating: [[") for r in rows)
    assert all(isinstance(r["score"], (int, float)) for r in rows)
    result = json.loads((data / "mt_bench" / "results.json").read_text())
    assert result["judged_now"] == 8 and result["judge_calls"]["calls"] == 8
    scores = {
        (s["model"], s["metric"]): s for s in map(json.loads, (data / "mt_bench" / "scores.jsonl").open())
    }
    valid = [r for r in rows if r["score"] != -1]
    for model in {r["model"] for r in valid}:
        mine = [r["score"] for r in valid if r["model"] == model]
        assert scores[(model, "score")]["value"] == pytest.approx(sum(mine) / len(mine))

    # FastChat's show_result.py from the directory above data/, reading its default path for this judge
    printed = show_result(tmp_path / "work", "--judge-model", judge)
    assert set(printed["Average"]) == {m for m, metric in scores if metric == "score"}
    for section, metric in (
        ("First turn", "score_turn1"),
        ("Second turn", "score_turn2"),
        ("Average", "score"),
    ):
        for model, value in printed[section].items():
            assert value == pytest.approx(scores[(model, metric)]["value"], abs=1e-5)

    code, err = main("eval.mt_bench", *args)  # nothing changed: nothing judged, every row as it was
    assert code == 0, err
    result = json.loads((data / "mt_bench" / "results.json").read_text())
    assert result["judged_now"] == 0 and result["reused"] == 8
    assert result["judge_calls"] == {"calls": 0, "cached": 0, "unparsed": 0, "engine_errors": 0}
    assert [json.loads(line) for line in path.open()] == rows

    _write_answers(answers, "alpha", {82: ["Dear Sam, please review my report.", "It is clear and short."],
                                      112: ["$6000.", "$2000 in year three."]})  # fmt: skip
    code, err = main("eval.mt_bench", *args)
    assert code == 0, err
    result = json.loads((data / "mt_bench" / "results.json").read_text())
    assert result["judged_now"] == 1 and result["judge_calls"]["calls"] == 1  # turn 2 of (alpha, 82) only
    again = [json.loads(line) for line in path.open()]
    changed = [r for r in again if r not in rows]
    assert [(r["model"], r["question_id"], r["turn"]) for r in changed] == [("alpha", 82, 2)]
    assert "It is clear and short." in changed[0]["user_prompt"] and len(again) == 8


def test_an_outage_writes_no_judgment_exits_3_and_the_rerun_judges_only_the_missing(tmp_path, embedded_path,
                                                                                     table_server, monkeypatch):  # fmt: skip
    """The judge's server fails (HTTP 500) the prompts that show beta's answer to question 81: those two judgments
    (both turns) are written nowhere, the command exits 3, and the re-run, once the server answers them, asks for
    exactly those two and keeps the other six rows as they were."""
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    answers = tmp_path / "answers"
    _write_answers(
        answers, "alpha", {81: ["A short blog post.", "A post in A words."], 111: ["Area 3.", "Radius 2."]}
    )
    _write_answers(answers, "beta", {81: ["BROKEN post.", "Another."], 111: ["Area 2.", "Radius 1."]})
    args = [f"answers={answers}", "question_ids=[81,111]", "judge.max_tokens=16", "n_bootstrap=20",
            f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    # each prompt that shows "BROKEN post." fails the first time it is asked, then is answered
    flaky = table_server([["BROKEN post.", {"status": 500, "times": 1, "then": "Fine. Rating: [[7]]"}],
                          ["", "Fine. Rating: [[7]]"]])  # fmt: skip
    code, err = main("eval.mt_bench", *args, *judge_args(flaky, embedded_path))
    assert code == 3 and "2 of 8 MT-Bench judgments have no verdict because the engine failed" in err, err
    path = tmp_path / "out" / "mt_bench" / "model_judgment" / "SmolLM2-135M-Instruct_single.jsonl"
    first = [json.loads(line) for line in path.open()]
    assert len(first) == 6 and all(r["score"] == 7 for r in first)
    assert not [r for r in first if r["model"] == "beta" and r["question_id"] == 81]
    assert not (tmp_path / "out" / "mt_bench" / "scores.jsonl").exists()

    code, err = main("eval.mt_bench", *args, *judge_args(flaky, embedded_path))  # the server is back
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "mt_bench" / "results.json").read_text())
    assert result["judged_now"] == 2 and result["judge_calls"]["calls"] == 2 and result["reused"] == 6
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == 8 and all(r in rows for r in first)  # the six kept as written (tstamps included)
    assert {(r["model"], r["score"]) for r in result["leaderboard"]} == {("alpha", 7.0), ("beta", 7.0)}
    # one model only: nothing to judge, and the other model's rows stay in the judge's file
    code, err = main("eval.mt_bench", *args, *judge_args(flaky, embedded_path), "models=[alpha]")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "mt_bench" / "results.json").read_text())["judged_now"] == 0
    kept = [json.loads(line) for line in path.open()]
    assert len(kept) == 8 and all(r in kept for r in rows)


def test_pairwise_both_orders_against_a_baseline_as_show_result_scores_it(tmp_path, embedded_path, table_server,
                                                                            monkeypatch):  # fmt: skip
    """Pairwise mode over HTTP: a judge that prefers whichever side shows alpha's answer (in either position, both
    turns, the math prompts included) gives alpha a win in both games of every question; FastChat's show_result.py
    in pairwise-baseline mode reads our _pair.jsonl and agrees with scores.jsonl."""
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    answers = tmp_path / "answers"
    _write_answers(answers, "alpha", {81: ["GOOD post.", "GOOD again."], 111: ["GOOD area.", "GOOD radius."]})
    _write_answers(answers, "beta", {81: ["Weak post.", "Weak again."], 111: ["Weak area.", "Weak radius."]})
    server = table_server([["Assistant A's Answer]\nGOOD", "Verdict: [[A]]"], ["### Assistant A:\nGOOD", "[[A]]"],
                           ["", "Verdict: [[B]]"]])  # fmt: skip
    data = tmp_path / "work" / "data"
    args = [f"answers={answers}", "mode=pairwise", "baseline=beta", "question_ids=[81,111]", "judge.max_tokens=8",
            "n_bootstrap=20", f"output_dir={data}", *judge_args(server, embedded_path)]  # fmt: skip
    code, err = main("eval.mt_bench", *args)
    assert code == 0, err
    path = data / "mt_bench" / "model_judgment" / "SmolLM2-135M-Instruct_pair.jsonl"
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == 4 and all(tuple(r) == PAIR_FIELDS for r in rows)
    assert {(r["question_id"], r["turn"], r["judge"][1]) for r in rows} == {
        (81, 1, "pair-v2"), (81, 2, "pair-v2-multi-turn"), (111, 1, "pair-math-v1"),
        (111, 2, "pair-math-v1-multi-turn"),
    }  # fmt: skip
    assert all((r["model_1"], r["model_2"], r["g1_winner"], r["g2_winner"]) == ("alpha", "beta", "model_1", "model_1")
               for r in rows)  # fmt: skip
    assert all(r["g1_user_prompt"].index("GOOD") < r["g1_user_prompt"].index("Weak") for r in rows)
    assert all(r["g2_user_prompt"].index("Weak") < r["g2_user_prompt"].index("GOOD") for r in rows)
    (score,) = [json.loads(line) for line in (data / "mt_bench" / "scores.jsonl").open()]
    assert (score["model"], score["metric"], score["value"]) == ("alpha", "win_rate_vs_beta", 100.0)
    out = subprocess.run([sys.executable, str(FIXTURE / "fastchat" / "show_result.py"), "--mode", "pairwise-baseline",
                          "--baseline-model", "beta", "--input-file", str(path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r"^alpha\s+4\s+0\s+0\s+1\.0\s+0\.0\s+1\.0\s*$", out, re.MULTILINE), out


def test_bad_inputs_are_one_line_naming_the_file_and_line(tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    code, err = main("eval.mt_bench", f"answers={tmp_path / 'nowhere'}", out)
    assert code == 2 and err.strip() == f"error: answers: no such file or directory '{tmp_path / 'nowhere'}'"

    good = _write_answers(tmp_path / "a", "m", {81: ["x", "y"], 999: ["x", "y"]})
    code, err = main("eval.mt_bench", f"answers={good}", out)
    assert code == 2 and err.count("\n") == 1 and f"{good}:2: question_id 999 is not a question" in err

    good.write_text(good.read_text().splitlines()[0] + "\n" + '{"question_id": 82, "choices": [\n')
    code, err = main("eval.mt_bench", f"answers={good}", out)
    assert code == 2 and err.count("\n") == 1 and f"{good}:2: not valid JSON" in err

    _write_answers(tmp_path / "a", "m", {81: ["x", "y"], 82: ["only one turn"]})
    code, err = main("eval.mt_bench", f"answers={good}", "question_ids=[81,82]", out)
    assert code == 2 and f"{good}: question 82 has 2 turns, its answer 1" in err
    code, err = main("eval.mt_bench", f"answers={good}", "question_ids=[81,83]", out)
    assert code == 2 and f"{good}: no answer to question(s) 83" in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were read


def test_answers_made_from_the_hubs_questions_are_matched_by_its_prompt_id(tmp_path):
    """HuggingFaceH4/mt_bench_prompts (eval.generate's default) numbers a question by a hash of its text; an answer
    under that id is the FastChat question with the same text."""
    questions = read_questions(str(DATA / "question.jsonl"))
    q81 = next(q for q in questions if q["question_id"] == 81)
    path = _write_answers(tmp_path / "a", "m", {int(hub_prompt_id(q81["turns"])): ["x", "y"]})
    assert read_answers(path, questions) == {"81": ["x", "y"]}

"""eval.leaderboard: scores.jsonl files from several runs -> one table (Markdown, CSV) and a bar chart."""

import csv

import pytest

from core.config import ConfigError
from eval.leaderboard import build, main
from eval.scores import score_row, write_scores


def test_one_row_per_model_and_a_column_per_metric(tmp_path, capsys):
    write_scores(tmp_path / "magpie" / "alpaca_eval", [
        score_row("magpie", "alpaca_eval", "lc_win_rate", 22.66, 21.0, 24.3),
        score_row("magpie", "alpaca_eval", "win_rate", 23.08, 21.5, 24.7),
    ])  # fmt: skip
    write_scores(tmp_path / "magpie" / "arena_hard", [
        score_row("magpie", "arena_hard", "score", 15.0, 13.2, 16.9),
        score_row("gpt-4-0314", "arena_hard", "score", 50.0, 50.0, 50.0),
    ])  # fmt: skip
    write_scores(tmp_path / "sharegpt", [
        score_row("sharegpt", "alpaca_eval", "lc_win_rate", 9.73, 8.5, 11.0),
        score_row("sharegpt", "mmlu", "acc", 63.1),  # no interval
        score_row("gpt-4-0314", "arena_hard", "score", 50.0, 50.0, 50.0),  # the same baseline twice is fine
    ])  # fmt: skip
    out = tmp_path / "board"
    main([f"runs={tmp_path / 'magpie'},{tmp_path / 'sharegpt'}", f"output_dir={out}"])

    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0] == "| model | alpaca_eval/lc_win_rate | alpaca_eval/win_rate | arena_hard/score | mmlu/acc |"
    assert md[2] == "| magpie | 22.7 [21.0, 24.3] | 23.1 [21.5, 24.7] | 15.0 [13.2, 16.9] | - |"
    assert md[3] == "| sharegpt | 9.7 [8.5, 11.0] | - | - | 63.1 |"
    assert md[4].startswith("| gpt-4-0314 | - | - | 50.0 [50.0, 50.0] |")
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["model"] for r in rows] == ["magpie", "sharegpt", "gpt-4-0314"]
    assert float(rows[0]["alpaca_eval/lc_win_rate_ci_low"]) == 21.0 and rows[1]["mmlu/acc_ci_low"] == ""
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "magpie" in capsys.readouterr().out


def test_conflicting_or_missing_scores_fail_clearly(tmp_path):
    write_scores(tmp_path / "a", [score_row("m", "arena_hard", "score", 10.0)])
    write_scores(tmp_path / "b", [score_row("m", "arena_hard", "score", 12.0)])
    with pytest.raises(
        ConfigError,
        match=r"m has two different arena_hard/score scores: 10.0 \[None, None\] in .*a/scores.jsonl",
    ):
        build([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    # The same value with another interval: which interval showed depended on the order of runs=
    write_scores(tmp_path / "c", [score_row("m", "pairwise", "win_rate", 50.0, 45.0, 55.0)])
    write_scores(tmp_path / "d", [score_row("m", "pairwise", "win_rate", 50.0, 40.0, 60.0)])
    for order in (["c", "d"], ["d", "c"]):
        with pytest.raises(ConfigError, match=r"two different pairwise/win_rate scores: 50.0 \[4"):
            build([str(tmp_path / o) for o in order], str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"runs: no scores.jsonl under"):
        build([str(tmp_path / "empty")], str(tmp_path / "out"))


def test_writers_replace_their_own_rows_only(tmp_path):
    write_scores(
        tmp_path, [score_row("m", "alpaca_eval", "win_rate", 10.0), score_row("m", "arena_hard", "score", 5)]
    )
    write_scores(tmp_path, [score_row("m", "alpaca_eval", "win_rate", 11.0)])
    from eval.scores import read_scores

    rows = {(r["benchmark"], r["metric"]): r["value"] for r in read_scores(tmp_path / "scores.jsonl")}
    assert rows == {("alpaca_eval", "win_rate"): 11.0, ("arena_hard", "score"): 5.0}


def test_one_table_writer_for_every_evaluation(tmp_path):
    """eval.scores.write_table: the CSV and Markdown that eval.pairwise, eval.leaderboard and eval.arena_hard write."""
    from eval.scores import write_table

    rows = [{"model": 'a, "b"', "score": 12.5, "extra": "left out"}, {"model": "c", "score": None}]
    csv_text = write_table(tmp_path / "t.csv", rows, ["model", "score", "CI"])
    assert (
        csv_text
        == 'model,score,CI\r\n"a, ""b""",12.5,\r\nc,,\r\n'
        == (tmp_path / "t.csv").read_bytes().decode()
    )
    md = write_table(tmp_path / "t.md", rows, ["model", "score"])
    assert (
        md == '| model | score |\n|---|---|\n| a, "b" | 12.5 |\n| c |  |\n' == (tmp_path / "t.md").read_text()
    )
    with pytest.raises(ValueError, match=r"\.csv or \.md"):
        write_table(tmp_path / "t.txt", rows, ["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]  # atomic: no temporary files left

"""Output directories: overwrite moves only our own previous run aside, never an input or someone else's files, and
every file we write gets the mode the umask gives (as `open()` would), not mkstemp's private 0600."""

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError
from core.rundir import prepare_output_dir, release_output_dir


def conversations(path: Path, n: int = 3) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path / "train-00000.parquet")
    return path


def main(module: str, *args: str) -> tuple[int, str]:
    """Run a command's `main` in this process: (exit code, what it printed to stderr)."""
    import contextlib
    import importlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            importlib.import_module(module).main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    for arg in args:  # let the next command in this process take the directory
        if arg.startswith("output_dir="):
            release_output_dir(arg.partition("=")[2])
    return code, err.getvalue()


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` and its bytes (the lock file aside: it stays where it is)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# ------------------------------------------------------------------------------------------------ overwrite


def test_overwrite_never_touches_a_directory_we_did_not_write(tmp_path):
    precious = tmp_path / "thesis"
    (precious / "chapters").mkdir(parents=True)
    (precious / "chapters" / "one.tex").write_text("years of work")
    (precious / "notes.txt").write_text("more")
    before = tree(precious)
    code, err = main("data_synth.select", f"input={conversations(tmp_path / 'data')}", f"output_dir={precious}",
                     "overwrite=true")  # fmt: skip
    assert (
        code == 2
        and "holds no config.yaml written by data_synth.select" in err
        and "nothing was moved" in err
    )
    assert tree(precious) == before and not list(tmp_path.glob("thesis.old-*"))
    code, err = main("data_synth.select", f"input={tmp_path / 'data'}", f"output_dir={precious}")
    assert code == 2 and "no config.yaml" in err and "overwrite=true" not in err  # never suggested for it


def test_overwrite_of_the_current_directory_is_refused(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "core").mkdir(parents=True)
    (checkout / "core" / "io.py").write_text("code")
    data = conversations(tmp_path / "data")
    monkeypatch.chdir(checkout)
    code, err = main("data_synth.select", f"input={data}", "output_dir=.", "overwrite=true")
    assert code == 2 and "nothing was moved" in err
    assert (checkout / "core" / "io.py").read_text() == "code"


def test_overwrite_refuses_another_commands_run(tmp_path):
    data = conversations(tmp_path / "data")
    assert main("data_synth.select", f"input={data}", f"output_dir={tmp_path / 'sel'}")[0] == 0
    before = tree(tmp_path / "sel")
    code, err = main("data_synth.report", f"input={data}", f"output_dir={tmp_path / 'sel'}", "overwrite=true")
    assert code == 2 and "holds a run of data_synth.select, not of data_synth.report" in err
    assert tree(tmp_path / "sel") == before


def test_overwrite_moves_our_previous_run_aside_symlinks_and_all(tmp_path):
    data = conversations(tmp_path / "data")
    out = tmp_path / "sel"
    assert main("data_synth.select", f"input={data}", f"output_dir={out}")[0] == 0
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    (out / "link").symlink_to(target)  # a symlink inside the directory being overwritten
    before = tree(out)
    code, err = main("data_synth.select", f"input={data}", f"output_dir={out}", "top_k=1", "overwrite=true")
    assert code == 0, err
    (aside,) = tmp_path.glob("sel.old-*")
    assert f"moved the previous run aside to {aside}" in err
    assert tree(aside) == before and (aside / "link").is_symlink()  # moved whole, the link as a link
    assert (target / "keep.txt").read_text() == "not ours"
    assert pq.read_table(out / "train-00000.parquet").num_rows == 1  # the new run
    assert not (out / "link").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_an_output_dir_that_is_or_holds_the_input_is_refused(tmp_path, where, overwrite):
    out = tmp_path / "D"
    data = conversations(out if where == "same" else out / "tagged")
    before = tree(out)
    code, err = main("data_synth.select", f"input={data}", f"output_dir={out}", f"overwrite={overwrite}")
    verb = "is" if where == "same" else "holds"
    assert code == 2 and f"output_dir {out} {verb} this run's input {data}" in err, err
    assert tree(out) == before and not list(tmp_path.glob("D.old-*"))


def test_a_model_under_the_output_dir_is_an_input_too(tmp_path):
    (tmp_path / "sft" / "merged").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds this run's input"):
        prepare_output_dir(
            tmp_path / "sft", {}, command="train/sft.py", inputs=("embedded", tmp_path / "sft" / "merged")
        )


def test_a_dangling_symlink_as_output_dir_is_named(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"is a symlink to .*gone, which does not exist"):
        prepare_output_dir(tmp_path / "out", {}, command="test")


def test_the_leaderboard_never_replaces_another_runs_tables(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    (run / "config.yaml").write_text("# magpie-harness: written by eval.pairwise; re-run ...\nmodels: {}\n")
    row = {
        "model": "m",
        "benchmark": "pairwise",
        "metric": "win_rate",
        "value": 50.0,
        "ci_low": 40.0,
        "ci_high": 60.0,
    }
    (run / "scores.jsonl").write_text(json.dumps(row) + "\n")
    (run / "leaderboard.md").write_text("the pairwise run's own table")
    code, err = main("eval.leaderboard", f"runs={run}", f"output_dir={run}")
    assert code == 2 and "is this run's input" in err
    code, err = main("eval.leaderboard", f"runs={tmp_path}", f"output_dir={run}")
    assert code == 2 and "holds a run of eval.pairwise, not of eval.leaderboard" in err
    assert (run / "leaderboard.md").read_text() == "the pairwise run's own table"
    board = tmp_path / "board"
    assert main("eval.leaderboard", f"runs={run}", f"output_dir={board}")[0] == 0
    assert (
        main("eval.leaderboard", f"runs={tmp_path / 'eval'}", f"output_dir={board}")[0] == 0
    )  # its own: rebuilt


# --------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_we_write_follow_the_umask(tmp_path, mask):
    from core.io import atomic_write_json
    from core.judge import JudgeCache
    from core.shards import ShardWriter, write_chunk
    from experiments.sweep import set_status

    old = os.umask(mask)
    try:
        data = conversations(tmp_path / "data")
        assert main("data_synth.select", f"input={data}", f"output_dir={tmp_path / 'sel'}")[0] == 0
        row = {"model": "m", "benchmark": "b", "metric": "x", "value": 1.0, "ci_low": None, "ci_high": None}
        (tmp_path / "sel" / "scores.jsonl").write_text(json.dumps(row) + "\n")
        assert (
            main("eval.leaderboard", f"runs={tmp_path / 'sel'}", f"output_dir={tmp_path / 'board'}")[0] == 0
        )
        ShardWriter(tmp_path / "shards", rows_per_shard=1).add([{"x": 1}])
        write_chunk(tmp_path / "chunks", 0, pa.table({"x": [1]}), {"k": 0})
        write_chunk(tmp_path / "chunks", 1, pa.table({"x": pa.array([], pa.int64())}), {"k": 1})
        atomic_write_json(tmp_path / "new" / "deep" / "manifest.json", {})
        JudgeCache(tmp_path / "cache.sqlite")
        set_status(tmp_path / "stage", state="done")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != "data"]
    assert len(files) >= 12
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~mask}  # fmt: skip
    assert not wrong
    dirs = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask for d in dirs)


def test_runs_from_before_the_header_are_still_ours_and_foreign_yaml_is_one_line(tmp_path):
    data = conversations(tmp_path / "data")
    legacy = tmp_path / "legacy"
    assert main("data_synth.select", f"input={data}", f"output_dir={legacy}")[0] == 0
    cfg = legacy / "config.yaml"
    cfg.write_text(
        cfg.read_text().split("\n", 1)[1]
    )  # as an older version wrote it: no first line naming the command
    assert main("data_synth.select", f"input={data}", f"output_dir={legacy}")[0] == 0  # resumes
    cfg.write_text(cfg.read_text().split("\n", 1)[1])
    code, err = main(
        "data_synth.select", f"input={data}", f"output_dir={legacy}", "top_k=1", "overwrite=true"
    )
    assert code == 0 and "moved the previous run aside" in err  # its keys are select's: ours to move
    board = tmp_path / "board"
    board.mkdir()
    (board / "leaderboard.md").write_text("old")  # a leaderboard from before config.yaml existed
    row = {"model": "m", "benchmark": "b", "metric": "x", "value": 1.0, "ci_low": None, "ci_high": None}
    (legacy / "scores.jsonl").write_text(json.dumps(row) + "\n")
    assert main("eval.leaderboard", f"runs={legacy}", f"output_dir={board}")[0] == 0
    hydra = tmp_path / "hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text("model: ${oc.env:NOPE}\ntrainer: {max_epochs: 3}\n")
    (hydra / "ckpt.pt").write_text("someone else's")
    code, err = main("data_synth.select", f"input={data}", f"output_dir={hydra}")
    assert code == 2 and "holds a config.yaml that is not data_synth.select's" in err


def test_overwrite_of_the_current_directory_when_it_is_our_run(tmp_path, monkeypatch):
    data = conversations(tmp_path / "data")
    run = tmp_path / "run"
    assert main("data_synth.select", f"input={data}", f"output_dir={run}")[0] == 0
    monkeypatch.chdir(run)
    code, err = main("data_synth.select", f"input={data}", "output_dir=.", "top_k=1", "overwrite=true")
    assert code == 0, err
    (aside,) = tmp_path.glob("run.old-*")
    assert (
        pq.read_table(aside / "train-00000.parquet").num_rows == 3
        and pq.read_table(run / "train-00000.parquet").num_rows == 1
    )


def test_the_leaderboard_skips_runs_moved_aside(tmp_path):
    row = {"model": "m", "benchmark": "b", "metric": "x", "value": 1.0, "ci_low": None, "ci_high": None}
    for name, value in (("eval", 1.0), ("eval.old-20260101-120000", 2.0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "scores.jsonl").write_text(json.dumps({**row, "value": value}) + "\n")
    code, err = main("eval.leaderboard", f"runs={tmp_path / 'runs'}", f"output_dir={tmp_path / 'board'}")
    assert code == 0, err
    assert "| m | 1.0 |" in (tmp_path / "board" / "leaderboard.md").read_text()


def test_a_run_written_under_a_commands_old_name_is_a_run_of_the_new_one(tmp_path):
    from core.rundir import HEADER, owner

    (tmp_path / "config.yaml").write_text(HEADER.format(command="data_synth.backtranslate") + "name: x\n")
    assert owner(tmp_path, "experiments.humpback", {"name": "x"}) == "experiments.humpback"

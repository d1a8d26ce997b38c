"""Sweeps: axes, cell names, stage sharing, dry run, local and SLURM executors, resume, failure isolation, results."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, parse_config
from eval.scores import score_row, write_scores
from experiments.sweep import (
    Stage,
    SweepConfig,
    cell_name,
    cell_state,
    cells,
    command_line,
    resolve,
    run,
    status,
)


def rows(path, n=12):
    data = [{"messages": [{"role": "user", "content": f"question {i}?" + (":" if i % 4 == 0 else "")},
                          {"role": "assistant", "content": "x" * (10 * i + 1)}], "score": float(i)} for i in range(n)]  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(data), path / "train-00000.parquet")
    return path


def selects(tmp_path, **kw) -> SweepConfig:
    """Two chained selections of a small file: no model, so the executors are tested in seconds."""
    first = Stage(
        name="first", command="select", overrides={"input": str(rows(tmp_path / "data")), "sort_by": "score"}
    )
    second = Stage(name="second", command="select", overrides={"input": "{first}", "top_k": 3})
    return SweepConfig(name="t", stages=[first, second], output_dir=str(tmp_path / "sweep"), **kw)


def test_grid_and_zip_axes_expand_and_names_are_stable():
    cfg = SweepConfig(stages=[Stage(name="sft", command="sft"), Stage(name="select", command="select")],
                      grid={"sft.learning_rate": [1e-4, 3e-4], "sft.seed": [1, 2]},
                      zip=[{"select.recipe": ["a", "b", "c"], "select.top_k": [10, 20, 30]}])  # fmt: skip
    combos = cells(cfg)
    assert len(combos) == 2 * 2 * 3  # the zip block varies together: 3 points, not 9
    assert {(c["select.recipe"], c["select.top_k"]) for c in combos} == {("a", 10), ("b", 20), ("c", 30)}
    names = [cell_name(c) for c in combos]
    assert len(set(names)) == 12 and names == [cell_name(c) for c in cells(cfg)]  # stable across runs
    assert names[0].startswith("learning_rate=0.0001,seed=1,recipe=a,top_k=10-")
    with pytest.raises(ConfigError, match=r"zip\[0\]: its lists must have one length"):
        cells(SweepConfig(stages=cfg.stages, zip=[{"select.top_k": [1, 2], "select.recipe": ["a"]}]))
    with pytest.raises(ConfigError, match=r"axis 'train.lr': expected `cell` \(a label\) or <stage>.<key>"):
        cells(SweepConfig(stages=cfg.stages, grid={"train.lr": [1]}))


def test_stages_refer_to_earlier_outputs_and_identical_stages_are_shared(tmp_path):
    cfg = selects(tmp_path, grid={"second.top_k": [2, 5]})
    a, b = (resolve(cfg, c, tmp_path / "sweep") for c in cells(cfg))
    assert a[0]["dir"] == b[0]["dir"]  # `first` is the same in both cells: one directory, run once
    assert a[1]["dir"] != b[1]["dir"] and a[1]["overrides"]["input"] == str(a[0]["dir"])
    assert command_line(a[1])[-1] == f"output_dir={a[1]['dir']}" and "top_k=2" in command_line(a[1])
    bad = SweepConfig(
        stages=[
            Stage(name="x", command="select", overrides={"input": "{y}"}),
            Stage(name="y", command="select"),
        ]
    )
    with pytest.raises(ConfigError, match=r"stage 'x' refers to \['y'\], which come later"):
        resolve(bad, {}, tmp_path)


def test_an_edited_recipe_is_a_new_stage_groups_nest_and_mapping_keys_refer(tmp_path):
    """A stage's directory hashes its recipe's content (an edited recipe is not skipped as finished), `group` puts it
    in a subdirectory, and `{stage}` is resolved in a mapping's keys too (a mixture's sources)."""
    recipe = tmp_path / "keep.yaml"
    recipe.write_text("top_k: 3\n")
    stages = [Stage(name="a", command="select", recipe=str(recipe), group="iter1"),
              Stage(name="b", command="sft", overrides={"dataset_mixture": {"{a}": 1.0}})]  # fmt: skip
    cfg = SweepConfig(name="t", stages=stages, output_dir=str(tmp_path / "sweep"))
    a, b = resolve(cfg, {}, tmp_path / "sweep")
    assert a["dir"].parent == tmp_path / "sweep" / "stages" / "iter1"
    assert b["overrides"]["dataset_mixture"] == {str(a["dir"]): 1.0}
    recipe.write_text("top_k: 4\n")
    edited, _ = resolve(cfg, {}, tmp_path / "sweep")
    assert edited["dir"] != a["dir"]


def test_local_sweep_runs_resumes_isolates_a_failure_and_retries(tmp_path, capsys):
    # cells top_k=2 and top_k=3 succeed; the third sorts by a column that does not exist and fails
    cfg = selects(tmp_path, zip=[{"second.top_k": [2, 3, 4], "second.sort_by": ["score", "score", "nope"]}])
    result = run(cfg)
    assert sorted(result["cells"].values()) == ["done", "done", "failed"]
    steps = {n: resolve(cfg, c, tmp_path / "sweep") for n, c in ((cell_name(c), c) for c in cells(cfg))}
    failed = next(n for n, s in result["cells"].items() if s == "failed")
    assert "sort_by: column 'nope' does not exist" in status(steps[failed][1]["dir"])["error"]
    for name, state in result["cells"].items():  # the other cells went on, and wrote what they select
        if state == "done":
            selected = pq.read_table(steps[name][1]["dir"] / "train-00000.parquet")
            assert selected.num_rows == steps[name][1]["overrides"]["top_k"]
            record = json.loads((tmp_path / "sweep" / "cells" / f"{name}.json").read_text())
            assert len(record["git_commit"]) == 40 and record["stages"][1]["output_dir"] == str(
                steps[name][1]["dir"]
            )
    table = (tmp_path / "sweep" / "results.csv").read_text()
    assert table.count("failed") == 1 and table.count("done") == 2

    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "stages").glob("*.sweep/log.txt")}
    assert len(logs) == 4  # `first` ran once for all three cells
    again = run(cfg)  # finished stages are skipped; the failure is reported, not run again
    assert again["cells"] == result["cells"] and "retry_failed=true runs it again" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    retried = run(
        dataclasses.replace(cfg, retry_failed=True)
    )  # only the failure runs again (and fails again)
    assert retried["cells"] == result["cells"]
    changed = [p for p, t in logs.items() if p.stat().st_mtime_ns != t]
    assert changed == [steps[failed][1]["dir"].with_name(steps[failed][1]["dir"].name + ".sweep") / "log.txt"]


def test_dry_run_prints_every_stage_and_the_memory_plan_without_running(tmp_path, capsys):
    from experiments.sweep import main

    with pytest.raises(
        SystemExit
    ) as done:  # the command, not only run(): its exit code once crashed on a plan
        main(["recipe=demo_sweep", f"output_dir={tmp_path / 's'}", "dry_run=true"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") :])
    assert summary == {"cells": 4, "stages": 21, "gpu_hours": 0.0}
    assert out.count("memory: ~") == 4 and "accelerate.commands.launch" in out
    assert not (tmp_path / "s").exists()  # nothing ran, nothing written


def test_table1_reproduction_dry_runs_with_its_gpu_hours(tmp_path, capsys):
    (cfg,) = parse_config(
        "sweeps", ["recipe=magpie_table1", f"output_dir={tmp_path / 's'}", "dry_run=true"], SweepConfig
    )
    summary = run(cfg)
    out = capsys.readouterr().out
    assert summary["cells"] == len(cfg.paper) and summary["gpu_hours"] > 0
    assert "deepspeed_zero3" in out and "GPU-hours" in out
    assert all(name in out for name in cfg.paper)  # every row of the paper's table is a cell


def test_results_table_has_metrics_intervals_and_the_paper(tmp_path):
    cfg = selects(tmp_path, grid={"second.top_k": [2, 3]})
    names = [cell_name(c) for c in cells(cfg)]
    cfg.paper = {names[0]: {"pairwise/win_rate": 40.0}}
    result = run(cfg)
    for k, c in enumerate(cells(cfg)):  # scores as an eval stage writes them (eval.leaderboard's contract)
        steps = resolve(cfg, c, tmp_path / "sweep")
        write_scores(steps[1]["dir"], [score_row("tuned", "pairwise", "win_rate", 50.0 + k, 45.0 + k, 55.0 + k),
                                       score_row("base", "pairwise", "win_rate", 50.0 - k)])  # fmt: skip
    result = run(cfg)
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert (
        "| cell | second.top_k | pairwise/win_rate | pairwise/win_rate (paper) | pairwise/win_rate (ours - paper) | status |"
        in md
    )
    assert "50.0 [45.0, 55.0]" in md and "| 40.0 | 10.0 |" in md and "51.0 [46.0, 56.0]" in md
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 1000 and set(result["cells"].values()) == {
        "done"
    }


@pytest.mark.integration
def test_slurm_sweep_trains_through_accelerate_inside_srun_end_to_end(tmp_path, slurm, embedded_path):
    """Two cells through real sbatch: a shared selection, then per cell a selection and one LoRA step of SFT
    launched by accelerate_configs/slurm_multinode.sh (srun + accelerate launch with the cpu config)."""
    cfg = selects(tmp_path, grid={"sft.learning_rate": [1e-4, 2e-4]}, executor="slurm", wait=True)
    cfg.stages.append(Stage(name="sft", command="sft", recipe="demo_sft",
                            overrides={"dataset": "{second}", "max_steps": 1, "max_length": 64, "save_strategy": "no",
                                       "merge_lora": False, "model_name_or_path": embedded_path}))  # fmt: skip
    cfg.slurm.partition = slurm.partition
    result = run(cfg)
    assert set(result["cells"].values()) == {"done"}, result
    assert len(result["jobs"]) == 4  # `first` and `second` are shared: submitted once; one SFT job per cell
    sft_dirs = sorted(
        p for p in (tmp_path / "sweep" / "stages").glob("sft-*") if not p.name.endswith(".sweep")
    )
    assert len(sft_dirs) == 2 and all((d / "adapter_model.safetensors").exists() for d in sft_dirs)
    for d in sft_dirs:
        script = (d.with_name(d.name + ".sweep") / "job.sbatch").read_text()
        assert (
            f"#SBATCH --partition={slurm.partition}" in script and "slurm_multinode.sh -m train.sft" in script
        )
        assert "ACCELERATE_CONFIG=" in script and status(d)["job_id"]
    again = run(cfg)  # everything done: nothing is submitted again
    assert again["jobs"] == {} and set(again["cells"].values()) == {"done"}


@pytest.mark.integration
def test_sigterm_to_the_sweep_stops_its_running_stage_and_the_rerun_resumes_it(tmp_path, embedded_path):
    """It used to orphan the stage, which went on holding its directory, and the next run recorded it as failed."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    with socket.socket() as s:  # a server that refuses: the stage retries with backoff for minutes
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "q.json").write_text(json.dumps([{"instruction": "Hello?"}]))
    overrides = {"bench": "alpaca_eval", "questions": str(tmp_path / "q.json"), "engine.backend": "openai",
                 "engine.base_urls": [dead], "engine.max_retries": 30, "engine.tokenizer": embedded_path}  # fmt: skip
    recipe = tmp_path / "s.yaml"
    recipe.write_text(json.dumps({"name": "t", "output_dir": str(tmp_path / "sweep"),
                                  "stages": [{"name": "gen", "command": "generate", "overrides": overrides}]}))  # fmt: skip
    sweep = subprocess.Popen([sys.executable, "-m", "experiments.sweep", f"recipe={recipe}"], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline, stage = time.time() + 120, None
    while time.time() < deadline and stage is None:  # the stage holds its directory once it has started
        locks = [p for p in (tmp_path / "sweep" / "stages").glob("gen-*/.lock") if p.read_text().strip()]
        stage = int(locks[0].read_text()) if locks else time.sleep(0.5)
    assert stage is not None, sweep.stderr.read().decode()[-2000:]
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=120) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(stage, 0)  # the stage was stopped with the sweep, not left running
    (stage_dir,) = [d for d in (tmp_path / "sweep" / "stages").glob("gen-*") if d.suffix != ".sweep"]
    assert status(stage_dir)["state"] == "interrupted"
    assert (
        cell_state([stage_dir]) == "interrupted"
    )  # not failed: the next run starts it again, no retry_failed


@pytest.mark.integration
def test_a_stage_left_incomplete_by_an_outage_is_resumed_not_failed(tmp_path, embedded_path):
    import socket

    from experiments.sweep import exit_code

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    tag = Stage(name="tag", command="tag", overrides={
        "input": str(rows(tmp_path / "data")), "taggers": ["quality"], "judge.model": embedded_path,
        "judge.engine.backend": "openai", "judge.engine.base_urls": [dead], "judge.engine.max_retries": 0})  # fmt: skip
    cfg = SweepConfig(name="t", stages=[tag], output_dir=str(tmp_path / "sweep"))
    result = run(cfg)
    assert list(result["cells"].values()) == ["incomplete"] and exit_code(result) == 3
    (step,) = resolve(cfg, {}, tmp_path / "sweep")
    assert (
        status(step["dir"])["state"] == "incomplete" and "requests all failed" in status(step["dir"])["error"]
    )
    assert list(run(cfg)["cells"].values()) == [
        "incomplete"
    ]  # run again without retry_failed: it was retried
    assert status(step["dir"])["at"] and "retry_failed" not in (tmp_path / "sweep" / "results.md").read_text()

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
    expected = (
        r"axis 'train.lr': expected `cell` \(a label\), `checkpoint` \(a released model\) or <stage>.<key>"
    )
    with pytest.raises(ConfigError, match=expected):
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
    assert summary == {"cells": 4, "stages": 21, "gpu_hours": 0.0, "downloads": 0}  # all local
    assert out.count("memory: ~") == 4 and "accelerate.commands.launch" in out
    assert not (tmp_path / "s").exists()  # nothing ran, nothing written


def test_table1_reproduction_dry_runs_from_hub_ids_with_its_checkpoints_and_gpu_hours(tmp_path, capsys):
    (cfg,) = parse_config(
        "sweeps", ["recipe=magpie_table1", f"output_dir={tmp_path / 's'}", "dry_run=true"], SweepConfig
    )
    summary = run(cfg)
    out = capsys.readouterr().out
    trained = [c for c in cells(cfg) if "checkpoint" not in c]
    assert len(trained) == 14 and summary["cells"] == 14 + len(cfg.checkpoints) and summary["gpu_hours"] > 0
    assert "deepspeed_zero3" in out and "GPU-hours" in out
    assert all(name in out for name in cfg.paper)  # every row of the paper's table is a cell
    # preparation from Hub ids: every comparison set through data_synth.baselines, the raw rows sampled
    for name in ("sharegpt", "evol_instruct", "wildchat", "ultrachat", "tulu_v2_mix", "openhermes"):
        assert f"-m data_synth.baselines name={name} " in out
    for released in ("Magpie-Align/Llama-3-Magpie-Air-3M-v0.1", "Magpie-Align/Llama-3-Magpie-Pro-1M-v0.1"):
        assert f"recipe=magpie_raw_300k input={released} " in out
    # the authors' checkpoints and the official Instruct model: eval-only rows, nothing prepared or trained
    for model in cfg.checkpoints.values():
        block = out[out.index(f"(eval-only: scores the released {model})") :].split("\ncell ")[0]
        assert block.count(f"model={model} ") == 2 and "train.sft" not in block and "baselines" not in block
    assert "Llama-3-8B-Instruct" in cfg.paper and "Llama-3-8B-Instruct" in cfg.checkpoints
    listed = out[out.index("downloads from the Hub") :]
    for hub in ("meta-llama/Meta-Llama-3-8B", "anon8231489123/ShareGPT_Vicuna_unfiltered", "tatsu-lab/alpaca_eval",
                "Magpie-Align/Magpie-Pro-DPO-100K-v0.1", *cfg.checkpoints.values()):  # fmt: skip
        assert hub in listed
    assert summary["downloads"] == len(listed.split(": ", 1)[1].split("\n")[0].split(", "))


def test_checkpoint_rows_run_only_the_evaluation_on_the_released_model(tmp_path):
    """An eval-only row: preparation and training stages are skipped, `{sft}` means the released model, and the
    evaluation stages it shares with no trained row get directories of their own."""
    stages = [Stage(name="prep", command="select"), Stage(name="sft", command="sft", overrides={"dataset": "{prep}"}),
              Stage(name="answers", command="generate", overrides={"model": "{sft}", "name": "tuned"}),
              Stage(name="score", command="alpaca_eval", overrides={"model_outputs": "{answers}/model_outputs.json"})]  # fmt: skip
    cfg = SweepConfig(stages=stages, zip=[{"cell": ["A", "B"]}], checkpoints={"A": "org/model-a"})
    assignments = cells(cfg)
    assert assignments[-1] == {"cell": "A", "checkpoint": "org/model-a"} and len(assignments) == 3
    theirs = resolve(cfg, assignments[-1], tmp_path)
    assert [s["name"] for s in theirs] == ["answers", "score"]
    assert theirs[0]["overrides"]["model"] == "org/model-a"
    ours = resolve(cfg, assignments[0], tmp_path)
    assert [s["name"] for s in ours] == ["prep", "sft", "answers", "score"]
    assert ours[2]["dir"] != theirs[0]["dir"]
    # `cells=[A]` picks the row: its trained cell and its checkpoint
    picked = run(dataclasses.replace(cfg, cells=["A"], dry_run=True, output_dir=str(tmp_path / "s")))
    assert picked["cells"] == 2


def test_results_split_the_gap_to_the_paper_into_evaluation_and_training_drift(tmp_path):
    from experiments.sweep import results

    stages = [Stage(name="sft", command="sft"),
              Stage(name="answers", command="generate", overrides={"model": "{sft}"})]  # fmt: skip
    cfg = SweepConfig(stages=stages, zip=[{"cell": ["A", "B"], "sft.learning_rate": [1e-5, 2e-5]}],
                      checkpoints={"A": "org/a", "Instruct": "org/instruct"},
                      paper={"A": {"ae/wr": 30.0}, "B": {"ae/wr": 20.0}, "Instruct": {"ae/wr": 22.0}})  # fmt: skip
    out = tmp_path / "sweep"
    assignments = {cell_name(a): a for a in cells(cfg)}
    plan_cells = [(n, resolve(cfg, a, out)) for n, a in assignments.items()]
    ours, theirs = {"A": 21.0, "B": 18.5}, {"A": 26.0, "Instruct": 24.5}
    for n, steps in plan_cells:
        value = (theirs if "checkpoint" in assignments[n] else ours)[assignments[n]["cell"]]
        write_scores(steps[-1]["dir"], [score_row("tuned", "ae", "wr", value, value - 2, value + 2)])
    md = results(cfg, out, plan_cells, assignments)
    header = md.splitlines()[0]
    assert header == ("| cell | checkpoint | ae/wr (paper) | ae/wr (theirs) | ae/wr | ae/wr (ours - paper) "
                      "| ae/wr (paper - theirs) | ae/wr (theirs - ours) | status |")  # fmt: skip
    row = {line.split(" | ")[0].strip("| ").rsplit("-", 1)[0]: line for line in md.splitlines()[2:]}
    assert set(row) == {"A", "B", "Instruct"}  # one row per label: A's two cells are one row
    # A: paper 30, theirs 26, ours 21 -> evaluation drift 4, training drift 5, total -9
    assert "| org/a | 30.0 | 26.0 [24.0, 28.0] | 21.0 [19.0, 23.0] | -9.0 | 4.0 | 5.0 |" in row["A"]
    assert "| 20.0 |  | 18.5 [16.5, 20.5] | -1.5 |  |  |" in row["B"]  # no checkpoint: no drift to split
    assert "| org/instruct | 22.0 | 24.5 [22.5, 26.5] |  |  | -2.5 |  |" in row["Instruct"]  # eval-only row
    csv = (out / "results.csv").read_text()
    assert "ae/wr_eval_drift" in csv and "ae/wr_training_drift" in csv and "sft.learning_rate" in csv


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
        "| cell | second.top_k | pairwise/win_rate (paper) | pairwise/win_rate | pairwise/win_rate (ours - paper) | status |"
        in md
    )
    assert "| 40.0 | 50.0 [45.0, 55.0] | 10.0 |" in md and "51.0 [46.0, 56.0]" in md
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


@pytest.mark.integration
def test_demo_table1_prepares_trains_and_scores_each_row_beside_its_checkpoint(tmp_path, embedded_path):
    """Table 1 in miniature, end to end on CPU: a ShareGPT row prepared from the shipped ShareGPT-layout file, a
    Raw row sampled from a Magpie run, each fully fine-tuned and scored AlpacaEval-style, and each row's "released
    checkpoint" scored from a local directory by the same stages; the drift columns come from their scores."""
    from safetensors.torch import load_file

    (cfg,) = parse_config("sweeps", ["recipe=demo_table1", f"output_dir={tmp_path / 'sweep'}"], SweepConfig)
    cfg.checkpoints = {label: embedded_path for label in cfg.checkpoints}  # a local directory, as a user's
    cfg.paper = {"ShareGPT": {"alpaca_eval/win_rate": 40.0}}
    synth = next(s for s in cfg.stages if s.name == "synth")
    synth.overrides.update({"n_conversations": 6, "chunk_size": 6})  # smaller than the demo: CI time
    result = run(cfg)
    assert set(result["cells"].values()) == {"done"} and len(result["cells"]) == 4, result
    out = tmp_path / "sweep"
    assignments = {cell_name(a): a for a in cells(cfg)}
    steps = {n: resolve(cfg, a, out) for n, a in assignments.items()}
    ours = {a["cell"]: steps[n] for n, a in assignments.items() if "checkpoint" not in a}
    theirs = {a["cell"]: steps[n] for n, a in assignments.items() if "checkpoint" in a}
    # preparation: 16 ShareGPT conversations through data_synth.baselines, the Raw row's seeded sample
    assert [s["name"] for s in ours["ShareGPT"]][:2] == ["baseline", "sft"]
    assert json.loads((ours["ShareGPT"][0]["dir"] / "manifest.json").read_text())["rows"] == 16
    assert [s["name"] for s in ours["Magpie-Raw"]][:3] == ["synth", "sample", "sft"]
    sample = json.loads((ours["Magpie-Raw"][1]["dir"] / "manifest.json").read_text())
    assert sample["input_rows"] == 6 and sample["selected_rows"] == 6
    # a real fine-tuning of the whole model on each row's data (not an adapter), which moved its weights
    base = load_file(f"{embedded_path}/model.safetensors")
    for row in ours.values():
        tuned = load_file(row[[s["name"] for s in row].index("sft")]["dir"] / "model.safetensors")
        assert any(not torch_equal(tuned[k], base[k]) for k in base if k in tuned)
    # the checkpoint rows ran the evaluation alone, on the local directory
    for row in theirs.values():
        assert [s["name"] for s in row] == ["answers_base", "answers", "alpaca_eval"]
        assert row[1]["overrides"]["model"] == embedded_path
    # the drift arithmetic, from the stages' own score files
    csv = {r["cell"].rsplit("-", 1)[0]: r for r in _csv_rows(out / "results.csv")}
    for label in ("ShareGPT", "Magpie-Raw"):
        mine = _score(ours[label][-1]["dir"])
        released = _score(theirs[label][-1]["dir"])
        assert float(csv[label]["alpaca_eval/win_rate"]) == pytest.approx(mine)
        assert float(csv[label]["alpaca_eval/win_rate_theirs"]) == pytest.approx(released)
        drift = float(csv[label]["alpaca_eval/win_rate_training_drift"])
        assert drift == pytest.approx(released - mine, abs=0.01)
    assert float(csv["ShareGPT"]["alpaca_eval/win_rate_eval_drift"]) == pytest.approx(
        40.0 - _score(theirs["ShareGPT"][-1]["dir"]), abs=0.01
    )
    md = (out / "results.md").read_text()
    assert "alpaca_eval/win_rate (theirs - ours)" in md and "alpaca_eval/win_rate (paper - theirs)" in md
    again = run(cfg)  # every stage is done: nothing runs again
    assert set(again["cells"].values()) == {"done"}


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _score(directory) -> float:
    from eval.scores import read_scores

    (row,) = [r for r in read_scores(directory / "scores.jsonl") if r["model"] == "tuned"]
    return row["value"]


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))

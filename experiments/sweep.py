"""Sweeps: datasets x settings -> trained models -> benchmarks -> one table, locally or on SLURM.

    python -m experiments.sweep recipe=demo_sweep [executor=local|slurm] [dry_run=true] [cells=[NAME,...]]
                                [retry_failed=true] [wait=true]

A sweep recipe (recipes/sweeps/) names its stages, each a command of this project with its recipe and overrides,
and its axes: `grid` lists expand as a Cartesian product, each `zip` block varies its lists together. An axis key
is `<stage>.<key>` (e.g. `sft.learning_rate`). A stage refers to an earlier stage's output directory as
`{stage}` inside any override (`dataset: "{select}"`, `models.tuned: "{sft}/merged"`).

Every stage's output directory is named by a hash of what it runs (its command, recipe and resolved overrides,
upstream directories included), so a stage that two cells share runs once, and a finished stage is skipped on
re-run. A failed stage is reported and its cell stops; the other cells go on; `retry_failed=true` runs failures
again. Each cell records its resolved stages, the git commit and its status in `cells/<name>.json`; the results
are `results.md`, `results.csv` and `results.png` in the sweep's directory: one row per cell, the swept keys, every
metric of `score_model` from the stages' `scores.jsonl` (eval.leaderboard's contract) with its 95% interval, and,
where the recipe gives them, the paper's numbers and the difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import ConfigError, cli, load_config, resolved
from core.io import atomic_write_bytes, atomic_write_json
from core.recipes import merge_recipe
from core.rundir import prepare_output_dir
from eval.scores import SCORES_FILE, read_scores, write_table
from experiments.commands import STAGES

ROOT = Path(__file__).resolve().parents[1]
STATUS = "sweep_status.json"
SWEEP_OUTPUTS = ("cells", "stages", "results.md", "results.csv", "results.png")  # what a sweep writes
SPECIAL = (
    "cell",
    "checkpoint",
)  # axis keys that are not a stage's: the row's label, a released model to score


@dataclass
class Stage:
    name: str = ""
    command: str = "select"  # a key of experiments.commands.STAGES
    recipe: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    accelerate_config: str = "cpu"  # training stages: accelerate_configs/<name>.yaml
    gpus: int = 0  # per node, on SLURM (training stages: the accelerate processes per node)
    nodes: int = 1
    # training stages: the data the GPU-hours estimate counts (rows x tokens per row x epochs)
    rows: int | None = None
    tokens_per_row: int = 1000
    enabled: bool = True  # an axis can switch a stage off in some cells (DPO only where the paper has it)
    # when off, later `{this stage}` references get this earlier stage's directory
    fallback: str | None = None
    group: str | None = None  # a subdirectory of stages/ to put it in (an iteration's stages together)


@dataclass
class Slurm:
    partition: str = "debug"  # a real cluster changes these three and the stages' gpus/nodes
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. ["--qos=high"]


@dataclass
class SweepConfig:
    name: str = "sweep"
    stages: list[Stage] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = field(default_factory=list)
    score_model: str = "tuned"  # whose scores are the cell's (eval stages name the trained model so)
    # the paper's numbers: cell name, or its label without the hash -> "benchmark/metric" -> value
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    # eval-only rows: a cell label -> a released model (Hub id or local directory) scored by the same evaluation
    # stages. Beside a trained cell of the same label, the results split the gap to the paper into evaluation
    # drift (paper - theirs under our evaluation) and training drift (theirs - ours).
    checkpoints: dict[str, str] = field(default_factory=dict)
    executor: Literal["local", "slurm"] = "local"
    slurm: Slurm = field(default_factory=Slurm)
    wait: bool = False  # slurm: wait for every job, then write the results
    dry_run: bool = False
    cells: list[str] = field(default_factory=list)  # only these cells (names, labels or hashes)
    retry_failed: bool = False
    gpu_peak_tflops: float = 989.0  # H100 SXM bf16 dense, for the GPU-hours estimate
    mfu: float = 0.4
    output_dir: str | None = None  # default runs/sweeps/<name>

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"stages: every stage needs a name of its own, got {names}")
        for s in self.stages:
            if s.command not in STAGES:
                raise ValueError(f"stages: '{s.name}' has command '{s.command}'; choose from {list(STAGES)}")


# ----------------------------------------------------------------------------------------------- cells


def cells(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the axes: the grid's Cartesian product times each zip block's positions."""
    stages = {s.name for s in cfg.stages}
    axes: list[list[dict[str, Any]]] = []
    for key, values in cfg.grid.items():
        axes.append([{key: v} for v in values])
    for i, block in enumerate(cfg.zip):
        lengths = {len(v) for v in block.values()}
        if len(lengths) != 1:
            raise ConfigError(f"zip[{i}]: its lists must have one length, got {sorted(lengths)}")
        axes.append([{k: v[j] for k, v in block.items()} for j in range(lengths.pop())])
    for key in [k for axis in axes for point in axis for k in point]:
        if key not in SPECIAL and (key.split(".", 1)[0] not in stages or "." not in key):
            raise ConfigError(
                f"axis '{key}': expected `cell` (a label), `checkpoint` (a released model) or <stage>.<key> "
                f"with a stage of {sorted(stages)}"
            )
    trained = [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*axes)]
    return trained + [{"cell": label, "checkpoint": model} for label, model in cfg.checkpoints.items()]


def cell_name(assignment: dict[str, Any]) -> str:
    """Readable and stable: the `cell` label, or the swept keys' last parts with their values, then a hash of the
    assignment."""
    digest = hashlib.sha1(json.dumps(assignment, sort_keys=True, default=str).encode()).hexdigest()[:8]
    words = (
        [str(assignment["cell"])]
        if "cell" in assignment
        else [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in assignment.items()]
    )
    readable = re.sub(r"[^A-Za-z0-9_.=+,-]+", "-", ",".join(words))[:80].strip("-")
    return f"{readable}-{digest}" if readable else digest


def _refer(value: Any, dirs: dict[str, str]) -> Any:
    """`{stage}` inside strings (values, and keys of mappings) becomes that stage's output directory."""
    if isinstance(value, str):
        for name, path in dirs.items():
            value = value.replace("{" + name + "}", path)
        return value
    if isinstance(value, list):
        return [_refer(v, dirs) for v in value]
    if isinstance(value, dict):
        return {_refer(k, dirs): _refer(v, dirs) for k, v in value.items()}
    return value


def resolve(cfg: SweepConfig, assignment: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The cell's stages with their overrides, recipe and output directory (named by a hash of what runs)."""
    dirs: dict[str, str] = {}
    steps = []
    off: set[str] = set()
    checkpoint = assignment.get("checkpoint")
    for stage in cfg.stages:
        if checkpoint and not STAGES[stage.command].evaluates:
            # an eval-only row: nothing is prepared or trained, and `{sft}`, `{dpo}`... mean the released model
            dirs[stage.name] = str(checkpoint)
            continue
        overrides = dict(stage.overrides)
        fields = {}  # Stage fields an axis sets (recipe, enabled, rows, gpus, ...); other keys are overrides
        for key, value in assignment.items():
            owner, _, sub = key.partition(".")
            if owner == stage.name:
                if sub in Stage.__dataclass_fields__ and sub not in ("name", "command", "overrides"):
                    fields[sub] = value
                else:
                    overrides[sub] = value
        stage = dataclasses.replace(stage, **fields)
        if not stage.enabled:
            off.add(stage.name)
            if stage.fallback:
                dirs[stage.name] = dirs[stage.fallback]
            continue
        overrides = _refer(overrides, dirs)
        unknown = sorted(set(re.findall(r"\{(\w+)\}", json.dumps(overrides))) & {s.name for s in cfg.stages})
        if unknown:
            why = "is off in this cell and has no fallback" if set(unknown) <= off else "come later"
            raise ConfigError(
                f"stage '{stage.name}' refers to {unknown}, which {why}: refer only to earlier stages"
            )
        what = {
            "command": stage.command,
            "recipe": stage.recipe,
            "overrides": overrides,
            "accelerate_config": stage.accelerate_config if STAGES[stage.command].training else None,
        }
        # the recipe's content too: an edited recipe is a different stage, not a finished one to skip
        content = merge_recipe(STAGES[stage.command].recipes, stage.recipe, {}) if stage.recipe else None
        digest = hashlib.sha1(json.dumps([what, content], sort_keys=True, default=str).encode()).hexdigest()[
            :10
        ]
        directory = out / "stages" / (stage.group or "") / f"{stage.name}-{digest}"
        dirs[stage.name] = str(directory)
        steps.append({"stage": stage, "name": stage.name, "dir": directory, **what})
    return steps


def _arg(key: str, value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else yaml.safe_dump(value).strip().removesuffix("...").strip()
    )
    return f"{key}={text}"


def script_args(step: dict[str, Any]) -> list[str]:
    """`-m <module>` and its arguments: recipe, overrides, output_dir."""
    args = [f"recipe={step['recipe']}"] if step["recipe"] else []
    args += [_arg(k, v) for k, v in step["overrides"].items()]
    return ["-m", STAGES[step["command"]].module, *args, f"output_dir={step['dir']}"]


def accelerate_config(step: dict[str, Any]) -> Path:
    return ROOT / "accelerate_configs" / f"{step['accelerate_config']}.yaml"


def command_line(step: dict[str, Any]) -> list[str]:
    """What runs, as a user would type it (training through `accelerate launch`)."""
    if STAGES[step["command"]].training:
        launch = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(step))]
        return [sys.executable, *launch, *script_args(step)]
    return [sys.executable, *script_args(step)]


# ---------------------------------------------------------------------------------------------- status


def meta(directory: Path) -> Path:
    """The sweep's own files of a stage (status, log, job script), beside its output directory, which stays the
    command's alone."""
    return directory.with_name(directory.name + ".sweep")


def status(directory: Path) -> dict[str, Any]:
    path = meta(directory) / STATUS
    return json.loads(path.read_text()) if path.is_file() else {"state": "pending"}


def set_status(directory: Path, **fields: Any) -> None:
    atomic_write_json(meta(directory) / STATUS, {**fields, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------- executors


OUTAGE_EXIT = 3  # core.config.cli: an engine outage left work undone; the same command finishes it


def record_exit(directory: str | Path, exit_code: int, **fields: Any) -> bool:
    """A stage's status from its exit code: done; incomplete (an outage: the next run resumes it, as an interrupted
    one); or failed, with its log's last lines (run again only with retry_failed). Both executors write it (an sbatch
    job calls this at its end), so a re-run reads one format."""
    directory = Path(directory)
    if exit_code == 0:
        set_status(directory, state="done", **fields)
        return True
    lines = (meta(directory) / "log.txt").read_text(errors="replace").replace("\r", "\n").strip().splitlines()
    # The command's own one line, if it wrote one (after whatever a progress bar left on that line)
    said = [line[line.index("error: ") :] for line in lines if "error: " in line]
    error = said[-1] if said else " | ".join(lines[-3:])  # else the end of its traceback
    state = "incomplete" if exit_code == OUTAGE_EXIT else "failed"
    set_status(directory, state=state, exit_code=exit_code, error=error[-500:], **fields)
    return False


def run_local(step: dict[str, Any]) -> bool:
    """Run one stage here, its output in `log.txt`. When the sweep is stopped (SIGTERM, Ctrl-C) it stops the stage
    and records it as interrupted, which the next run resumes; when the sweep dies outright (SIGKILL, the OOM
    killer), the kernel sends the stage SIGTERM. Either way no stage is left running as an orphan that holds its
    directory."""
    log_path = meta(step["dir"]) / "log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        # in the sweep's own working directory, where its relative paths (runs/...) point
        proc = subprocess.Popen(
            command_line(step), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        try:
            rc = proc.wait()
        except BaseException:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the recording short
            stop(proc)
            set_status(step["dir"], state="interrupted")
            raise
    return record_exit(step["dir"], rc, seconds=round(time.time() - start, 1))


try:  # resolved here, not in the forked child (which should call nothing but the syscall)
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the stage's process, before it starts: SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG = 1)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (accelerate passes it on to its workers), then SIGKILL after `grace` seconds (under SLURM's default
    KillWait of 30 s, so the sweep still records the stage before SLURM kills it)."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM (a scheduler's or `kill`'s) unwinds like Ctrl-C, so the running stage is stopped and recorded."""

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def job_script(cfg: SweepConfig, step: dict[str, Any]) -> str:
    """The sbatch script of one stage. Training goes through accelerate_configs/slurm_multinode.sh (one accelerate
    launcher per node inside srun); the script writes the stage's status itself, so a re-run sees it."""
    stage: Stage = step["stage"]
    directory: Path = step["dir"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={cfg.name}-{step['name']}",
        f"#SBATCH --partition={cfg.slurm.partition}",
        f"#SBATCH --nodes={stage.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={cfg.slurm.time}",
        f"#SBATCH --output={meta(directory)}/slurm-%j.out",
        f"#SBATCH --chdir={Path.cwd()}",
    ]
    lines += [f"#SBATCH --account={cfg.slurm.account}"] if cfg.slurm.account else []
    lines += [f"#SBATCH --gres=gpu:{stage.gpus}"] if stage.gpus else []
    lines += [f"#SBATCH --cpus-per-task={cfg.slurm.cpus_per_task}"] if cfg.slurm.cpus_per_task else []
    lines += [f"#SBATCH {x}" for x in cfg.slurm.extra]
    if STAGES[step["command"]].training:
        launcher = ROOT / "accelerate_configs" / "slurm_multinode.sh"
        body = (
            f"ACCELERATE_CONFIG={shlex.quote(str(accelerate_config(step)))} GPUS_PER_NODE={max(stage.gpus, 1)} "
            f"PYTHON={shlex.quote(sys.executable)} bash {shlex.quote(str(launcher))} {shlex.join(script_args(step))}"
        )
    else:
        body = shlex.join(command_line(step))
    record = "import sys; from experiments.sweep import record_exit; record_exit(sys.argv[1], int(sys.argv[2]), job_id=sys.argv[3])"
    lines += [
        "",
        f"{body} > {shlex.quote(str(meta(directory) / 'log.txt'))} 2>&1",
        "rc=$?",
        f"{shlex.quote(sys.executable)} -c {shlex.quote(record)} {shlex.quote(str(directory))} $rc $SLURM_JOB_ID",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def submit(cfg: SweepConfig, step: dict[str, Any], after: list[str]) -> str:
    directory: Path = step["dir"]
    meta(directory).mkdir(parents=True, exist_ok=True)
    script = meta(directory) / "job.sbatch"
    script.write_text(job_script(cfg, step))
    cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    cmd += [f"--dependency=afterok:{':'.join(after)}"] if after else []
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {done.stderr.strip()[:300]}")
    job = done.stdout.strip().split(";")[0]
    set_status(directory, state="submitted", job_id=job)
    return job


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


# ------------------------------------------------------------------------------------------------ plan


def gpu_hours(cfg: SweepConfig, step: dict[str, Any], p: dict[str, Any]) -> float | None:
    """6 x parameters x tokens (4x with an adapter: no weight gradients) at `mfu` of `gpu_peak_tflops`; `p` is the
    stage's memory plan (train.plan), which counts its parameters."""
    stage: Stage = step["stage"]
    if not stage.rows:
        return None
    epochs = float(step["overrides"].get("num_train_epochs", _recipe_value(step, "num_train_epochs", 1.0)))
    factor = 4 if p["trainable_params_million"] < 0.5 * p["params_billion"] * 1000 else 6
    flops = factor * p["params_billion"] * 1e9 * stage.rows * stage.tokens_per_row * epochs
    return flops / (cfg.gpu_peak_tflops * 1e12 * cfg.mfu) / 3600


def _recipe_value(step: dict[str, Any], key: str, default: Any) -> Any:
    return merge_recipe(STAGES[step["command"]].recipes, step["recipe"], {}).get(key, default)


def base_model(step: dict[str, Any], makers: dict[str, dict[str, Any]]) -> str | None:
    """The model a training stage starts from; where that is an earlier stage's output (not there yet in a dry
    run), the model that stage starts from, and so on."""
    while True:
        model = step["overrides"].get("model_name_or_path") or _recipe_value(step, "model_name_or_path", None)
        if model not in makers:
            return model
        step = makers[model]


# Settings that name a model or a dataset, which is a Hub id when it is neither a local path nor a stage's output
HUB_KEYS = ("model_name_or_path", "model", "models", "ref_model", "dataset", "source", "input", "questions",
            "reference_outputs", "seed_data")  # fmt: skip
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def downloads(step: dict[str, Any]) -> list[str]:
    """The Hub models and datasets a stage reads: its settings that name no local path, and the sets its command
    fetches by default (a baseline's source, a benchmark's questions, AlpacaEval's reference outputs)."""
    raw = (
        {**merge_recipe(STAGES[step["command"]].recipes, step["recipe"], {}), **step["overrides"]}
        if step["recipe"]
        else dict(step["overrides"])
    )
    values = [raw.get(k) for k in HUB_KEYS]
    if step["command"] == "baselines" and not raw.get("source"):
        from data_synth.baselines import SOURCES

        values.append(SOURCES.get(raw.get("name", "sharegpt"), ("",))[0])
    if step["command"] == "generate" and not raw.get("questions"):
        from eval.generate import HUB_QUESTIONS

        values.append(HUB_QUESTIONS.get(raw.get("bench", "alpaca_eval")))
    if step["command"] == "alpaca_eval" and not raw.get("reference_outputs"):
        from eval.alpaca_eval import BASELINE_HUB

        values.append(BASELINE_HUB[0])
    flat = [
        x for v in values for x in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v])
    ]
    return list(
        dict.fromkeys(v for v in flat if isinstance(v, str) and HUB_ID.fullmatch(v) and not Path(v).exists())
    )


def dry_run(
    cfg: SweepConfig,
    plan_cells: list[tuple[str, list[dict[str, Any]]]],
    assignments: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Print every cell and stage, each training stage's memory plan and the GPU-hours, before anything runs."""
    from train.plan import PlanConfig, plan

    total, seen, fetched = 0.0, set(), set()
    makers = {str(s["dir"]): s for _, steps in plan_cells for s in steps}
    for name, steps in plan_cells:
        released = assignments[name].get("checkpoint")
        print(f"cell {name}" + (f" (eval-only: scores the released {released})" if released else ""))
        for step in steps:
            shared = " (shared, counted once)" if step["dir"] in seen else ""
            print(
                f"  {step['name']:<12} {status(step['dir'])['state']:<9} {shlex.join(command_line(step))}{shared}"
            )
            hub = downloads(step)
            fetched.update(hub)
            if hub and not shared:
                print(f"  {'':<12} downloads: {', '.join(hub)}")
            if STAGES[step["command"]].training and step["dir"] not in seen:
                p = plan(
                    PlanConfig(
                        recipe=step["recipe"],
                        stage=step["command"],
                        gpus=max(1, step["stage"].gpus * step["stage"].nodes),
                        accelerate_config=step["accelerate_config"],
                        model=base_model(step, makers),
                    ),
                    dict(step["overrides"]),
                )
                hours = gpu_hours(cfg, step, p)
                total += hours or 0.0
                print(
                    f"  {'':<12} memory: ~{p['total_gb']} GB per GPU ({p['sharding']}, {'fits' if p['fits'] else 'does NOT fit'} "
                    f"in {p['gpu_mem_gb']:g} GB)"
                    + (f"; ~{hours:,.1f} GPU-hours" if hours is not None else "")
                )
            seen.add(step["dir"])
    counted = any(s["stage"].rows for _, steps in plan_cells for s in steps if STAGES[s["command"]].training)
    hours = (
        f"~{total:,.1f} GPU-hours of training"
        if counted
        else "no GPU-hours estimate (no training stage sets `rows`)"
    )
    print(f"{len(plan_cells)} cells, {len(seen)} distinct stages, {hours}")
    print(f"downloads from the Hub ({len(fetched)}): {', '.join(sorted(fetched)) or 'nothing'}")
    return {
        "cells": len(plan_cells),
        "stages": len(seen),
        "gpu_hours": round(total, 1),
        "downloads": len(fetched),
    }


# --------------------------------------------------------------------------------------------- results


def results(
    cfg: SweepConfig,
    out: Path,
    plan_cells: list[tuple[str, list[dict[str, Any]]]],
    assignments: dict[str, dict[str, Any]],
) -> str:
    """One row per trained cell (and per released checkpoint without one): the swept keys, every metric of
    `score_model` (95% interval), the paper's, the gap; where a checkpoint of the row's label was scored, its score
    and the gap split into evaluation drift (paper - theirs) and training drift (theirs - ours)."""
    from eval.leaderboard import to_png

    table: dict[tuple[str, str], dict[str, Any]] = {}
    for name, steps in plan_cells:
        for step in steps:
            path = step["dir"] / SCORES_FILE
            for row in read_scores(path) if path.is_file() else []:
                if row["model"] == cfg.score_model:
                    table[(name, f"{row['benchmark']}/{row['metric']}")] = row
    names = [name for name, _ in plan_cells]
    metrics = sorted({m for _, m in table})
    label = {n: str(assignments[n].get("cell", n)) for n in names}
    theirs = {label[n]: n for n in names if "checkpoint" in assignments[n]}
    ours = [n for n in names if "checkpoint" not in assignments[n]]
    rows = ours + [n for n in names if n in theirs.values() and label[n] not in {label[o] for o in ours}]
    # the swept keys, in the CSV always; in results.md only where no `cell` label already says what the row is
    keys = [k for k in dict.fromkeys(k for a in assignments.values() for k in a) if k not in SPECIAL]
    md_keys = [] if any("cell" in a for a in assignments.values()) else keys
    dirs = dict(plan_cells)
    rows_md, rows_csv = [], []
    for name in rows:
        released = theirs.get(label[name]) if "checkpoint" not in assignments[name] else name
        mine = name if "checkpoint" not in assignments[name] else None
        md = {"cell": name, **{k: assignments[name].get(k) for k in md_keys}}
        csv = {"cell": name, **{k: assignments[name].get(k) for k in keys}}
        if cfg.checkpoints:
            md["checkpoint"] = csv["checkpoint"] = assignments[released]["checkpoint"] if released else None
        paper_row = (
            cfg.paper.get(name) or cfg.paper.get(label[name]) or cfg.paper.get(name.rsplit("-", 1)[0]) or {}
        )
        for m in metrics:
            r, t, paper = table.get((mine, m)), table.get((released, m)), paper_row.get(m)
            if r is not None:
                md[m] = _shown(r)
                csv.update({m: r["value"], f"{m}_ci_low": r["ci_low"], f"{m}_ci_high": r["ci_high"]})
            if paper is not None:
                md[f"{m} (paper)"], csv[f"{m}_paper"] = paper, paper
                if r is not None:
                    md[f"{m} (ours - paper)"] = csv[f"{m}_diff"] = round(r["value"] - paper, 2)
            if t is not None:
                md[f"{m} (theirs)"] = _shown(t)
                csv.update({f"{m}_theirs": t["value"], f"{m}_theirs_ci_low": t["ci_low"],
                            f"{m}_theirs_ci_high": t["ci_high"]})  # fmt: skip
                if paper is not None:  # evaluation drift: the same model, the paper's evaluation vs ours
                    md[f"{m} (paper - theirs)"] = csv[f"{m}_eval_drift"] = round(paper - t["value"], 2)
                if r is not None:  # training drift: the same evaluation, their training vs ours
                    md[f"{m} (theirs - ours)"] = csv[f"{m}_training_drift"] = round(
                        t["value"] - r["value"], 2
                    )
        both = [d["dir"] for n in dict.fromkeys(x for x in (mine, released) if x) for d in dirs[n]]
        md["status"] = csv["status"] = cell_state(both)
        rows_md.append(md)
        rows_csv.append(csv)
    per_metric = [f"{m}{s}" for m in metrics for s in PER_METRIC]
    present = {c for r in rows_md for c in r}
    md_columns = [c for c in ["cell", *md_keys, "checkpoint", *per_metric, "status"] if c in present]
    csv_columns = list(dict.fromkeys(c for r in rows_csv for c in r))
    text = write_table(out / "results.md", rows_md, md_columns)
    write_table(out / "results.csv", rows_csv, csv_columns)
    if metrics:
        atomic_write_bytes(out / "results.png", to_png(table, names, metrics))
    return text


# a metric's columns in results.md, in this order: the paper's, the released checkpoint's under our evaluation, ours,
# and the differences
PER_METRIC = (" (paper)", " (theirs)", "", " (ours - paper)", " (paper - theirs)", " (theirs - ours)")


def _shown(row: dict[str, Any]) -> str:
    interval = f" [{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if row["ci_low"] is not None else ""
    return f"{row['value']:.1f}{interval}"


def cell_state(dirs: list[Path]) -> str:
    states = [status(d)["state"] for d in dirs]
    for state in ("failed", "incomplete", "interrupted", "submitted", "pending"):
        if state in states:
            return state
    return "done"


# ------------------------------------------------------------------------------------------------- run


def run(cfg: SweepConfig, claimed: bool = False) -> dict[str, Any]:
    """Run (or plan, with dry_run) every cell; `claimed`: the caller (experiments.humpback) already holds the
    output directory as its own."""
    out = Path(cfg.output_dir or f"runs/sweeps/{cfg.name}")
    assignments = {cell_name(a): a for a in cells(cfg)}
    picked = {
        n: a
        for n, a in assignments.items()
        if not cfg.cells or n in cfg.cells or any(part in cfg.cells for part in n.rsplit("-", 1))
    }
    if cfg.cells and not picked:
        raise ConfigError(
            f"cells: none of {cfg.cells} is a cell of this sweep; cells: {', '.join(assignments)}"
        )
    plan_cells = [(n, resolve(cfg, a, out)) for n, a in picked.items()]
    if cfg.dry_run:
        return dry_run(cfg, plan_cells, picked)
    if not claimed:  # stages are keyed by hashes, so another grid or cell list may run in the same directory
        prepare_output_dir(
            out, resolved(cfg), command="experiments.sweep", recomputed=True, outputs=SWEEP_OUTPUTS
        )
    commit = git_commit()
    jobs: dict[Path, str] = {}
    with stopped_by_sigterm():
        run_cells(cfg, out, plan_cells, assignments, commit, jobs)
    if cfg.executor == "slurm" and cfg.wait:
        wait_for(list(jobs.values()))
    text = results(cfg, out, plan_cells, {n: assignments[n] for n, _ in plan_cells})
    print(text)
    final = {n: cell_state([s["dir"] for s in steps]) for n, steps in plan_cells}
    return {"output_dir": str(out), "cells": final, "jobs": {str(k): v for k, v in jobs.items()}}


def run_cells(
    cfg: SweepConfig,
    out: Path,
    plan_cells: list,
    assignments: dict,
    commit: str | None,
    jobs: dict[Path, str],
) -> None:
    for name, steps in plan_cells:
        atomic_write_json(
            out / "cells" / f"{name}.json",
            {
                "cell": name,
                "assignment": assignments[name],
                "git_commit": commit,
                "executor": cfg.executor,
                "stages": [
                    {
                        "name": s["name"],
                        "command": s["command"],
                        "recipe": s["recipe"],
                        "overrides": s["overrides"],
                        "output_dir": str(s["dir"]),
                        "command_line": shlex.join(command_line(s)),
                    }
                    for s in steps
                ],
            },
        )
        state = run_cell(cfg, steps, jobs)
        print(f"cell {name}: {state}", flush=True)


def run_cell(cfg: SweepConfig, steps: list[dict[str, Any]], jobs: dict[Path, str]) -> str:
    """Run (local) or submit (slurm) the cell's unfinished stages in order; a failed stage stops its cell."""
    after: list[str] = []
    for step in steps:
        current = status(step["dir"])
        if current["state"] == "done":
            continue
        if current["state"] == "failed" and not cfg.retry_failed:
            print(
                f"  {step['name']} failed before ({current.get('error', '')[:200]}); retry_failed=true runs it again"
            )
            return "failed"
        if cfg.executor == "local":
            if not run_local(step):
                state = status(step["dir"])
                print(f"  {step['name']} {state['state']}: {state.get('error', '')[:300]}")
                return state["state"]
            continue
        if step["dir"] in jobs:  # a stage another cell shares, submitted in this pass
            after = [jobs[step["dir"]]]
        elif current["state"] == "submitted" and in_queue(current["job_id"]):
            jobs[step["dir"]] = after_job = current["job_id"]
            after = [after_job]
        else:
            jobs[step["dir"]] = submit(cfg, step, after)
            after = [jobs[step["dir"]]]
    return "submitted" if cfg.executor == "slurm" and after else "done"


def wait_for(job_ids: list[str], poll: float = 2.0) -> None:
    while any(in_queue(j) for j in job_ids):
        time.sleep(poll)


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("sweeps", argv, SweepConfig)
    result = run(cfg)
    print(json.dumps(result, indent=2, default=str))
    sys.exit(0 if cfg.dry_run else exit_code(result))


def exit_code(result: dict[str, Any]) -> int:
    """1 when a cell failed; 3 (as a stage's outage) when one is incomplete and a re-run would finish it; else 0."""
    states = set(result.get("cells", {}).values())
    return 1 if "failed" in states else OUTAGE_EXIT if states & {"incomplete", "interrupted"} else 0


if __name__ == "__main__":
    main()

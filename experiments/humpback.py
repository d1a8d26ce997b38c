"""Humpback: instruction backtranslation with self-curation, iterated (Li et al. 2023), as one command.

    python -m experiments.humpback recipe=humpback_demo [iterations=2] [threshold=5]
                                       [executor=local|slurm] [dry_run=true] [retry_failed=true]

The loop is a chain of this project's own commands, each resumable and runnable alone:

    seed pairs ---------------------------------(train/sft.py reverse_pairs=true)--> backward model M_yx
    documents --(data_synth.corpus)--> passages --(data_synth.augment, M_yx)--> candidate pairs A
    seed pairs --(train/sft.py)--> M0
    for i in 1..iterations:
        A --(data_synth.tag taggers=[curation], judge M_{i-1})--> scores --(data_synth.select score >= k)--> A_k
        seed (system prompt S_a) + A_k (S_w) --(train/sft.py dataset_mixture)--> M_i
    M0, M1, ... --(eval.pairwise, both orders)--> leaderboard

It runs through `experiments.sweep` (one cell): each stage's directory is named by a hash of what it runs, under
`stages/` (an iteration's stages under `stages/iter<i>/`), a finished stage is skipped, a killed one resumes, and
`executor=slurm` submits the same stages as dependent jobs. At the end, `report.md` and `report.json` hold the
corpus and augmentation counts, each iteration's score distribution, unparseable-score rate and kept counts, examples
of kept and rejected pairs, and the M0-vs-M_i table.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from core.config import cli, load_config, resolved
from core.data import data_files, open_dataset, take_rows
from core.io import atomic_write_json, atomic_write_text
from core.recipes import merge_recipe
from core.rundir import prepare_output_dir
from eval.scores import markdown_table
from experiments.sweep import Slurm, Stage, SweepConfig, exit_code, status
from experiments.sweep import run as run_sweep

# The paper's system-prompt tags (v1 section 2.3, checked against its text): seed data is tagged S_a, augmented
# data S_w. Its best 7B result answers with both, concatenated, at inference (Table 8: 66.47 vs 59.96 untagged).
S_A = "Answer in the style of an AI Assistant."
S_W = "Answer with knowledge from web search."
SCORES = (1, 2, 3, 4, 5)
# AlpacaEval (v1) win rates against text-davinci-003, GPT-4 judge (the paper's Table 4; LLaMA-2 70B: its v3)
PAPER = {
    "Humpback 33B": 79.84,
    "Humpback 65B": 83.71,
    "Humpback LLaMA-2 70B": 87.94,
    "Guanaco 65B": 71.80,
    "LIMA 65B": 62.70,
}


@dataclass
class Step:
    """One step of the loop: its command's recipe and overrides, and where it runs (a sweep stage without a name)."""

    recipe: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    command: str | None = None  # only the seed step chooses: baselines (oasst1, ...) or synth (Magpie)
    accelerate_config: str = "cpu"
    gpus: int = 0
    nodes: int = 1


@dataclass
class HumpbackConfig:
    name: str = "humpback_demo"
    iterations: int = 2  # the paper's final models come after two
    threshold: int = 5  # keep candidates scored >= k: 5 gives A5, 4 gives A4
    # an existing `messages` data set as seed pairs; else the `seed` step makes them
    seed_data: str | None = None
    seed: Step = field(default_factory=lambda: Step(command="baselines", overrides={"name": "oasst1"}))
    corpus: Step = field(default_factory=Step)
    backward: Step = field(default_factory=Step)  # train/sft.py (reverse_pairs is set here)
    augment: Step = field(default_factory=Step)
    model: Step = field(default_factory=Step)  # train/sft.py for M0 and every M_i
    # M0 trains on the seed alone (paper: 500 steps)
    m0_overrides: dict[str, Any] = field(default_factory=dict)
    curate: Step = field(default_factory=Step)  # data_synth.tag (taggers=[curation] is set here)
    report: Step = field(default_factory=Step)  # data_synth.report: each iteration's data card and plots
    evaluate: Step = field(default_factory=Step)  # eval.pairwise
    seed_system_prompt: str = S_A
    augmented_system_prompt: str = S_W
    # what M1.. answer with; M0 (seed only) answers with none
    inference_system_prompt: str | None = f"{S_A} {S_W}"
    executor: Literal["local", "slurm"] = "local"
    slurm: Slurm = field(default_factory=Slurm)
    wait: bool = False
    dry_run: bool = False
    retry_failed: bool = False
    # default runs/backtranslate/<name>: the name from before the loop moved to experiments/, so earlier runs resume
    output_dir: str | None = None

    def __post_init__(self) -> None:
        if self.seed_data is None and self.seed.command not in ("baselines", "synth"):
            raise ValueError(f"seed.command: baselines or synth, got {self.seed.command!r}")


def _stage(name: str, command: str, step: Step, overrides: dict[str, Any], group: str | None = None) -> Stage:
    return Stage(
        name=name,
        command=command,
        recipe=step.recipe,
        overrides={**step.overrides, **overrides},
        accelerate_config=step.accelerate_config,
        gpus=step.gpus,
        nodes=step.nodes,
        group=group,
    )


def _adapter(step: Step, extra: dict[str, Any] | None = None) -> bool:
    """Whether a training step trains an adapter (LoRA/QLoRA): its model is then served from the merged copy."""
    return {**merge_recipe("sft", step.recipe, {}), **step.overrides, **(extra or {})}.get(
        "peft", "lora"
    ) != "none"


def trained(step: Step, name: str, extra: dict[str, Any] | None = None) -> str:
    """Where training stage `name`'s model is for inference."""
    return f"{{{name}}}/merged" if _adapter(step, extra) else f"{{{name}}}"


def stages(cfg: HumpbackConfig) -> list[Stage]:
    """The loop unrolled: every step a stage, iteration i's under stages/iter<i>/."""
    seed = cfg.seed_data or "{seed}"
    merge = {"merge_lora": True} if _adapter(cfg.model) else {}

    def model(i: int) -> str:  # where M_i is served from (M0 may train otherwise: m0_overrides)
        return trained(cfg.model, f"m{i}", cfg.m0_overrides if i == 0 else None)

    out = [] if cfg.seed_data else [_stage("seed", cfg.seed.command, cfg.seed, {})]
    out += [
        _stage("corpus", "corpus", cfg.corpus, {}),
        _stage(
            "backward",
            "sft",
            cfg.backward,
            {
                "dataset": seed,
                "reverse_pairs": True,
                **({"merge_lora": True} if _adapter(cfg.backward) else {}),
            },
        ),
        _stage(
            "augment",
            "augment",
            cfg.augment,
            {"model": trained(cfg.backward, "backward"), "input": "{corpus}"},
        ),
        _stage(
            "m0",
            "sft",
            cfg.model,
            {
                "dataset": seed,
                **({"merge_lora": True} if _adapter(cfg.model, cfg.m0_overrides) else {}),
                **cfg.m0_overrides,
            },
            group="iter0",
        ),
    ]
    for i in range(1, cfg.iterations + 1):
        group, kept, judge = f"iter{i}", f"{{select{i}}}", model(i - 1)
        keep = [{"column": "curation_score", "op": ">=", "value": cfg.threshold}]
        out += [
            _stage(
                f"curate{i}",
                "tag",
                cfg.curate,
                {"input": "{augment}", "taggers": ["curation"], "judge.model": judge},
                group,
            ),
            _stage(
                f"report{i}",
                "report",
                cfg.report,
                {"input": f"{{curate{i}}}", "name": f"candidates scored by m{i - 1}"},
                group,
            ),
            Stage(
                name=f"select{i}",
                command="select",
                group=group,
                overrides={"input": f"{{curate{i}}}", "filters": keep},
            ),
            _stage(
                f"m{i}",
                "sft",
                cfg.model,
                {
                    "dataset_mixture": {seed: 1.0, kept: 1.0},
                    **merge,
                    "system_prompts": {seed: cfg.seed_system_prompt, kept: cfg.augmented_system_prompt},
                },
                group,
            ),
        ]
    models = {f"m{i}": model(i) for i in range(cfg.iterations + 1)}
    prompts = {f"m{i}": cfg.inference_system_prompt for i in range(1, cfg.iterations + 1)}
    out.append(
        _stage(
            "evaluate",
            "pairwise",
            cfg.evaluate,
            {"models": models, "system_prompts": prompts if cfg.inference_system_prompt else {}},
        )
    )
    return out


def sweep_config(cfg: HumpbackConfig) -> SweepConfig:
    return SweepConfig(
        name=cfg.name,
        stages=stages(cfg),
        score_model=f"m{cfg.iterations}",
        executor=cfg.executor,
        slurm=cfg.slurm,
        wait=cfg.wait,
        dry_run=cfg.dry_run,
        retry_failed=cfg.retry_failed,
        output_dir=cfg.output_dir or f"runs/backtranslate/{cfg.name}",
    )


# ---------------------------------------------------------------------------------------------- report


def _manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _excerpt(text: str | None, n: int = 240) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def curation_summary(curate_dir: Path, threshold: int, examples: int = 2) -> dict[str, Any]:
    """Score distribution, unparseable rate, kept counts (A_k for every k) and examples, from one curate stage. Only
    the score columns are read whole; the example rows are taken alone."""
    table = pq.read_table(data_files(curate_dir), columns=["curation_score", "curation_failed"])
    scores = table.column("curation_score").to_pylist()
    failed = sum(bool(f) for f in table.column("curation_failed").to_pylist())
    counts = Counter(s for s in scores if s is not None)
    kept = [i for i, s in enumerate(scores) if (s or 0) >= threshold][:examples]
    rejected = sorted(
        (i for i, s in enumerate(scores) if s is not None and s < threshold), key=lambda i: scores[i]
    )
    picked = take_rows(open_dataset(curate_dir), kept + rejected[:examples]).to_pylist()

    def example(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "score": r["curation_score"],
            "instruction": _excerpt(r["messages"][0]["content"], 200),
            "passage": _excerpt(r["messages"][1]["content"]),
            "judge_reply": _excerpt(r["curation_reply"], 200),
        }

    return {
        "candidates": len(scores),
        "scores": {str(k): counts.get(k, 0) for k in SCORES},
        "unparseable": failed,
        "unparseable_rate": round(failed / max(1, len(scores)), 4),
        "kept_at": {f"A{k}": sum(v for s, v in counts.items() if s >= k) for k in (5, 4, 3)},
        "kept": sum(v for s, v in counts.items() if s >= threshold),
        "examples_kept": [example(r) for r in picked[: len(kept)]],
        "examples_rejected": [example(r) for r in picked[len(kept) :]],
    }


def report(cfg: HumpbackConfig) -> str | None:
    """report.md and report.json in the loop's directory, from the finished stages' own files."""
    sweep = sweep_config(cfg)
    out = Path(sweep.output_dir)
    cell = json.loads(next(iter((out / "cells").glob("*.json"))).read_text())
    dirs = {s["name"]: Path(s["output_dir"]) for s in cell["stages"]}
    if any(status(d)["state"] != "done" for d in dirs.values()):
        return None
    data: dict[str, Any] = {
        "corpus": _manifest(dirs["corpus"]),
        "augment": _manifest(dirs["augment"]),
        "threshold": cfg.threshold,
        "iterations": [],
    }
    seed_rows = len(open_dataset(cfg.seed_data or dirs["seed"]))
    for i in range(1, cfg.iterations + 1):
        tag = _manifest(dirs[f"curate{i}"])
        summary = curation_summary(dirs[f"curate{i}"], cfg.threshold)
        summary.update(
            judge=f"m{i - 1}",
            card=str(dirs[f"report{i}"] / "README.md"),
            protocol=tag.get("sources", {}).get("curation"),
            dir=str(dirs[f"curate{i}"].parent),
            judge_calls=tag.get("judge_calls"),
            training_rows={"seed": seed_rows, "curated": summary["kept"]},
        )
        data["iterations"].append(summary)
    board = dirs["evaluate"] / "leaderboard.md"
    data["leaderboard"] = board.read_text() if board.is_file() else None
    data["paper"] = PAPER
    atomic_write_json(out / "report.json", data)
    aug = data["augment"]
    rows = [
        {
            "iteration": i,
            "judge": it["judge"],
            **{f"score {k}": it["scores"][str(k)] for k in SCORES},
            "unparseable": f"{it['unparseable']} ({100 * it['unparseable_rate']:.1f}%)",
            **it["kept_at"],
            f"kept (>= {cfg.threshold})": it["kept"],
            "trained on": f"{seed_rows} seed + {it['kept']} curated",
        }
        for i, it in enumerate(data["iterations"], 1)
    ]
    lines = [
        f"# Humpback: {cfg.name}",
        "",
        f"Corpus: {data['corpus'].get('documents')} documents -> {data['corpus'].get('passages')} passages "
        f"(dropped: {data['corpus'].get('dropped')}).",
        f"Self-augmentation: {aug.get('rows')} candidate pairs from {aug.get('passages')} passages "
        f"({aug.get('failed')} failed, {aug.get('truncated')} instructions cut at max_tokens).",
        "",
        "## Self-curation",
        "",
        markdown_table(rows, list(rows[0])),
    ]
    for i, it in enumerate(data["iterations"], 1):
        lines += [f"Iteration {i} scoring: {it['protocol']}. Data card and plots: `{it['card']}`.", ""]
        for kind in ("kept", "rejected"):
            for ex in it[f"examples_{kind}"]:
                lines += [f"- {kind}, score {ex['score']}: **{ex['instruction']}** -> {ex['passage']}"]
        lines.append("")
    lines += [
        "## M0 against the curated models (pairwise, both orders)",
        "",
        data["leaderboard"] or "(not run)",
        "",
        "Paper, AlpacaEval v1 win rate against text-davinci-003 (GPT-4 judge): "
        + ", ".join(f"{k} {v}" for k, v in PAPER.items())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    return text


def run(cfg: HumpbackConfig) -> dict[str, Any]:
    if cfg.seed_data is not None:
        open_dataset(cfg.seed_data)  # fail now, naming it, not inside the first training stage
    sweep = sweep_config(cfg)
    if not cfg.dry_run:  # what this loop was asked to run, beside its report (the stages keep their own)
        prepare_output_dir(
            sweep.output_dir,
            resolved(cfg),
            command="experiments.humpback",
            inputs=(cfg.seed_data,),
            recomputed=True,
        )
    result = run_sweep(sweep, claimed=True)
    if not cfg.dry_run:
        text = report(cfg)
        if text:
            print(text)
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("humpback", argv, HumpbackConfig)
    raise SystemExit(exit_code(run(cfg)))


if __name__ == "__main__":
    main()

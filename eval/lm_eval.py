"""Benchmarks through lm-evaluation-harness, with the model's chat template applied.

    python -m eval.lm_eval model=PATH tasks=magpie_mini_mc,magpie_mini_gen [limit=8] [output_dir=DIR]

Runs `lm_eval.simple_evaluate` on a Hugging Face checkpoint (a directory, a Hub id or `embedded`). Tasks are
lm-eval's own (`mmlu`, `gsm8k`, ... need the Hub) plus the YAMLs in `include_path`, by default the two offline
tasks in `eval/lm_eval_tasks/`. Writes lm-eval's own `<model>/results_<datetime>.json` (and `samples_<task>_<datetime>.jsonl` with
log_samples) and `scores.jsonl` (eval.scores, in %).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config import ConfigError, cli, load_config, resolved
from core.models import resolve_model
from core.rundir import prepare_output_dir
from eval.scores import score_row, write_scores

TASKS_DIR = str(Path(__file__).parent / "lm_eval_tasks")


@dataclass
class LmEvalConfig:
    model: str = "embedded"  # a checkpoint directory, a Hub id or "embedded"
    name: str | None = None  # the model's name in scores.jsonl; default: the checkpoint directory's name
    tasks: list[str] = field(default_factory=lambda: ["magpie_mini_mc", "magpie_mini_gen"])
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # only the first N documents of each task (smoke tests)
    batch_size: int | str = 8  # or "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str | None = None  # default: "cuda" where a GPU is, else "cpu"
    include_path: str = TASKS_DIR  # a folder of extra task YAMLs
    apply_chat_template: bool = True
    trust_remote_code: bool = False
    log_samples: bool = False  # also write every prompt and reply to <model>/samples_<task>_<datetime>.jsonl
    output_dir: str = "runs/demo/lm_eval"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one lm-eval task")


def check_model(model: str) -> str:
    """The checkpoint lm-eval will load; a missing directory fails here rather than deep inside transformers."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model '{model}': {path} has no config.json (merge a LoRA adapter first)")
        return str(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model '{model}': no checkpoint directory at {path.resolve()}")
    if is_offline_mode() and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise ConfigError(f"model '{model}': not a local directory, nor a Hub model in the cache (offline)")
    return model


def check_tasks(tasks: list[str], known: list[str]) -> None:
    """Each name must be a task, group or tag lm-eval knows (or a YAML file); else fail naming close ones."""
    for task in tasks:
        if task not in known and not Path(task).is_file():  # lm-eval also takes a YAML file's path
            close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ConfigError(f"unknown lm-eval task '{task}'.{hint} `lm-eval ls tasks` lists them all.")


# Metrics lm-eval reports on their own scale; every other one is a fraction, reported in %.
OWN_SCALE = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "bleu", "chrf", "ter"}


def score_rows(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """A row per metric of each top-level task or group, with a 95% interval from lm-eval's stderr if any."""
    children = {c for subtasks in results.get("group_subtasks", {}).values() for c in subtasks}
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items() if task not in children else ():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            scale = 1 if metric in OWN_SCALE else 100
            se = metrics.get(f"{metric}_stderr,{filt}")
            ci = [scale * (value + z * se) for z in (-1.96, 1.96)] if isinstance(se, (int, float)) else []
            if ci and scale == 100:  # a normal interval around a proportion can leave [0, 100]; clip it
                ci = [max(0.0, ci[0]), min(100.0, ci[1])]
            rows.append(score_row(name, task, metric if filt == "none" else key, scale * value, *ci))
    return rows


@cli
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    (cfg,) = load_config("lm_eval", argv, LmEvalConfig)
    model = check_model(cfg.model)
    name = cfg.name or Path(model.rstrip("/")).name

    import lm_eval
    import torch
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import setup_logging

    setup_logging("WARNING")  # lm-eval's format; LMEVAL_LOG_LEVEL=INFO shows more
    model_args = {"pretrained": model, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    # Model arguments go into task metadata, as lm-eval's own CLI does (some tasks read the tokenizer there).
    task_manager = TaskManager(include_path=cfg.include_path, metadata=dict(model_args))
    check_tasks(cfg.tasks, task_manager.all_tasks)

    out = Path(cfg.output_dir)
    resuming = prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.lm_eval",
        inputs=(cfg.model, cfg.include_path),
        overwrite=cfg.overwrite,
    )
    previous = results_files(out)
    if resuming and previous:
        results = json.loads(previous[-1].read_text())
    else:
        # lm-eval's own tracker writes lm-eval's own files: <model>/results_<datetime>.json (with task_hashes,
        # the chat template and its hash) and <model>/samples_<task>_<datetime>.jsonl, as its CLI does, so
        # lm-eval's utilities (get_results_filenames, get_file_task_name) and its Hub uploads read them.
        tracker = EvaluationTracker(output_path=str(out))
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            apply_chat_template=cfg.apply_chat_template,
            fewshot_as_multiturn=cfg.apply_chat_template,  # shots as chat turns, as lm-eval's CLI does
            log_samples=cfg.log_samples,
            evaluation_tracker=tracker,
            task_manager=task_manager,
        )
        samples = raw.pop("samples", None)
        tracker.save_results_aggregated(results=raw, samples=samples)
        for task, task_samples in (samples or {}).items():
            tracker.save_results_samples(task_name=task, samples=task_samples)
        results = json.loads(results_files(out)[-1].read_text())

    rows = score_rows(name, results)
    write_scores(out, rows)
    print("| model | benchmark | metric | value | ci_low | ci_high |\n|---|---|---|---|---|---|")
    for r in rows:
        numbers = ("" if r[k] is None else f"{r[k]:.2f}" for k in ("value", "ci_low", "ci_high"))
        print("| " + " | ".join([r["model"], r["benchmark"], r["metric"], *numbers]) + " |")
    return rows


def results_files(out: Path) -> list[Path]:
    """lm-eval's aggregated results files under `out`, oldest first (their names carry the datetime)."""
    from lm_eval.utils import get_results_filenames

    return sorted(Path(f) for f in get_results_filenames([str(p) for p in out.glob("*/results_*.json")]))


if __name__ == "__main__":
    main()

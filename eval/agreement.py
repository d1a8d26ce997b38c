"""How far a judge agrees with an official leaderboard: score the leaderboard's published outputs with any judge.

    python -m eval.agreement recipe=alpaca_eval_gpt41 published=alpaca_eval/results \
        leaderboard=alpaca_eval/src/alpaca_eval/leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv
    python -m eval.agreement recipe=arena_hard_gpt41 bench=arena_hard published=arena-hard-data/data/arena-hard-v0.1 \
        leaderboard=arena-hard-auto/leaderboard/arena_hard_leaderboard_20240731.csv

A reproduction judged today uses another judge than the paper's. Before trusting its numbers, score models whose
official numbers are known, from their published outputs, with the same judge and the same command as your own
models, and see whether the ranking and the scores agree:

- `alpaca_eval`: `published` is alpaca_eval's `results/` directory (`<model>/model_outputs.json`, the baseline's
  `gpt4_1106_preview` among them); `leaderboard` its leaderboard CSV (the model in the first, unnamed column;
  `win_rate`, `length_controlled_winrate`). Each model is scored by eval.alpaca_eval.
- `arena_hard`: `published` is arena-hard-auto's `data/arena-hard-v0.1/` (`question.jsonl`, `model_answer/`, the
  baseline's gpt-4-0314 among them); `leaderboard` its CSV (`model`, `score`). Scored by eval.arena_hard.

Per metric both have (win rate; LC where alpaca_eval's df_gamed.csv can be read; Arena-Hard's score): Spearman's rho,
Kendall's tau-b, the mean absolute difference and the mean signed difference (ours - official), over the models
(the baseline excluded: it is 50 by definition), each with a 95% percentile interval from a paired bootstrap over the
models, and for AlpacaEval also over the instructions (the same resampled instructions for every model; it needs no
new judge call). With few models the interval over models is wide: it says how much the choice of models matters.
The judges' verdicts are cached under `output_dir`, so a re-run, or a run with more models, asks only what is new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.config import ConfigError, cli, load_config, resolved
from core.io import atomic_write_json
from core.judge import JudgeConfig
from core.rundir import prepare_output_dir
from eval.scores import write_table

BASELINES = {"alpaca_eval": "gpt4_1106_preview", "arena_hard": "gpt-4-0314"}
# our metric name -> the official leaderboard's column
COLUMNS = {
    "alpaca_eval": {"win_rate": "win_rate", "lc_win_rate": "length_controlled_winrate"},
    "arena_hard": {"score": "score"},
}


@dataclass
class AgreementConfig:
    bench: Literal["alpaca_eval", "arena_hard"] = "alpaca_eval"
    published: str = ""  # the leaderboard's published outputs (see above)
    leaderboard: str = ""  # its CSV
    models: list[str] = field(default_factory=list)  # default: every published model with a leaderboard row
    baseline: str | None = None  # default: the benchmark's (gpt4_1106_preview, gpt-4-0314)
    max_questions: int | None = None  # the first N (AlpacaEval: alpaca_eval's max_instances rule)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=1, logprobs=20))
    df_gamed: str | None = None  # AlpacaEval's LC: a local df_gamed.csv (else the Hub's, when online)
    n_bootstrap: int = 1000
    seed: int = 0
    output_dir: str = "runs/eval/agreement"


def official_scores(path: str, bench: str) -> pd.DataFrame:
    """The leaderboard CSV as one row per model, indexed by the model's name, with the benchmark's columns."""
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"leaderboard: no such file {path}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise ConfigError(f"leaderboard: {path} is not a CSV ({str(e).splitlines()[0][:120]})") from None
    # alpaca_eval writes the model as the unnamed index column; arena-hard-auto as `model`
    name = "model" if "model" in df.columns else df.columns[0]
    wanted = [c for c in COLUMNS[bench].values() if c in df.columns]
    if not wanted:
        raise ConfigError(
            f"leaderboard: {path} has none of the columns {list(COLUMNS[bench].values())} of a {bench} leaderboard"
        )
    return df.set_index(name)[wanted].astype(float)


def rank_agreement(official: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Spearman's rho, Kendall's tau-b (both scipy's, ties averaged), mean absolute and signed difference."""
    from scipy import stats

    # a judge that gives every model the same score ranks nothing: no correlation (NaN), not a warning
    ranked = np.ptp(official) > 0 and np.ptp(ours) > 0
    return {
        "spearman": float(stats.spearmanr(official, ours).statistic) if ranked else float("nan"),
        "kendall": float(stats.kendalltau(official, ours).statistic) if ranked else float("nan"),
        "mean_abs_diff": float(np.mean(np.abs(ours - official))),
        "mean_diff": float(np.mean(ours - official)),
    }


def interval(replicates: list[dict[str, float]]) -> dict[str, list[float]]:
    """The 2.5th and 97.5th percentiles of each statistic over the bootstrap replicates that define it."""
    out = {}
    for key in ("spearman", "kendall", "mean_abs_diff", "mean_diff"):
        values = np.array([r[key] for r in replicates], dtype=float)
        values = values[np.isfinite(values)]
        out[key] = (
            [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else []
        )
    return out


def over_models(official: np.ndarray, ours: np.ndarray, n: int, seed: int) -> dict[str, list[float]]:
    """Resample the models (the pairs of official and our score), skipping replicates with fewer than 3 distinct
    models, where a rank correlation says nothing."""
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(n):
        idx = rng.integers(0, len(official), len(official))
        if len(set(idx.tolist())) >= 3:
            replicates.append(rank_agreement(official[idx], ours[idx]))
    return interval(replicates)


def over_prompts(official: np.ndarray, prefs: np.ndarray, n: int, seed: int) -> dict[str, list[float]]:
    """Resample the instructions, the same ones for every model (a paired bootstrap), and recompute each model's
    win rate from its per-instruction preferences (models x instructions, 0..1, NaN where the judge gave none)."""
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(n):
        idx = rng.integers(0, prefs.shape[1], prefs.shape[1])
        replicates.append(rank_agreement(official, 100 * np.nanmean(prefs[:, idx], axis=1)))
    return interval(replicates)


def judged_models(cfg: AgreementConfig, official: pd.DataFrame) -> list[str]:
    published = Path(cfg.published)
    where = published / "model_answer" if cfg.bench == "arena_hard" else published
    if not where.is_dir():
        raise ConfigError(f"published: no such directory {where}")
    files = (
        {p.stem: p for p in where.glob("*.jsonl")}
        if cfg.bench == "arena_hard"
        else {p.parent.name: p for p in where.glob("*/model_outputs.json")}
    )
    baseline = cfg.baseline or BASELINES[cfg.bench]
    if baseline not in files:
        raise ConfigError(f"published: no outputs of the baseline {baseline} in {where}")
    models = cfg.models or sorted(m for m in files if m in official.index and m != baseline)
    for m in models:
        if m not in files:
            raise ConfigError(f"models: no published outputs of {m} in {where} (found: {sorted(files)})")
        if m not in official.index:
            raise ConfigError(f"models: {m} has no row in {cfg.leaderboard}")
    if len(models) < 3:
        raise ConfigError(
            f"models: a rank agreement needs at least 3 models with outputs and a leaderboard row, got {models}"
        )
    return models


def score_alpaca_eval(cfg: AgreementConfig, models: list[str], out: Path) -> tuple[dict, np.ndarray]:
    """Each model through eval.alpaca_eval (its own output directory and judge cache); its metrics and its
    per-instruction preferences (0..1)."""
    from eval.alpaca_eval import AlpacaEvalConfig, read_annotations
    from eval.alpaca_eval import run as alpaca_eval

    baseline = Path(cfg.published) / (cfg.baseline or BASELINES["alpaca_eval"]) / "model_outputs.json"
    lc = lc_available(cfg.df_gamed)
    scores, prefs = {}, []
    for m in models:
        result = alpaca_eval(
            AlpacaEvalConfig(
                model_outputs=str(Path(cfg.published) / m / "model_outputs.json"),
                reference_outputs=str(baseline),
                max_instances=cfg.max_questions,
                judge=cfg.judge,
                df_gamed=cfg.df_gamed,
                length_controlled=lc,
                output_dir=str(out / "alpaca_eval" / m),
            )
        )
        scores[m] = {"win_rate": result["win_rate"]}
        if "length_controlled_winrate" in result:
            scores[m]["lc_win_rate"] = result["length_controlled_winrate"]
        p = read_annotations(str(out / "alpaca_eval" / m / "annotations.json"))["preference"]
        prefs.append((p.astype(float) - 1).to_numpy())
    return scores, np.vstack(prefs)


def lc_available(df_gamed: str | None) -> bool:
    """Whether alpaca_eval's df_gamed.csv (for the LC win rate) can be had: asked once, not once per model (offline,
    each model would wait through the Hub client's retries)."""
    import httpx
    from huggingface_hub.errors import EntryNotFoundError

    from core.data import is_user_hub_error
    from eval.alpaca_eval import fetch_df_gamed

    try:
        fetch_df_gamed(df_gamed)
    except (OSError, EntryNotFoundError, httpx.HTTPError) as e:
        if not is_user_hub_error(e):
            raise
        print(
            f"no LC win rate: df_gamed.csv could not be downloaded ({type(e).__name__}); pass df_gamed=PATH"
        )
        return False
    return True


def score_arena_hard(cfg: AgreementConfig, models: list[str], out: Path) -> dict:
    from eval.arena_hard import ArenaHardConfig
    from eval.arena_hard import run as arena_hard
    from eval.scores import read_scores

    published = Path(cfg.published)
    arena_hard(
        ArenaHardConfig(
            answers=[str(published / "model_answer")],
            models=models,
            questions=str(published / "question.jsonl"),
            max_questions=cfg.max_questions,
            baseline=cfg.baseline or BASELINES["arena_hard"],
            judge=cfg.judge,
            layout="v0.1",
            seed=cfg.seed,
            output_dir=str(out),
        )
    )
    rows = read_scores(out / "arena_hard" / "scores.jsonl")
    return {
        r["model"]: {"score": r["value"]} for r in rows if r["metric"] == "score" and r["model"] in models
    }


def run(cfg: AgreementConfig) -> dict[str, Any]:
    official = official_scores(cfg.leaderboard, cfg.bench)
    models = judged_models(cfg, official)
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.agreement",
        inputs=(cfg.published, cfg.leaderboard),
        recomputed=True,
        outputs=("agreement.json", "agreement.md", "alpaca_eval", "arena_hard"),
    )
    prefs = None
    if cfg.bench == "alpaca_eval":
        ours, prefs = score_alpaca_eval(cfg, models, out)
    else:
        ours = score_arena_hard(cfg, models, out)
    result: dict[str, Any] = {"bench": cfg.bench, "judge": cfg.judge.model, "models": models, "metrics": {}}
    rows = []
    for metric, column in COLUMNS[cfg.bench].items():
        have = [m for m in models if metric in ours.get(m, {}) and column in official.columns]
        if len(have) < 3:
            continue
        o = official.loc[have, column].to_numpy()
        j = np.array([ours[m][metric] for m in have])
        stats = rank_agreement(o, j)
        intervals = {"over_models": over_models(o, j, cfg.n_bootstrap, cfg.seed)}
        if prefs is not None and metric == "win_rate":
            intervals["over_prompts"] = over_prompts(
                o, prefs[[models.index(m) for m in have]], cfg.n_bootstrap, cfg.seed
            )
        result["metrics"][metric] = {
            "official_column": column,
            **stats,
            "intervals": intervals,
            "n_models": len(have),
            "per_model": {
                m: {"official": float(a), "ours": float(b)} for m, a, b in zip(have, o, j, strict=True)
            },
        }
        for key in ("spearman", "kendall", "mean_abs_diff", "mean_diff"):
            rows.append(
                {
                    "metric": f"{cfg.bench}/{metric}",
                    "statistic": key,
                    "value": round(stats[key], 3)
                    if np.isfinite(stats[key])
                    else "undefined (constant scores)",
                    **{
                        f"95% CI ({how.replace('_', ' ')})": ", ".join(f"{x:.3f}" for x in ci[key])
                        for how, ci in intervals.items()
                    },
                    "models": len(have),
                }
            )
    if not result["metrics"]:
        raise ConfigError(
            f"leaderboard: none of {list(COLUMNS[cfg.bench].values())} could be compared for 3 models or more"
        )
    atomic_write_json(out / "agreement.json", _finite(result))
    columns = list(dict.fromkeys(c for r in rows for c in r))
    text = write_table(out / "agreement.md", rows, columns)
    per_model = [
        {"model": m, **{f"{k} (official)": round(v["per_model"][m]["official"], 2) for k, v in result["metrics"].items() if m in v["per_model"]},
         **{f"{k} (ours)": round(v["per_model"][m]["ours"], 2) for k, v in result["metrics"].items() if m in v["per_model"]}}
        for m in models
    ]  # fmt: skip
    result["table"] = text + "\n" + write_table(out / "per_model.md", per_model, list(per_model[0]))
    return result


def _finite(value: Any) -> Any:
    """NaN (a correlation of constant scores) as null: agreement.json stays strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("agreement", argv, AgreementConfig)
    result = run(cfg)
    print(result.pop("table"))
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, default=str))


if __name__ == "__main__":
    main()

"""One leaderboard across evaluation runs: a row per model, a column per benchmark metric with its interval.

    python -m eval.leaderboard runs=runs/eval/magpie,runs/eval/sharegpt output_dir=runs/leaderboard

Reads every `scores.jsonl` under the given directories (eval.alpaca_eval, eval.arena_hard, eval.mt_bench,
eval.lm_eval and eval.pairwise write them) and writes `leaderboard.md`, `leaderboard.csv` and `leaderboard.png` (a bar chart per
metric with 95% intervals as error bars).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError, cli, load_config, resolved
from core.io import atomic_write_bytes
from core.rundir import MOVED_ASIDE, prepare_output_dir
from eval.scores import SCORES_FILE, read_scores, write_table

# Headline metrics first, in the order the paper reports them; anything else follows alphabetically.
PREFERRED = [
    "alpaca_eval/lc_win_rate",
    "alpaca_eval/win_rate",
    "arena_hard/score",
    "arena_hard/score_style_controlled",
]


@dataclass
class LeaderboardConfig:
    runs: list[str] = field(default_factory=list)  # directories searched recursively for scores.jsonl
    output_dir: str = "runs/leaderboard"


def collect(runs: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(model, "benchmark/metric"): row}; the same score (value and interval) reported twice is fine, two different
    ones are not: which one the table showed would depend on the order of `runs`."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    origin: dict[tuple[str, str], Path] = {}
    for run in runs:
        # A run moved aside by overwrite=true (<dir>.old-<time>) is not among the runs asked for
        files = [
            f
            for f in sorted(Path(run).rglob(SCORES_FILE))
            if not any(MOVED_ASIDE.search(part) for part in f.relative_to(run).parts)
        ]
        if not files:
            raise ConfigError(
                f"runs: no {SCORES_FILE} under '{run}' (run an evaluation with output_dir there first)"
            )
        for path in files:
            for row in read_scores(path):
                key = (row["model"], f"{row['benchmark']}/{row['metric']}")
                if key in table and not same_score(table[key], row):
                    shown = lambda r: f"{r['value']} [{r['ci_low']}, {r['ci_high']}]"  # noqa: E731
                    raise ConfigError(
                        f"{row['model']} has two different {key[1]} scores: {shown(table[key])} in {origin[key]} "
                        f"and {shown(row)} in {path}; pass runs that do not overlap"
                    )
                table[key], origin[key] = row, path
    return table


def same_score(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def close(x: float | None, y: float | None) -> bool:
        return (
            x is None and y is None or (x is not None and y is not None and math.isclose(x, y, abs_tol=1e-9))
        )

    return all(close(a[k], b[k]) for k in ("value", "ci_low", "ci_high"))


def pivot(table: dict[tuple[str, str], dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Models (best first on the first column) and metric columns (headline metrics first)."""
    columns = sorted(
        {c for _, c in table}, key=lambda c: (PREFERRED.index(c) if c in PREFERRED else len(PREFERRED), c)
    )
    first = columns[0]
    models = sorted(
        {m for m, _ in table}, key=lambda m: -table[(m, first)]["value"] if (m, first) in table else math.inf
    )
    return models, columns


# Decimals shown per benchmark where one is too few: MT-Bench's 1-10 scores are published with two (6.39, 6.27)
DECIMALS = {"mt_bench": 2}


def _cell(row: dict[str, Any] | None, decimals: int = 1) -> str:
    if row is None:
        return "-"
    if row["ci_low"] is None or row["ci_high"] is None:
        return f"{row['value']:.{decimals}f}"
    return f"{row['value']:.{decimals}f} [{row['ci_low']:.{decimals}f}, {row['ci_high']:.{decimals}f}]"


def markdown_rows(table: dict, models: list[str], columns: list[str]) -> list[dict[str, str]]:
    """A row per model, a cell per metric: the value with its interval, `-` where the model has none."""
    return [
        {"model": m} | {c: _cell(table.get((m, c)), DECIMALS.get(c.split("/")[0], 1)) for c in columns}
        for m in models
    ]


def csv_rows(table: dict, models: list[str], columns: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """A row per model, three columns per metric (value, ci_low, ci_high), empty where there is none."""
    header = ["model"] + [f"{c}{s}" for c in columns for s in ("", "_ci_low", "_ci_high")]
    rows = []
    for m in models:
        row: dict[str, Any] = {"model": m}
        for c in columns:
            score = table.get((m, c)) or {}
            row |= {
                c: score.get("value"),
                f"{c}_ci_low": score.get("ci_low"),
                f"{c}_ci_high": score.get("ci_high"),
            }
        rows.append(row)
    return rows, header


def to_png(table: dict, models: list[str], columns: list[str]) -> bytes:
    """One horizontal bar chart per metric, models in the same order everywhere, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(columns), figsize=(4.2 * len(columns), 0.45 * len(models) + 1.6), squeeze=False
    )
    for ax, column in zip(axes[0], columns, strict=True):
        rows = [table.get((m, column)) for m in models]
        values = [r["value"] if r else math.nan for r in rows]
        errors = [
            [r["value"] - r["ci_low"] if r and r["ci_low"] is not None else 0 for r in rows],
            [r["ci_high"] - r["value"] if r and r["ci_high"] is not None else 0 for r in rows],
        ]
        ax.barh(range(len(models)), values, xerr=errors, capsize=3, color="#4c72b0")
        ax.set_yticks(range(len(models)), models if ax is axes[0][0] else [""] * len(models))
        ax.invert_yaxis()
        ax.set_title(column, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def build(runs: list[str], output_dir: str) -> str:
    table = collect(runs)
    models, columns = pivot(table)
    out = Path(output_dir)
    markdown = write_table(out / "leaderboard.md", markdown_rows(table, models, columns), ["model", *columns])
    write_table(out / "leaderboard.csv", *csv_rows(table, models, columns))
    atomic_write_bytes(out / "leaderboard.png", to_png(table, models, columns))
    return markdown


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("leaderboard", argv, LeaderboardConfig)
    if not cfg.runs:
        raise ConfigError("runs is empty: give runs=DIR[,DIR...] (directories holding scores.jsonl files)")
    # Its own directory, locked; a re-run with other runs= replaces its own tables, never another command's files.
    prepare_output_dir(
        cfg.output_dir,
        resolved(cfg),
        command="eval.leaderboard",
        inputs=tuple(cfg.runs),
        recomputed=True,
        outputs=("leaderboard.md", "leaderboard.csv", "leaderboard.png"),
    )
    print(build(cfg.runs, cfg.output_dir))
    print(f"-> {cfg.output_dir}/leaderboard.md, leaderboard.csv, leaderboard.png")


if __name__ == "__main__":
    main()

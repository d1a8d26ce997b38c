"""The one file every evaluation leaves behind for `eval.leaderboard`: `<output_dir>/scores.jsonl`.

Each row is one number: {"model", "benchmark", "metric", "value", "ci_low", "ci_high"} (interval bounds may be
null when the benchmark has none). Writers replace their own rows; the leaderboard pivots all of them.

`write_table` writes the tables people read (`leaderboard.csv`, `leaderboard.md`) for every evaluation.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.io import atomic_write_text, read_jsonl, write_jsonl

SCORES_FILE = "scores.jsonl"
FIELDS = ("model", "benchmark", "metric", "value", "ci_low", "ci_high")


def score_row(
    model: str,
    benchmark: str,
    metric: str,
    value: float,
    ci_low: float | None = None,
    ci_high: float | None = None,
) -> dict[str, Any]:
    return {
        "model": model,
        "benchmark": benchmark,
        "metric": metric,
        "value": finite(value, f"{model} {benchmark}/{metric}: the score"),
        "ci_low": None if ci_low is None else float(ci_low),
        "ci_high": None if ci_high is None else float(ci_high),
    }


def finite(value: Any, what: str) -> float:
    """`value` as a float; ConfigError naming `what` for anything but a finite number (NaN, inf, None, text)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} is {value!r}, not a finite number")
    return float(value)


def write_scores(output_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Replace the rows of the same (model, benchmark, metric) in `output_dir/scores.jsonl`, keep the rest."""
    path = Path(output_dir) / SCORES_FILE
    new = {(r["model"], r["benchmark"], r["metric"]): r for r in rows}
    kept = [
        r
        for r in (read_scores(path) if path.exists() else [])
        if (r["model"], r["benchmark"], r["metric"]) not in new
    ]
    write_jsonl(path, kept + list(new.values()))
    return path


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    try:
        rows = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not rows:
        raise ConfigError(f"{path}: no score rows (an empty file)")
    for i, row in enumerate(rows, 1):
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ConfigError(f"{path}:{i}: missing fields {missing} (expected {list(FIELDS)})")
        for key in ("value", "ci_low", "ci_high"):
            if row[key] is not None or key == "value":
                finite(row[key], f"{path}:{i}: '{key}'")
    return rows


def csv_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`columns` of `rows` as CSV (the csv module's excel dialect: CRLF line ends); keys not in `columns` are
    left out, missing keys and None are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`columns` of `rows` as a GitHub Markdown table, each cell as str() writes it (None: empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Write `rows` to `path` (atomically) as the table its suffix names, `.csv` or `.md`; return the text."""
    path = Path(path)
    formats = {".csv": csv_table, ".md": markdown_table}
    if path.suffix not in formats:
        raise ValueError(f"{path}: a table is written as .csv or .md, not '{path.suffix}'")
    text = formats[path.suffix](rows, columns)
    atomic_write_text(path, text)
    return text

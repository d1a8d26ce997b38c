"""Select a subset of tagged conversations with explicit, reported rules (the paper's filters and the authors' released recipe).

    python -m data_synth.select recipe=pro_300k_filtered input=runs/tagged output_dir=runs/pro_300k

A recipe states filters (column, op, value), optional near-duplicate removal, a sort, a top-k and a shuffle;
`drop_contaminated: true` first drops the rows `data_synth.decontaminate` flagged (any `contaminated_*` column).
The paper's subsets are recipes: `air_300k_filtered`, `pro_300k_filtered`, `code_release`, `alpagasus`.
Every filter's removal count is printed and written to `manifest.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.chat import CONVERSATION_COLUMNS, first_turn
from core.config import ConfigError, cli, load_config, resolved
from core.data import iter_rows, open_dataset, take_rows
from core.io import atomic_write_json, write_parquet
from core.rundir import prepare_output_dir
from data_synth.decontaminate import FLAG
from data_synth.labels import DIFFICULTY, QUALITY

# Ordinal labels compare by rank: `input_quality >= good` keeps good and excellent.
ORDINAL = {"input_quality": QUALITY, "difficulty": DIFFICULTY}
ROWS_PER_SHARD = 100_000
OPS = ("==", "!=", ">", ">=", "<", "<=", "in", "not_in", "endswith", "not_endswith")


@dataclass
class Filter:
    column: str = ""
    op: Literal["==", "!=", ">", ">=", "<", "<=", "in", "not_in", "endswith", "not_endswith"] = "=="
    value: Any = None


@dataclass
class SelectConfig:
    input: str = "runs/demo/tagged"
    output_dir: str = "runs/demo/selected"
    filters: list[Filter] = field(default_factory=list)
    drop_contaminated: bool = False  # drop the rows data_synth.decontaminate flagged (contaminated_*)
    dedup_clusters: bool = False  # keep the first row of each near-duplicate cluster (needs cluster_id)
    sort_by: str | None = None  # e.g. response_length (longest first with descending=true)
    descending: bool = True
    top_k: int | None = None
    shuffle: bool = False
    seed: int = 42
    overwrite: bool = False


# Columns a rule may name although the input lacks them (the Magpie authors' releases do): derived from the
# first user turn and its answer
DERIVED = {
    "instruction": lambda q, a: q,
    "response": lambda q, a: a,
    "instruction_length": lambda q, a: len(q),
    "response_length": lambda q, a: len(a),
}


def needed_columns(cfg: SelectConfig) -> list[str]:
    """The columns the recipe's rules read: only these are loaded, never whole rows."""
    names = [f.column for f in cfg.filters] + ([cfg.sort_by] if cfg.sort_by else [])
    if cfg.dedup_clusters:
        names += ["cluster_id", "min_similar_conversation_id", "conversation_id"]
    return list(dict.fromkeys(names))


def derived(rows: Iterable[list[dict]], columns: list[str], where: str) -> dict[str, list]:
    """The DERIVED `columns` of every row, batch by batch (a row with no conversation fails, naming it)."""
    values: dict[str, list] = {c: [] for c in columns}
    n = 0
    for batch in rows:
        for row in batch:
            q, a = first_turn(row, f"{where}: row {n}")
            for c in columns:
                values[c].append(DERIVED[c](q, a))
            n += 1
    return values


def with_derived_columns(df: pd.DataFrame, cfg: SelectConfig) -> pd.DataFrame:
    """The rules' DERIVED columns that `df` lacks, from its conversation column(s)."""
    missing = [c for c in needed_columns(cfg) if c in DERIVED and c not in df]
    if missing:
        df = df.assign(**derived([df.to_dict("records")], missing, "input"))
    return df


def check_filter(f: Filter, df: pd.DataFrame, where: str) -> None:
    """Fail before any work on a missing column or a value that cannot be compared with it."""
    if f.column not in df.columns:
        raise ConfigError(
            f"{where}: column '{f.column}' does not exist; columns: {', '.join(sorted(df.columns))}"
        )
    if f.column in ORDINAL and f.op in ("==", "!=", ">", ">=", "<", "<="):
        if f.value not in ORDINAL[f.column]:
            raise ConfigError(
                f"{where}: value {f.value!r} for '{f.column}' must be one of {ORDINAL[f.column]}"
            )
        return
    if f.op in ("in", "not_in"):
        if not isinstance(f.value, list):
            raise ConfigError(f"{where}: op '{f.op}' needs a list value, got {f.value!r}")
        return
    if f.op in ("endswith", "not_endswith"):
        if not isinstance(f.value, str):
            raise ConfigError(f"{where}: op '{f.op}' needs a string value, got {f.value!r}")
        return
    numeric = pd.api.types.is_numeric_dtype(df[f.column]) and not pd.api.types.is_bool_dtype(df[f.column])
    if f.op in (">", ">=", "<", "<=") and (
        not numeric or isinstance(f.value, bool) or not isinstance(f.value, (int, float))
    ):
        raise ConfigError(
            f"{where}: '{f.column} {f.op} {f.value!r}' needs a numeric column and a numeric threshold "
            f"(column dtype {df[f.column].dtype}, value {type(f.value).__name__})"
        )


def mask(f: Filter, df: pd.DataFrame) -> pd.Series:
    """Rows that pass; a missing value (a failed judgment) never passes."""
    col = df[f.column]
    present = col.notna()
    if f.column in ORDINAL and f.op in ("==", "!=", ">", ">=", "<", "<="):
        rank = {label: i for i, label in enumerate(ORDINAL[f.column])}
        col, value = col.map(rank), rank[f.value]
        present = col.notna()
    else:
        value = f.value
    if f.op == "in":
        return present & col.isin(value)
    if f.op == "not_in":
        return present & ~col.isin(value)
    # the raw text, as the Magpie authors' `not example['instruction'].endswith(':')` (data_sft/data_filter.ipynb):
    # an instruction ending ": " does not end with ":"
    if f.op == "endswith":
        return present & col.astype(str).str.endswith(value)
    if f.op == "not_endswith":
        return present & ~col.astype(str).str.endswith(value)
    compare = {
        "==": col.__eq__,
        "!=": col.__ne__,
        ">": col.__gt__,
        ">=": col.__ge__,
        "<": col.__lt__,
        "<=": col.__le__,
    }
    return present & compare[f.op](value).fillna(False).astype(bool)


def select(df: pd.DataFrame, cfg: SelectConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows that pass (their index is their position in the input) and what each step removed."""
    df = with_derived_columns(df, cfg)
    for i, f in enumerate(cfg.filters):
        check_filter(f, df, f"filters[{i}]")
    authors = {"min_similar_conversation_id", "conversation_id"} <= set(df.columns)
    if cfg.dedup_clusters and "cluster_id" not in df.columns and not authors:
        raise ConfigError(
            "dedup_clusters: needs 'cluster_id' (the neighbors tagger) or the Magpie authors' "
            "'min_similar_conversation_id' and 'conversation_id'; run the neighbors tagger first"
        )
    if cfg.sort_by and cfg.sort_by not in df.columns:
        raise ConfigError(
            f"sort_by: column '{cfg.sort_by}' does not exist; run the tagger that adds it first"
        )
    steps = [{"step": "input", "removed": 0, "remaining": len(df)}]
    if cfg.drop_contaminated:
        flags = [c for c in df.columns if c.startswith(FLAG)]
        if not flags:
            raise ConfigError(
                f"drop_contaminated: no '{FLAG}<benchmark>' column; run data_synth.decontaminate on the input first"
            )
        # a missing flag (a row never checked) is not a flag: counted, as a filter's missing values are
        keep = ~df[flags].astype("boolean").fillna(False).any(axis=1).astype(bool)
        steps.append(
            {
                "step": "drop_contaminated",
                "columns": flags,
                "removed": int((~keep).sum()),
                "missing_values": int(df[flags].isna().any(axis=1).sum()),
                "remaining": int(keep.sum()),
            }
        )
        df = df[keep]
    for f in cfg.filters:
        keep = mask(f, df)
        steps.append(
            {
                "step": f"{f.column} {f.op} {f.value}",
                "removed": int((~keep).sum()),
                "missing_values": int(df[f.column].isna().sum()),
                "remaining": int(keep.sum()),
            }
        )
        df = df[keep]
    if cfg.dedup_clusters:
        before = len(df)
        if "cluster_id" in df:
            # The first row of each cluster is its id (data_synth.tag); keep the earliest survivor of each cluster.
            df = df.sort_index().drop_duplicates("cluster_id", keep="first")
        else:  # the Magpie authors' rule: keep a row whose nearest similar conversation is itself (or none)
            similar = df["min_similar_conversation_id"]
            df = df[similar.isna() | (similar == df["conversation_id"])]
        steps.append({"step": "dedup_clusters", "removed": before - len(df), "remaining": len(df)})
    if cfg.sort_by:
        df = df.sort_values(cfg.sort_by, ascending=not cfg.descending, kind="stable")
    elif cfg.shuffle:  # no sort: top_k is then a random sample
        df = shuffled(df, cfg.seed)
    if cfg.top_k is not None:
        steps.append(
            {
                "step": f"top_k {cfg.top_k} by {cfg.sort_by}",
                "removed": max(0, len(df) - cfg.top_k),
                "remaining": min(len(df), cfg.top_k),
            }
        )
        df = df.head(cfg.top_k)
    if cfg.shuffle and cfg.sort_by:  # the code release sorts, keeps the top k, then shuffles
        df = shuffled(df, cfg.seed)
    return df, steps


def shuffled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The order `datasets.Dataset.shuffle(seed=seed)` gives (numpy's default_rng(seed).permutation), which the
    Magpie authors' release used: the same seed gives their order."""
    return df.iloc[np.random.default_rng(seed).permutation(len(df))]


def run(cfg: SelectConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out, resolved(cfg), command="data_synth.select", inputs=(cfg.input,), overwrite=cfg.overwrite
    )
    ds = open_dataset(cfg.input)  # Arrow, memory-mapped
    # Only the columns the rules read become a frame; derived ones are computed batch by batch.
    present = [c for c in needed_columns(cfg) if c in ds.column_names]
    if cfg.drop_contaminated:
        present += [c for c in ds.column_names if c.startswith(FLAG) and c not in present]
    frame = ds.select_columns(present).to_pandas() if present else pd.DataFrame(index=range(len(ds)))
    derive = [c for c in needed_columns(cfg) if c in DERIVED and c not in ds.column_names]
    if derive:
        conversation = ds.select_columns([c for c in CONVERSATION_COLUMNS if c in ds.column_names])
        frame = frame.assign(**derived(iter_rows(conversation), derive, cfg.input))
    for i, f in enumerate(cfg.filters):  # name every column a rule could use, not just the loaded ones
        if f.column not in frame and f.column not in ds.column_names:
            raise ConfigError(
                f"filters[{i}]: column '{f.column}' does not exist; columns: "
                f"{', '.join(sorted({*ds.column_names, *DERIVED}))}"
            )
    chosen, steps = select(frame, cfg)
    # The chosen rows as they were read, under the input's schema (an empty selection keeps it too), taken from
    # the Arrow table shard by shard.
    for old in out.glob("train-*.parquet"):
        old.unlink()
    index = chosen.index.to_numpy()
    for k, start in enumerate(range(0, max(len(index), 1), ROWS_PER_SHARD)):
        write_parquet(
            out / f"train-{k:05d}.parquet",
            take_rows(ds, index[start : start + ROWS_PER_SHARD]),
        )
    summary = {"input_rows": len(ds), "selected_rows": len(chosen), "steps": steps}
    atomic_write_json(out / "manifest.json", summary)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("select", argv, SelectConfig)
    summary = run(cfg)
    width = max(len(s["step"]) for s in summary["steps"])
    for s in summary["steps"]:
        print(f"{s['step']:<{width}}  removed {s['removed']:>9,}  remaining {s['remaining']:>9,}")
    print(json.dumps({"selected_rows": summary["selected_rows"], "output_dir": cfg.output_dir}))


if __name__ == "__main__":
    main()

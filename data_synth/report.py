"""A Markdown dataset card and PNG plots of a (tagged) conversation set, optionally against others.

    python -m data_synth.report input=runs/demo/tagged compare=runs/sharegpt,runs/wildchat output_dir=runs/demo/report

Plots whatever columns exist: task categories, input quality and difficulty, reward histogram, instruction and
response lengths, and an embedding coverage map (t-SNE of first-turn embeddings of this set against the
compared sets: the paper's Figure 3).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.chat import CONVERSATION_COLUMNS, first_turn, to_messages  # noqa: E402
from core.config import cli, load_config, resolved
from core.data import iter_rows, open_dataset
from core.embed import embed  # noqa: E402
from core.io import atomic_write_text  # noqa: E402
from core.rundir import prepare_output_dir  # noqa: E402
from data_synth.decontaminate import FLAG  # noqa: E402
from data_synth.labels import DIFFICULTY, QUALITY, TASK_CATEGORIES  # noqa: E402


@dataclass
class ReportConfig:
    input: str = "runs/demo/tagged"
    compare: list[str] = field(default_factory=list)
    output_dir: str = "runs/demo/report"
    name: str | None = None  # defaults to the input directory's name
    embedder: str = "embedded-embedder"
    max_points: int = 2000  # per set, for the coverage map
    seed: int = 0
    overwrite: bool = False


# What the card and plots read besides the conversation: small tag columns, read as columns (not rows)
STAT_COLUMNS = (
    "task_category",
    "input_quality",
    "difficulty",
    "language",
    "instruct_reward",
    "reward_difference",
    "min_neighbor_distance",
    "repeat_count",
    "generator",
    "curation_score",
)


def _frame(path: str) -> tuple[pd.DataFrame, Any]:
    """One row of statistics per conversation (lengths, user turns, the tag columns), streamed batch by batch
    from the Arrow data set: the texts themselves are never all in memory. Returns the frame and the data set
    (the coverage map samples texts from it)."""
    ds = open_dataset(path)
    conversation = ds.select_columns([c for c in CONVERSATION_COLUMNS if c in ds.column_names])
    instruction, response, turns = [], [], []
    for batch in iter_rows(conversation):
        for row in batch:
            messages = to_messages(row, f"{path}: row {len(turns)}")  # any conversation layout
            first = first_turn({"messages": messages})
            instruction.append(len(first[0]))
            response.append(len(first[1]))
            turns.append(sum(m["role"] == "user" for m in messages))
    stats = [c for c in ds.column_names if c in STAT_COLUMNS or c.startswith(FLAG)]  # + decontaminate's flags
    df = ds.select_columns(stats).to_pandas()
    df["instruction_chars"], df["response_chars"], df["user_turns"] = instruction, response, turns
    return df, ds


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _bar(ax: plt.Axes, counts: Counter, order: list[str], title: str) -> None:
    labels = [o for o in order if o in counts] + sorted(k for k in counts if k not in order and k is not None)
    ax.barh(labels[::-1], [counts[k] for k in labels][::-1], color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel("conversations")


def plots(
    df: pd.DataFrame, others: dict[str, pd.DataFrame], texts: dict[str, Any], cfg: ReportConfig, out: Path
) -> list[str]:
    images = []
    if "task_category" in df:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _bar(ax, Counter(df["task_category"].dropna()), TASK_CATEGORIES, "Task categories")
        images.append(_save(fig, out / "task_categories.png"))
    ordinal = [(c, o) for c, o in (("input_quality", QUALITY), ("difficulty", DIFFICULTY)) if c in df]
    if ordinal:
        fig, axes = plt.subplots(1, len(ordinal), figsize=(6 * len(ordinal), 3.5), squeeze=False)
        for ax, (column, order) in zip(axes[0], ordinal, strict=True):
            _bar(ax, Counter(df[column].dropna()), order, column.replace("_", " ").capitalize())
        images.append(_save(fig, out / "quality_difficulty.png"))
    if "curation_score" in df:  # Humpback's self-curation scores, the failed ones counted apart
        fig, ax = plt.subplots(figsize=(6, 3.5))
        scores = df["curation_score"]
        _bar(
            ax,
            Counter(str(int(v)) for v in scores.dropna()),
            ["1", "2", "3", "4", "5"],
            f"Curation score ({scores.isna().sum()} unparseable)",
        )
        images.append(_save(fig, out / "curation_score.png"))
    rewards = [c for c in ("instruct_reward", "reward_difference") if c in df and df[c].notna().any()]
    if rewards:
        fig, axes = plt.subplots(1, len(rewards), figsize=(6 * len(rewards), 3.5), squeeze=False)
        for ax, column in zip(axes[0], rewards, strict=True):
            ax.hist(df[column].dropna(), bins=30, color="#55a868")
            ax.set_title(f"{column} ({df[column].notna().sum()} scored)")
        images.append(_save(fig, out / "reward.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, column in zip(axes, ("instruction", "response"), strict=True):
        for name, frame in {cfg.name or "this set": df, **others}.items():
            ax.hist(frame[f"{column}_chars"], bins=40, alpha=0.6, label=name)
        ax.set_title(f"{column} length (characters)")
        ax.legend()
    images.append(_save(fig, out / "lengths.png"))
    images.append(coverage_map(texts, cfg, out))
    return images


def coverage_map(sets: dict[str, Any], cfg: ReportConfig, out: Path) -> str:
    """t-SNE of the first turns of up to `max_points` random conversations of each set (`sets`: name -> data set)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(cfg.seed)
    texts, owner = [], []
    for name, ds in sets.items():
        pick = np.sort(rng.permutation(len(ds))[: cfg.max_points])
        texts += [first_turn(r)[0] for r in ds.select(pick).to_list()]
        owner += [name] * len(pick)
    emb = embed(texts, cfg.embedder, 256)
    perplexity = float(min(30, max(2, (len(texts) - 1) // 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=cfg.seed).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    owner_arr = np.array(owner)
    for name in sets:
        sel = owner_arr == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=f"{name} ({sel.sum()})")
    ax.set_title("Instruction coverage (t-SNE of sentence embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3)
    return _save(fig, out / "coverage.png")


def card(df: pd.DataFrame, name: str, images: list[str], manifest: dict[str, Any]) -> str:
    lines = [f"# {name}", "", f"{len(df):,} conversations.", ""]
    if "generator" in df:
        lines += [f"Generator: {', '.join(sorted(map(str, df['generator'].dropna().unique())))}.", ""]
    lines += [
        "| statistic | value |",
        "|---|---|",
        f"| user turns per conversation (mean) | {df['user_turns'].mean():.2f} |",
        f"| instruction length, characters (median) | {df['instruction_chars'].median():.0f} |",
        f"| response length, characters (median) | {df['response_chars'].median():.0f} |",
    ]
    for column in ("input_quality", "difficulty", "task_category", "language", "curation_score"):
        if column in df:
            top = Counter(df[column].dropna()).most_common(12)
            lines += [
                "",
                f"**{column}** ({df[column].isna().sum()} missing): " + ", ".join(f"{k} {v}" for k, v in top),
            ]
    if "instruct_reward" in df and df["instruct_reward"].notna().any():
        r = df["instruct_reward"].dropna()
        lines += [
            "",
            f"**instruct_reward**: mean {r.mean():.3f}, median {r.median():.3f}, min {r.min():.3f}, max {r.max():.3f}",
        ]
    if "min_neighbor_distance" in df:
        lines += [
            "",
            f"**near duplicates**: {(df['min_neighbor_distance'] <= 0).sum()} rows with an identical "
            f"neighbour; {(df.get('repeat_count', pd.Series(dtype=int)) > 0).sum()} with a neighbour closer than the threshold",
        ]
    # data_synth.decontaminate's flags; the questions hit are in its manifest when this is its output
    flags = [c for c in df.columns if c.startswith(FLAG)]
    if flags:
        hit = manifest.get("benchmarks") if isinstance(manifest.get("benchmarks"), dict) else {}
        lines += [
            "",
            "**Benchmark contamination** (rows overlapping an evaluation prompt, data_synth.decontaminate):",
            "",
            "| benchmark | rows flagged | share of rows | benchmark questions hit |",
            "|---|---|---|---|",
        ]
        for column in flags:
            bench, n = column[len(FLAG) :], int(df[column].astype("boolean").fillna(False).sum())
            known = hit.get(bench, {})
            questions = (
                f"{known['questions_hit']} of {known['questions']}"
                if "questions_hit" in known and "questions" in known
                else "-"
            )
            lines.append(f"| {bench} | {n:,} | {n / max(len(df), 1):.2%} | {questions} |")
    if manifest.get("sources"):
        lines += ["", "Where the tags come from:", ""] + [
            f"- `{k}`: {v}" for k, v in manifest["sources"].items()
        ]
    lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def run(cfg: ReportConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.report",
        inputs=(cfg.input, *cfg.compare, cfg.embedder),
        overwrite=cfg.overwrite,
    )
    name = cfg.name or Path(cfg.input).name
    cfg.name = name
    df, ds = _frame(cfg.input)
    compared = {Path(p).name: _frame(p) for p in cfg.compare}
    others = {k: frame for k, (frame, _) in compared.items()}
    texts = {name: ds, **{k: d for k, (_, d) in compared.items()}}
    manifest_path = Path(cfg.input) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    images = plots(df, others, texts, cfg, out)
    atomic_write_text(out / "README.md", card(df, name, images, manifest))
    return {"rows": len(df), "images": images, "card": str(out / "README.md")}


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("report", argv, ReportConfig)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()

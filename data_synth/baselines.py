"""The comparison SFT sets, normalized to `messages`: ShareGPT, WildChat, Evol-Instruct, UltraChat, Tulu V2 Mix,
OpenHermes 2.5; and Humpback's seed pairs from OpenAssistant (oasst1).

    python -m data_synth.baselines name=sharegpt [source=FILE_OR_HUB_ID] [max_samples=N dedup=true] output_dir=DIR

Each set's real Hub id and split are the default `source`; a local JSON/JSONL/Parquet file or directory in the
same schema works too. Schemas understood: `messages` (role/content), WildChat's `conversation` (role/content
plus metadata), ShareGPT-style `conversations` (from/value with human/gpt/system), and `instruction`/`input`/
`output`. Broken rows are dropped and counted by reason, never silently.

`oasst1` reads OpenAssistant's message trees (one row per message: `message_id`, `parent_id`, `role`
prompter/assistant, `text`, `lang`, `rank`, `deleted`) and keeps what Humpback's seed keeps: each tree's first
turn, English, with its highest-ranked reply (rank 0). The paper samples 3,200 of them (`max_samples=3200`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chat import check_messages, to_messages
from core.config import ConfigError, cli, load_config, resolved
from core.data import load_rows, open_dataset
from core.io import atomic_write_json, write_parquet
from core.recipes import shipped
from core.rundir import prepare_output_dir

# name: (Hub id, split, what the paper used)
SOURCES = {
    "sharegpt": ("anon8231489123/ShareGPT_Vicuna_unfiltered", "train", "ShareGPT, 112K after cleaning"),
    "wildchat": ("allenai/WildChat", "train", "WildChat, 652K"),
    "evol_instruct": ("WizardLMTeam/WizardLM_evol_instruct_V2_196k", "train", "Evol-Instruct, 143K"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft", "UltraChat, 208K"),
    "tulu_v2_mix": ("allenai/tulu-v2-sft-mixture", "train", "Tulu V2 Mix, 326K"),
    "openhermes": ("teknium/OpenHermes-2.5", "train", "OpenHermes 2.5, 1M"),
    "oasst1": (
        "OpenAssistant/oasst1",
        "train",
        "Humpback's seed: oasst1 first turns, English, rank 0 (3,200)",
    ),
}
OASST_COLUMNS = ("message_id", "parent_id", "role", "text", "lang", "rank")
# Metadata worth keeping when a schema carries it (WildChat's model, language, toxicity flags, ...).
KEEP = (
    "id",
    "conversation_id",
    "model",
    "language",
    "toxic",
    "redacted",
    "turn",
    "dataset",
    "source",
    "category",
)


@dataclass
class BaselineConfig:
    name: str = "sharegpt"
    source: str | None = None  # a local file/dir, or a Hub id; defaults to the set's own Hub id
    split: str | None = None
    output_dir: str = "runs/baselines/sharegpt"
    max_samples: int | None = None  # sample down to N rows (seeded), after cleaning
    dedup: bool = False  # drop rows whose first user turn repeats an earlier one
    seed: int = 42
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ValueError(f"name: unknown baseline '{self.name}'; choose from {sorted(SOURCES)}")


def baseline_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The row's conversation (core.chat.to_messages), cut to its last complete exchange and checked."""
    messages = to_messages(row, where)
    # ShareGPT dumps often end on an unanswered user turn: the last complete exchange is what can be trained on.
    while messages and messages[-1]["role"] == "user":
        messages = messages[:-1]
    check_messages(messages, where)
    return messages


def oasst_first_turns(source: str, split: str) -> list[dict[str, Any]]:
    """Each oasst1 tree's root prompt with its rank-0 reply, both English: instruction/response rows. Rows are read
    as columns; a missing column fails naming it."""
    ds = open_dataset(source, split)
    missing = [c for c in OASST_COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{source}: not oasst1's message layout: no {missing} (columns: {', '.join(ds.column_names)})"
        )
    cols = {c: ds[c] for c in OASST_COLUMNS}
    deleted = ds["deleted"] if "deleted" in ds.column_names else [False] * len(ds)
    roots = {}
    for i, (mid, parent, role, lang) in enumerate(
        zip(cols["message_id"], cols["parent_id"], cols["role"], cols["lang"], strict=True)
    ):
        if parent is None and role == "prompter" and lang == "en" and not deleted[i]:
            roots[mid] = i
    rows = []
    for i, (parent, role, lang, rank) in enumerate(
        zip(cols["parent_id"], cols["role"], cols["lang"], cols["rank"], strict=True)
    ):
        if parent in roots and role == "assistant" and lang == "en" and rank == 0 and not deleted[i]:
            root = roots[parent]
            rows.append(
                {
                    "instruction": cols["text"][root],
                    "response": cols["text"][i],
                    "id": cols["message_id"][root],
                    "conversation_id": cols["message_id"][root],
                }
            )
    return rows


def run(cfg: BaselineConfig) -> dict[str, Any]:
    import pyarrow as pa

    out = Path(cfg.output_dir)
    hub_id, default_split, _ = SOURCES[cfg.name]
    source = shipped(cfg.source) if cfg.source else hub_id  # a shipped file works from a wheel too
    prepare_output_dir(
        out, resolved(cfg), command="data_synth.baselines", inputs=(source,), overwrite=cfg.overwrite
    )
    split = cfg.split or default_split
    rows = oasst_first_turns(source, split) if cfg.name == "oasst1" else load_rows(source, split)
    kept, dropped, seen, duplicates = [], {}, set(), 0
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        try:
            messages = baseline_messages(row, where)
        except (ConfigError, KeyError, TypeError) as e:
            # Counted by kind ("roles out of order", "assistant turn 1 is empty", ...), not per row.
            reason = (
                str(e).removeprefix(where + ": ").split(":")[0]
                if isinstance(e, ConfigError)
                else "malformed turn"
            )
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        first = next(m["content"] for m in messages if m["role"] == "user").strip().lower()
        if cfg.dedup and first in seen:
            duplicates += 1
            continue
        seen.add(first)
        kept.append(
            {
                "messages": messages,
                "source": cfg.name,
                **{k: row[k] for k in KEEP if k in row and k != "source"},
            }
        )
    if cfg.max_samples is not None and len(kept) > cfg.max_samples:
        kept = [kept[i] for i in sorted(random.Random(cfg.seed).sample(range(len(kept)), cfg.max_samples))]
    write_parquet(out / "train-00000.parquet", pa.Table.from_pylist(kept))
    summary = {
        "name": cfg.name,
        "source": source,
        "input_rows": len(rows),
        "rows": len(kept),
        "dropped": dropped,
        "duplicates_dropped": duplicates,
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("baselines", argv, BaselineConfig)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()

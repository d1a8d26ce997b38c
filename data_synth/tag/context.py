"""What taggers share: the models they run, built on first use, and the tags already written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.engines import Completion, free_memory
from core.io import read_parquet
from core.judge import Judge
from data_synth.scoring import Scorer


class Context:
    """What taggers share, each built on first use (so a finished tagger loads nothing): the scorer (judge and
    reward model), the URIAL base model, a guard model, the length tokenizer; and the tags already written, so a
    tagger that `needs` another reads its columns instead of computing them again."""

    def __init__(self, cfg: Any, out: Path, keys: pa.Array | None = None):
        self.cfg, self.out, self.keys = cfg, out, keys  # cfg: a TagConfig
        self._cache: dict[str, Any] = {}
        self.scorer = Scorer(
            cfg.judge,
            out / "judge_cache.sqlite",
            cfg.reward_model,
            cfg.reward_batch_size,
            cfg.reward_trust_remote_code,
        )
        # Positions (in the pairs a tagger was given) whose judge request the engine never answered: no result, so
        # the caller writes nothing for them and a re-run asks again. Every judge call of a tagger asks one prompt
        # per pair, in order, so a position names its pair. The caller clears it before each chunk.
        self.missing = self.scorer.missing

    @property
    def judge(self) -> Judge:
        return self.scorer.judge

    def ask(self, prompts: list[str], parse: Callable[[Completion], Any], desc: str, **protocol: Any) -> list:
        return self.scorer.ask(prompts, parse, desc, **protocol)

    def scores(self, prompts: list[str], low: int, high: int, desc: str) -> list[float | None]:
        return self.scorer.scores(prompts, low, high, desc)

    def rewards(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        return self.scorer.rewards(pairs)

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def built(self, key: str) -> Any:
        """What was built under `key` (the scorer's judge and rm too), or None when nothing asked for it."""
        return self.scorer.models.get(key) if key in ("judge", "rm") else self._cache.get(key)

    def release(self, keep: set[str]) -> None:
        """Close every model built so far but those in `keep` (judge, rm, base, guard), so the next tagger's model
        has the GPU to itself; the judge keeps its cache and reloads on its next call."""
        self.scorer.release(keep)
        for key in ("base", "guard"):
            if key in self._cache and key not in keep:
                getattr(self._cache.pop(key), "close", lambda: None)()
        free_memory()

    def earlier(self, name: str, idx: np.ndarray) -> pa.Table:
        """The columns tagger `name` wrote for rows `idx` (null where it has none)."""
        table = self.get(f"tags:{name}", lambda: aligned_tags(self.out / "tags" / name, self.keys))
        return table.take(pa.array(idx))


def aligned_tags(tag_dir: Path, keys: pa.Array, columns: list[str] | None = None) -> pa.Table:
    """A tagger's shards as one table with a row per input row, in input order: a tag counts only where its
    `row_key` is still that row's (a later shard overrides an earlier one); rows without one are null.
    `columns` reads only those tag columns (none: just which rows are tagged, `__tagged__`)."""
    shards = sorted(tag_dir.glob("part-*.parquet"))
    n = len(keys)
    if not shards:
        return pa.table({"__tagged__": pa.array(np.zeros(n, dtype=bool))})
    # promote: a chunk where every judgment failed has all-null (type null) columns; 64-bit offsets: text tags
    # (base responses) of a million rows pass 2 GB, and `take` concatenates each column first
    read = None if columns is None else ["row_index", "row_key", *columns]
    table = pa.concat_tables([read_parquet(s, columns=read) for s in shards], promote_options="default")
    table = table.cast(
        pa.schema([pa.field(f.name, _large(f.type), metadata=f.metadata) for f in table.schema])
    )
    index = table.column("row_index").to_numpy()
    inside = (index >= 0) & (index < n)
    current = np.zeros(len(index), dtype=bool)
    current[inside] = pc.equal(
        keys.take(pa.array(index[inside])), table.column("row_key").filter(pa.array(inside))
    ).to_numpy(zero_copy_only=False)
    position = np.full(n, -1, dtype=np.int64)
    picked = np.flatnonzero(current)
    position[index[picked]] = picked  # in shard order, so the last shard wins
    tagged = pa.array(position >= 0)
    values = table.drop_columns(["row_index", "row_key"])
    if not values.column_names:  # only which rows are tagged was asked for
        return pa.table({"__tagged__": tagged})
    return values.take(pa.array(position, mask=position < 0)).append_column("__tagged__", tagged)


def _large(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string(t):
        return pa.large_string()
    if pa.types.is_list(t):
        return pa.large_list(_large(t.value_type))
    return t

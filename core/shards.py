"""Resumable output: `ShardWriter` appends rows in atomic Parquet shards (a resumed run counts what is on disk);
`write_chunk` writes chunk k of an input whole, with a digest of what it was made from, so a changed input chunk is
redone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.io import atomic_write_json, parquet_schema, read_parquet, rows_in, write_parquet


def write_chunk(out_dir: str | Path, k: int, table: pa.Table, meta: dict[str, Any]) -> None:
    """Chunk `k`'s outcome, atomically: its rows as `train-k.parquet` with `meta` in the file's metadata, or, with no
    rows, `meta` alone as `_empty-k.json` (`datasets` fails on an empty Parquet file and skips `_` names). What a
    chunked stage resumes by: a chunk is done when `chunk_meta` finds it."""
    out_dir = Path(out_dir)
    if table.num_rows:
        write_parquet(
            out_dir / f"train-{k:05d}.parquet", table.replace_schema_metadata({"chunk": json.dumps(meta)})
        )
    else:
        atomic_write_json(out_dir / f"_empty-{k:05d}.json", meta)


def chunk_meta(out_dir: str | Path, k: int) -> dict[str, Any] | None:
    """What `write_chunk` stored for chunk `k`, or None when the chunk is not done."""
    shard, empty = Path(out_dir) / f"train-{k:05d}.parquet", Path(out_dir) / f"_empty-{k:05d}.json"
    if shard.is_file():
        return json.loads(parquet_schema(shard).metadata[b"chunk"])
    return json.loads(empty.read_text()) if empty.is_file() else None


def drop_chunk(out_dir: str | Path, k: int) -> None:
    """Remove chunk `k`'s outcome (ours: what `write_chunk` wrote), so that a resumed run redoes it."""
    (Path(out_dir) / f"train-{k:05d}.parquet").unlink(missing_ok=True)
    (Path(out_dir) / f"_empty-{k:05d}.json").unlink(missing_ok=True)


def finished_chunks(out_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every chunk `write_chunk` finished in `out_dir`: chunk number -> its metadata."""
    out_dir = Path(out_dir)
    numbers = {
        int(f.stem.rsplit("-", 1)[1])
        for f in [*out_dir.glob("train-*.parquet"), *out_dir.glob("_empty-*.json")]
    }
    return {k: chunk_meta(out_dir, k) for k in sorted(numbers)}


class ShardWriter:
    """Append rows to `out_dir/train-NNNNN.parquet`, one atomic file per flush.

    The `train-` prefix is what lets `datasets.load_dataset("parquet", data_dir=out_dir)` pick the shards
    and skip the run's config.yaml and manifest.json beside them.

    A killed run loses at most the rows still buffered; on restart `rows()` returns exactly the rows of
    complete shards, so the caller can skip what is done without duplicating anything. Shards flush
    every `rows_per_shard` rows or `flush_seconds`, whichever comes first.
    """

    def __init__(
        self,
        out_dir: str | Path,
        rows_per_shard: int = 500,
        flush_seconds: float = 60.0,
        split: str = "train",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self.split = split
        for tmp in self.out_dir.glob(f".{split}-*.tmp"):  # torn writes of a killed run
            tmp.unlink()
        self.shards = sorted(self.out_dir.glob(f"{split}-*.parquet"))
        # Rows are counted on disk, and a new shard is numbered past the highest existing one, so a deleted
        # shard never makes a resumed run overwrite another.
        self.n_written = rows_in(self.shards)
        self._next = 1 + max((int(s.stem.rsplit("-", 1)[1]) for s in self.shards), default=-1)

    @staticmethod
    def count(out_dir: str | Path, split: str = "train") -> int:
        """Rows in the complete shards of `out_dir` (from the Parquet footers; nothing is read)."""
        return rows_in(Path(out_dir).glob(f"{split}-*.parquet"))

    def rows(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            yield from read_parquet(shard).to_pylist()

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        self._buffer.extend(rows)
        if (
            len(self._buffer) >= self.rows_per_shard
            or time.monotonic() - self._last_flush > self.flush_seconds
        ):
            self.flush()

    @property
    def n_rows(self) -> int:
        return self.n_written + len(self._buffer)

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        path = self.out_dir / f"{self.split}-{self._next:05d}.parquet"
        self._next += 1
        write_parquet(path, pa.Table.from_pylist(self._buffer))
        self.shards.append(path)
        self.n_written += len(self._buffer)
        self._buffer = []

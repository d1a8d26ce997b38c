"""Files on disk: atomic writes, resumable Parquet shards, and loading conversation datasets."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every line a JSON object; a bad line fails naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


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
        self.n_written = sum(pq.ParquetFile(s).metadata.num_rows for s in self.shards)

    def rows(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            yield from pq.read_table(shard).to_pylist()

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
        path = self.out_dir / f"{self.split}-{len(self.shards):05d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self._buffer), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        self.shards.append(path)
        self.n_written += len(self._buffer)
        self._buffer = []


def load_rows(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local Parquet/JSONL file or directory, or a Hub dataset id (users have internet)."""
    import datasets

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl")) or sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet, .jsonl or .json files in this directory")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    elif path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(str(source), split=split)
    return ds.to_list()

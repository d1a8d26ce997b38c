"""Files on disk: atomic writes, resumable Parquet shards, and loading conversation datasets."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import ConfigError


def umask() -> int:
    """The process's umask, read without changing it (Linux exposes it in /proc; elsewhere set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s directory with the mode a plain `open()` would give (0644 under umask 022):
    `mkstemp` makes it 0600, and the rename would carry that private mode onto shared cluster filesystems."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; on success it is fsynced and renamed over `path`, on failure removed.
    For writers that want a file name rather than bytes (Parquet, large files)."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """The one Parquet writer: the whole table, atomically."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


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
        return json.loads(pq.read_schema(shard).metadata[b"chunk"])
    return json.loads(empty.read_text()) if empty.is_file() else None


def finished_chunks(out_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every chunk `write_chunk` finished in `out_dir`: chunk number -> its metadata."""
    out_dir = Path(out_dir)
    numbers = {
        int(f.stem.rsplit("-", 1)[1])
        for f in [*out_dir.glob("train-*.parquet"), *out_dir.glob("_empty-*.json")]
    }
    return {k: chunk_meta(out_dir, k) for k in sorted(numbers)}


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


def _rows_in(shards: Iterable[Path]) -> int:
    """Rows in Parquet files, read from their footers (no data is read)."""
    return sum(pq.ParquetFile(s).metadata.num_rows for s in shards)


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
        self.n_written = _rows_in(self.shards)
        self._next = 1 + max((int(s.stem.rsplit("-", 1)[1]) for s in self.shards), default=-1)

    @staticmethod
    def count(out_dir: str | Path, split: str = "train") -> int:
        """Rows in the complete shards of `out_dir` (from the Parquet footers; nothing is read)."""
        return _rows_in(Path(out_dir).glob(f"{split}-*.parquet"))

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
        path = self.out_dir / f"{self.split}-{self._next:05d}.parquet"
        self._next += 1
        write_parquet(path, pa.Table.from_pylist(self._buffer))
        self.shards.append(path)
        self.n_written += len(self._buffer)
        self._buffer = []


SPLIT_FILE = re.compile(r"^(train|test|validation|dev)([-.]|$)")


def data_files(directory: Path, split: str = "train") -> list[Path]:
    """The files of one split in a directory, named as `datasets` names them (`train-00000.parquet`, `test.jsonl`);
    a directory without split names is one split."""
    for ext in ("parquet", "jsonl", "json"):
        files = sorted(directory.glob(f"*.{ext}"))
        named = [f for f in files if SPLIT_FILE.match(f.name)]
        if not named:
            if files:
                return files
            continue
        mine = [f for f in named if SPLIT_FILE.match(f.name).group(1) == split]
        if not mine:
            found = sorted({SPLIT_FILE.match(f.name).group(1) for f in named})
            raise ConfigError(f"{directory}: no '{split}' split (found: {', '.join(found)})")
        return mine
    raise ConfigError(f"{directory}: no .parquet, .jsonl or .json files in this directory")


def open_dataset(source: str | Path, split: str = "train") -> Any:
    """One split of a local Parquet/JSONL file or directory, or of a Hub dataset (users have internet), as a
    `datasets.Dataset`: Arrow, memory-mapped from the cache, never the whole set as Python objects.

    Bad input fails with one line naming the file (and line, for JSONL); an empty input is an error too, so a
    stage never runs on nothing."""
    import datasets

    path = Path(source)
    if path.is_dir():
        files = data_files(path, split)
    elif path.is_file():
        files = [path]
    elif path.suffix in (".parquet", ".jsonl", ".json") or str(source).startswith((".", "/", "~")):
        raise ConfigError(f"{source}: no such file or directory")
    else:
        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as e:  # offline, unknown id, gated: datasets raises many types
            raise ConfigError(f"{source}: could not load split '{split}' from the Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None  # fmt: skip
        return _nonempty(ds, source)
    kind = "parquet" if files[0].suffix == ".parquet" else "json"
    if kind == "parquet" and _rows_in(files) == 0:
        raise ConfigError(f"{source}: 0 rows")  # datasets cannot even open an empty Parquet file
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        if (
            kind == "json"
        ):  # Arrow's JSON reader accepts bytes that are not UTF-8; they fail only when decoded
            for _ in ds.iter(batch_size=50_000):
                pass
        return _nonempty(ds, source)
    except ConfigError:
        raise
    except Exception as e:  # datasets buries the cause: find the file and line ourselves
        raise ConfigError(_diagnose(files, e)) from None


def load_rows(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """`open_dataset` as a list of row dicts: for small inputs (questions, outputs to compare), not data sets."""
    return open_dataset(source, split).to_list()


def remapped(ds: Any) -> Any:
    """The same data set on a fresh memory map of its Arrow cache files. Pages read through a map count in the
    process's RSS until the map is dropped (the kernel keeps them as page cache), so a pass over a set larger than
    memory reads each block through a map of its own and drops it: RSS then holds one block, not the whole set."""
    import datasets

    files = [f["filename"] for f in ds.cache_files]
    if not files or ds._indices is not None:  # in memory, or a selection of rows: nothing to unmap
        return ds
    parts = [datasets.Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def table_block(ds: Any, start: int, length: int) -> pa.Table:
    """Rows start..start+length of `ds` as an Arrow table, read through a memory map of their own."""
    return remapped(ds).data.table.slice(start, length)


def take_rows(ds: Any, indices: Any, block: int = 100_000) -> pa.Table:
    """Rows `indices` of `ds`, in that order, as one Arrow table with the input's schema. Arrow's `take` on a whole
    table first concatenates each column, which overflows 32-bit string offsets past 2 GB of text (1M Magpie rows
    are 2.5 GB); taking block by block, each through its own memory map, does not."""
    import numpy as np

    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    ranked = indices[order]
    pieces = []
    for start in range(0, len(ds), block):
        lo, hi = np.searchsorted(ranked, [start, start + block])
        if hi > lo:
            pieces.append(table_block(ds, start, block).take(pa.array(ranked[lo:hi] - start)))
    if not pieces:
        return table_block(ds, 0, 0)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_tables(pieces).take(pa.array(inverse))


def batch_rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A `datasets` batch (column -> values) as row dicts."""
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def iter_rows(ds: Any, batch_size: int = 10_000, block: int = 100_000) -> Iterator[list[dict[str, Any]]]:
    """A dataset's rows, `batch_size` at a time as row dicts: the Python objects of one batch at a time, and the
    mapped pages of one `block` of rows at a time."""
    for start in range(0, len(ds), block):
        part = remapped(ds).select(range(start, min(len(ds), start + block)))
        for batch in part.iter(batch_size=batch_size):
            yield batch_rows(batch)
        del part


def shard_bounds(ds: Any, source: str | Path, rows_per_shard: int = 100_000) -> list[tuple[int, int]]:
    """(start, length) of each output shard: the input's own Parquet shards where it has them, else blocks of
    `rows_per_shard`, so a stage that adds columns writes shards aligned with what it read."""
    path = Path(source)
    files = data_files(path) if path.is_dir() else [path] if path.is_file() else []
    if files and all(f.suffix == ".parquet" for f in files):
        sizes = [n for n in (pq.ParquetFile(f).metadata.num_rows for f in files) if n]
    else:
        sizes = [min(rows_per_shard, len(ds) - s) for s in range(0, len(ds), rows_per_shard)]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return list(zip(starts, sizes, strict=True))


def _nonempty(ds: Any, source: str | Path) -> Any:
    if len(ds) == 0:
        raise ConfigError(f"{source}: 0 rows")
    return ds


def _diagnose(files: list[Path], error: Exception) -> str:
    for f in files:
        if f.stat().st_size == 0:
            return f"{f}: the file is empty (0 bytes)"
        if f.suffix == ".parquet":
            try:
                pq.ParquetFile(f)
            except Exception as e:
                return f"{f}: not a readable Parquet file ({e})"
            continue
        data = f.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return f"{f}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
        if f.suffix == ".jsonl":
            try:
                read_jsonl(f)  # names the file and line of a bad row
            except ValueError as e:
                return str(e)
    cause = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{', '.join(map(str, files[:3]))}: could not be read ({type(error).__name__}: {cause})"

"""Files on disk: atomic writes, resumable Parquet shards, and loading conversation datasets."""

from __future__ import annotations

import contextlib
import errno
import hashlib
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


def follow_umask(directory: str | Path) -> None:
    """Give the private (0600) files another library left under `directory` the mode the umask gives: safetensors
    writes weights through a 0600 temp file, so a saved model or checkpoint would be unreadable to the group."""
    mode = 0o666 & ~umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600:
            path.chmod(mode)


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
        return json.loads(_named(pq.read_schema, shard).metadata[b"chunk"])
    return json.loads(empty.read_text()) if empty.is_file() else None


def drop_chunk(out_dir: str | Path, k: int) -> None:
    """Remove chunk `k`'s outcome (ours: what `write_chunk` wrote), so that a resumed run redoes it."""
    (Path(out_dir) / f"train-{k:05d}.parquet").unlink(missing_ok=True)
    (Path(out_dir) / f"_empty-{k:05d}.json").unlink(missing_ok=True)


def digest(parts: Iterable[str | bytes | None]) -> str:
    """A short hash of a sequence of texts (or bytes): what a result was computed from, the one key every stage
    resumes by when it resumes by content."""
    h = hashlib.sha1()
    for part in parts:
        data = (
            part
            if isinstance(part, bytes)
            else b""
            if part is None
            else part.encode("utf-8", "surrogatepass")
        )
        h.update(b"\x00" if part is None else data + b"\x01")
    return h.hexdigest()[:16]


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


def _named(read: Any, path: Path, **kwargs: Any) -> Any:
    """`read(path)` for a Parquet file; one that cannot be read (truncated by a copy or a full disk, or not Parquet)
    fails naming it. Our own writes are atomic, so such a file came from elsewhere: move it away to redo it."""
    try:
        return read(path, **kwargs)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and e.errno in LOCAL_FAILURES:  # the disk's failure, not the file's
            raise
        raise ConfigError(
            f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:160]}); if it is "
            "a shard of a run, move it away and re-run to redo its rows"
        ) from None


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return _named(pq.read_table, Path(path), columns=columns)


def parquet_rows(path: str | Path) -> int:
    """Rows in a Parquet file, from its footer (no data is read)."""
    return _named(pq.ParquetFile, Path(path)).metadata.num_rows


def _rows_in(shards: Iterable[Path]) -> int:
    return sum(parquet_rows(s) for s in shards)


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


SPLIT_FILE = re.compile(r"^(train|test|validation|dev)([-.]|$)")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
RUN_FILES = ("manifest.json", "results.json")  # what a stage writes beside its data: never data itself


def data_files(directory: Path, split: str = "train") -> list[Path]:
    """The files of one split in a directory, named as `datasets` names them (`train-00000.parquet`, `test.jsonl`);
    a directory without split names is one split. A split is read whole, in one format: files of two formats are
    refused naming one of each, never read as half the data. Names starting with `_` or `.` are skipped, as
    `datasets` skips them."""
    files = sorted(
        f
        for f in directory.iterdir()
        if f.suffix in DATA_SUFFIXES
        and f.name not in RUN_FILES
        and not f.name.startswith(("_", "."))
        and f.is_file()
    )
    if not files:
        raise ConfigError(f"{directory}: no .parquet, .jsonl or .json files in this directory")
    named = [f for f in files if SPLIT_FILE.match(f.name)]
    if named:
        files = [f for f in named if SPLIT_FILE.match(f.name).group(1) == split]
        if not files:
            found = sorted({SPLIT_FILE.match(f.name).group(1) for f in named})
            raise ConfigError(f"{directory}: no '{split}' split (found: {', '.join(found)})")
    one_each = {f.suffix: f for f in reversed(files)}
    if len(one_each) > 1:
        shown = " and ".join(f"{s} ({f.name})" for s, f in sorted(one_each.items()))
        raise ConfigError(
            f"{directory}: holds both {shown} files; a data set is read whole in one format, so keep "
            "one format per directory (convert or move the others)"
        )
    return files


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
        except (OSError, ValueError) as e:  # offline, unknown id, gated, no such split (not: a full disk)
            if not is_user_hub_error(e):
                raise
            raise ConfigError(
                f"{source}: could not load split '{split}' from the Hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from None
        return _nonempty(ds, source)
    kind = "parquet" if files[0].suffix == ".parquet" else "json"
    if kind == "parquet" and _rows_in(files) == 0:  # reads every footer: a truncated file is named here
        raise ConfigError(f"{source}: 0 rows")  # datasets cannot even open an empty Parquet file
    if kind == "json":
        for f in files:
            _check_head(f)
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        # Arrow's JSON reader accepts bytes that are not UTF-8; they fail only when decoded
        if kind == "json":
            for _ in ds.iter(batch_size=50_000):
                pass
        return _nonempty(ds, source)
    except ConfigError:
        raise
    except Exception as e:  # datasets buries the cause: find the file and line ourselves
        problem = _diagnose(files) or _data_error(files, e)
        if problem is None:  # nothing we can name in the input: not the user's error, so keep the trace
            raise
        raise ConfigError(problem) from None


# What a full or broken disk raises: our environment's failure, never reported as the user's input
LOCAL_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM}


def is_user_hub_error(e: BaseException) -> bool:
    """Whether an error loading from the Hub is the user's to fix (offline, an unknown or gated id, a wrong split),
    as opposed to a full disk or a library bug."""
    return not (isinstance(e, OSError) and e.errno in LOCAL_FAILURES)


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
        sizes = [n for n in (parquet_rows(f) for f in files) if n]
    else:
        sizes = [min(rows_per_shard, len(ds) - s) for s in range(0, len(ds), rows_per_shard)]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return list(zip(starts, sizes, strict=True))


def _check_head(path: Path, limit: int = 1 << 20) -> None:
    """The first line of a JSON/JSONL file, read before `datasets` scans the whole file (a 2 GB file of zeros kept
    it busy for minutes): it must start a JSON value, and, when whole within `limit` bytes, parse."""
    with open(path, "rb") as f:
        head = f.read(limit)
    if not head:
        raise ConfigError(f"{path}: the file is empty (0 bytes)")
    line, newline, _ = head.lstrip().partition(b"\n")
    if not line.startswith((b"{", b"[")):
        raise ConfigError(f"{path}:1: not JSON (it starts with {line[:16]!r})")
    if path.suffix == ".jsonl" and (newline or len(head) < limit):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}:1: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:1: expected a JSON object, got {type(row).__name__}")


def _nonempty(ds: Any, source: str | Path) -> Any:
    if len(ds) == 0:
        raise ConfigError(f"{source}: 0 rows")
    return ds


def _data_error(files: list[Path], error: BaseException) -> str | None:
    """Arrow's own complaint about the data (a column whose type changes between rows, say), found among the causes
    `datasets` wraps it in; None when the error is not about the data."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (pa.ArrowInvalid, pa.ArrowTypeError, json.JSONDecodeError, UnicodeDecodeError)):
            text = str(cause).splitlines()[0][:300] if str(cause) else ""
            return f"{', '.join(map(str, files[:3]))}: could not be read as data ({type(cause).__name__}: {text})"
        cause = cause.__cause__ or cause.__context__
    return None


def _diagnose(files: list[Path]) -> str | None:
    """What is wrong with the input files, naming the file (and line), or None when nothing is."""
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
        if f.suffix == ".json":
            try:
                json.loads(data)
            except json.JSONDecodeError as e:
                return f"{f}:{e.lineno}: not valid JSON ({e.msg})"
    return None

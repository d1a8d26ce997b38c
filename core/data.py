"""Reading data sets: a directory of split files, one file, or a Hub id, read whole or refused with the file and line
that is wrong; and walking them in Arrow blocks without holding a million rows as Python objects."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import ConfigError
from core.io import LOCAL_FAILURES, parquet_rows, read_jsonl, rows_in

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
    if kind == "parquet" and rows_in(files) == 0:  # reads every footer: a truncated file is named here
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

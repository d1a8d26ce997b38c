"""Files on disk: atomic writes (temp file, fsync, rename, the umask's mode) and reading JSONL and Parquet."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
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


# What a full or broken disk raises: our environment's failure, never reported as the user's input
LOCAL_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM}


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


def parquet_schema(path: str | Path) -> pa.Schema:
    return _named(pq.read_schema, Path(path))


def rows_in(shards: Iterable[Path]) -> int:
    """Rows in Parquet files, from their footers."""
    return sum(parquet_rows(s) for s in shards)

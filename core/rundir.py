"""Run directories: one run per directory (a lock), resume only with the same settings, and `overwrite=true` that
moves a previous run of the same command aside and never deletes anything."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from core.config import config_yaml, to_plain
from core.errors import ConfigError, first_line
from core.io import atomic_write_text

# Settings that change how a run executes, not what it produces: they may change when a run resumes (a dead
# server dropped from base_urls, a larger batch). Matched on the last part of a dotted key, in any group.
EXECUTION_ONLY = {
    "batch_size",
    "concurrency",
    "timeout",
    "base_urls",
    "api_key_env",
    "max_retries",
    "rows_per_shard",
    "chunk_size",
    "overwrite",
    "output_dir",
    "device",
    "reward_batch_size",
    "embed_batch_size",
    "max_engine_errors",
}

_LOCKS: dict[str, int] = {}  # output directories this process holds: path -> open lock file descriptor


def lock_output_dir(out: Path) -> None:
    """Hold `out/.lock` (flock) for the rest of this process, so two runs never write one directory; a second
    run fails at once naming the holder's PID. The kernel drops the lock when the process ends, however it ends."""
    import fcntl

    key = str(out.resolve())
    if key in _LOCKS:
        return
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"output_dir {out} is in use by another run (PID {holder}); wait for it to finish or choose "
            "another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def release_output_dir(out: str | Path) -> None:
    """Let go of a directory this process holds (tests and notebooks that run a stage, then another process)."""
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


HEADER = "# magpie-harness: written by {command}; re-run the same command here to resume it\n"
# Commands that moved: a run written under the old name is a run of the new one, so it resumes.
RENAMED = {"data_synth.backtranslate": "experiments.humpback"}
# what overwrite=true names a previous run: <dir>.old-<time>
MOVED_ASIDE = re.compile(r"\.old-\d{8}-\d{6}(-\d+)?$")


def owner(out: Path, command: str, config: dict[str, Any], outputs: tuple[str, ...] = ()) -> str | None:
    """Which command's run `out` holds (None: not ours, or nothing to tell). The command named in its config.yaml's
    first line (`HEADER`); for a run made before that line existed, `command` when its config.yaml has `config`'s
    keys, or when it has no config.yaml and holds nothing but `outputs` (the names `command` writes)."""
    cfg_file = out / "config.yaml"
    if cfg_file.is_file():
        with open(cfg_file, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        prefix = HEADER.partition("{command}")[0]
        if first.startswith(prefix):
            found = first[len(prefix) :].split(";")[0].strip()
            return RENAMED.get(found, found)
        try:
            keys = yaml.safe_load(cfg_file.read_text(encoding="utf-8", errors="replace"))
        except yaml.YAMLError:
            return None
        return command if isinstance(keys, dict) and set(keys) == set(config) else None
    results = _results(out)
    return command if results and outputs and all(p.name in outputs for p in results) else None


def _check_not_inside(out: Path, inputs: tuple[str | Path | None, ...]) -> None:
    """An output directory never is, or holds, what its run reads: rewriting or moving it aside would take the
    input with it."""
    target = out.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():  # Hub ids, `embedded`, server model names
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise ConfigError(
                f"output_dir {out} {'is' if source == target else 'holds'} this run's input {item}: "
                "write the output to another directory"
            )


def _results(out: Path) -> list[Path]:
    """What a run left in `out` besides its config and hidden files (the lock, temp files, bookkeeping)."""
    return [p for p in out.iterdir() if p.name != "config.yaml" and not p.name.startswith(".")]


def _check_ours(
    out: Path, command: str, config: dict[str, Any], outputs: tuple[str, ...], overwrite: bool
) -> None:
    """Refuse a directory that holds another command's run, another tool's config.yaml, or files and no config of
    ours; `overwrite` only ever applies to a previous run of `command`."""
    if not out.is_dir():
        return
    cfg_file, results = out / "config.yaml", _results(out)
    if not results and not cfg_file.is_file():
        return
    found = owner(out, command, config, outputs)
    if found == command:
        return
    if found is not None:
        raise ConfigError(
            f"output_dir {out} holds a run of {found}, not of {command}: choose another output_dir"
        )
    if overwrite:
        raise ConfigError(
            f"overwrite=true: output_dir {out} holds no config.yaml written by {command}, so it is not a previous "
            "run of this command; nothing was moved. Choose another output_dir, or clear it yourself"
        )
    if cfg_file.is_file():
        raise ConfigError(
            f"output_dir {out} holds a config.yaml that is not {command}'s: choose another output_dir"
        )
    raise ConfigError(
        f"output_dir {out} is not empty and has no config.yaml: it holds another tool's or run's data. Choose a new "
        "output_dir."
    )


def _move_aside(out: Path, entries: list[Path]) -> Path:
    """`overwrite=true`: the previous run's files go to a sibling `<dir>.old-<time>`, never deleted (the lock stays)."""
    out = out.resolve()  # `.` and `..` have no name to put a sibling beside
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
    try:
        aside.mkdir()
        for entry in entries:
            os.rename(entry, aside / entry.name)  # a rename: symlinks move as links, nothing is copied
    except OSError as e:
        raise ConfigError(
            f"overwrite: could not move the previous run in {out} aside to {aside} ({e.strerror})"
        ) from None
    return aside


def prepare_output_dir(
    output_dir: str | Path,
    config: dict[str, Any],
    *,
    command: str,
    inputs: tuple[str | Path | None, ...] = (),
    may_differ: tuple[str, ...] = (),
    recomputed: bool = False,
    outputs: tuple[str, ...] = (),
    overwrite: bool | None = None,
) -> bool:
    """Claim `output_dir` for a run of `command` (an exclusive lock) and write its `config.yaml`; return True when
    resuming.

    A directory that holds another run's results (a different config, another command's, or files and no config)
    is an error, never silently overwritten. Settings that only change execution (`EXECUTION_ONLY`) and keys in
    `may_differ` (e.g. a larger `n_conversations`) may change on resume; any may for a command whose whole output is
    `recomputed` on every run (a leaderboard, a sweep's table). A directory with a config but no results yet (a run
    that failed before writing anything) takes the new config. `overwrite=true` moves a previous run of the same
    command aside (`<dir>.old-<time>`); it never deletes, and never touches another command's directory, a directory
    without our config.yaml, or `inputs` (the run's input files and models: the output directory must not be or hold
    one of them). `overwrite=None`: the command has no such option. `outputs`: the names the command writes, by
    which a directory of its from before config.yaml existed is still recognised.
    """
    out = Path(output_dir)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"output_dir {out} is a symlink to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a directory")
    _check_not_inside(out, inputs)
    config = to_plain(config)
    _check_ours(out, command, config, outputs, bool(overwrite))  # before the lock: a refused one gets none
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_output_dir(out)
    except PermissionError as e:
        raise ConfigError(f"output_dir {out} is not writable ({e.strerror})") from None
    _check_ours(out, command, config, outputs, bool(overwrite))  # again under the lock
    cfg_file = out / "config.yaml"
    resuming = False
    if _results(out) and overwrite:
        entries = [p for p in out.iterdir() if p.name != ".lock"]
        print(f"overwrite: moved the previous run aside to {_move_aside(out, entries)}", file=sys.stderr)
    elif _results(out) and cfg_file.is_file() and not recomputed:
        try:
            previous = _flatten(OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True))
        except Exception as e:  # omegaconf's own error types: a file that is ours by its keys, yet unreadable
            raise ConfigError(f"{cfg_file}: could not be read ({first_line(e)})") from None
        current = _flatten(config)
        diff = sorted(
            k
            for k in set(previous) | set(current)
            if k.split(".")[-1] not in EXECUTION_ONLY
            and k.split(".")[0] not in may_differ
            and previous.get(k) != current.get(k)
        )
        if diff:
            shown = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
            aside = ", or pass overwrite=true to move that run aside" if overwrite is not None else ""
            raise ConfigError(
                f"output_dir {out} holds a run with a different config ({shown}). Use a new output_dir "
                f"or re-run with the same settings to resume it{aside}."
            )
        resuming = True
    else:
        resuming = bool(_results(out))
    try:
        atomic_write_text(cfg_file, HEADER.format(command=command) + config_yaml(config))
    except PermissionError as e:
        raise ConfigError(f"output_dir {out} is not writable ({e.strerror})") from None
    return resuming

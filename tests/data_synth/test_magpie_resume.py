"""Synthesis survives SIGKILL at any moment and a server dying mid-run: exactly N rows, no duplicates, no torn shard."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, start_server

pytestmark = pytest.mark.integration  # subprocesses and servers

ARGS = [
    "recipe=magpie_demo",
    "chunk_size=2",
    "rows_per_shard=2",
    "instruction.max_tokens=40",
    "response.max_tokens=12",
    "engine.batch_size=2",
]


def rows_of(out: Path) -> list[dict]:
    rows = []
    for shard in sorted(out.glob("train-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())  # a torn shard would fail to read here
    return rows


def check_exact(out: Path, n: int) -> None:
    rows = rows_of(out)
    firsts = [r["messages"][0]["content"] for r in rows]
    assert len(rows) == n, f"{len(rows)} rows instead of {n}"
    assert len(set(firsts)) == n, "duplicated instructions after resume"
    assert not list(out.glob(".*.tmp"))  # leftovers of a killed write are cleaned on resume


def test_sigkill_at_any_moment_then_resume_gives_exactly_n_rows(tmp_path):
    out = tmp_path / "magpie"
    cmd = [sys.executable, "-m", "data_synth.magpie", *ARGS, "n_conversations=8", f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # kill twice, each time just after a new shard landed
        shards = len(list(out.glob("train-*.parquet")))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while (
            len(list(out.glob("train-*.parquet"))) == shards
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside the next chunk
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(rows_of(out)) <= 8
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    check_exact(out, 8)


def test_openai_engine_over_two_servers_one_dies_mid_run(tmp_path, embedded_path, openai_server):
    from data_synth.magpie import main

    second, proc = start_server(embedded_path)
    out = tmp_path / "magpie"
    argv = [
        *ARGS,
        "n_conversations=8",
        f"output_dir={out}",
        "engine.backend=openai",
        f"engine.tokenizer={embedded_path}",
        f"engine.base_urls={openai_server},{second}",
        "engine.api_key_env=TEST_SERVER_KEY",
        "engine.max_retries=3",
        "engine.timeout=60",
    ]

    def kill_when_data_lands():
        while not list(out.glob("train-*.parquet")):
            time.sleep(0.05)
        proc.kill()

    os.environ["TEST_SERVER_KEY"] = "sk-test-123"
    killer = threading.Thread(target=kill_when_data_lands, daemon=True)
    killer.start()
    main(argv)
    killer.join(timeout=5)
    assert proc.poll() is not None  # the second server really died mid-run
    check_exact(out, 8)

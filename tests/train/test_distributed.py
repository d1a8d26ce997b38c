"""Launch paths that users run: ZeRO-3 over two processes (on CPU), and resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration  # accelerate launch: training in subprocesses

ROOT = Path(__file__).resolve().parents[2]
ROWS = [("Name a color.", "Blue."), ("What is 2+2?", "4."), ("Say hi.", "Hi!"), ("Capital of Peru?", "Lima.")]


def data(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in ROWS
        )
    )
    return path


def test_zero3_on_two_cpu_processes_trains_and_saves_a_full_model(tmp_path, embedded_path):
    out = tmp_path / "z3"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs/deepspeed_zero3_cpu.yaml"),
        str(ROOT / "train/sft.py"),
        "recipe=demo_sft",
        f"dataset={data(tmp_path)}",
        f"output_dir={out}",
        "peft=none",
        "max_steps=3",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=1",
        "max_length=64",
        "save_strategy=no",
        "learning_rate=1e-3",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_file(out / "model.safetensors")  # gathered from the ZeRO-3 shards (zero3_save_16bit_model)
    original = load_file(Path(embedded_path) / "model.safetensors")
    changed = [
        k for k in original if k in trained and not torch.equal(trained[k].float(), original[k].float())
    ]
    assert len(changed) > len(original) // 2, f"only {len(changed)} of {len(original)} tensors changed"


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "sft"
    cmd = [
        sys.executable,
        str(ROOT / "train/sft.py"),
        "recipe=demo_sft",
        f"dataset={data(tmp_path)}",
        f"output_dir={out}",
        "max_steps=4",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=1",
        "max_length=64",
        "save_strategy=steps",
        "save_steps=1",
        "save_total_limit=2",
        "merge_lora=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "checkpoint-" in done.stdout
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps[-1] == 4 and 1 not in steps[-2:]  # the resumed run did not start over

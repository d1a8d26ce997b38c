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


def lora_merged_by_hand(base: dict, adapter: dict, scale: float) -> dict:
    """base + scale * B @ A for every LoRA pair of `adapter`, and the embedding rows it carries: what merge_lora
    must write, computed without peft."""
    merged = {k: v.float().clone() for k, v in base.items()}
    for key, a in adapter.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in key:
            b = adapter[key.replace("lora_A", "lora_B")]
            merged[name.replace("lora_A.", "")] += scale * (b.float() @ a.float())
        elif "lora_" not in key:  # the embedding layers saved with the adapter
            merged[name] = a.float()
    return merged


def test_zero3_lora_fixes_template_rows_saves_them_with_the_adapter_and_merges_full_weights(
    tmp_path, embedded_path
):
    """ZeRO-3 partitions weights to empty shards as they load: the template-row fix must gather them (else it finds
    no row to fix), the adapter must carry the fixed rows (its base comes from the Hub untouched), and merge_lora
    must write base + delta at full size, not a merge of shards."""
    from tests.train.test_sft import llama3_base

    base_path, tok_ids = llama3_base(tmp_path, embedded_path)
    out = tmp_path / "z3lora"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/deepspeed_zero3_cpu.yaml"), str(ROOT / "train/sft.py"),
           "recipe=demo_sft", f"model_name_or_path={base_path}", f"dataset={data(tmp_path)}", f"output_dir={out}",
           "chat_template=llama3", "peft=lora", "lora_r=4", "lora_alpha=8", "merge_lora=true", "max_steps=3",
           "per_device_train_batch_size=1", "gradient_accumulation_steps=1", "max_length=64", "save_strategy=no",
           "learning_rate=1e-2"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialized untrained embedding rows of template tokens" in done.stdout

    from transformers import AutoTokenizer

    template = [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]  # what it writes
    fixed = AutoTokenizer.from_pretrained(base_path).convert_tokens_to_ids(template)
    assert set(fixed) <= set(tok_ids)
    base = load_file(base_path / "model.safetensors")
    adapter = load_file(out / "adapter_model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = adapter[f"base_model.model.{name}"]
        trained = torch.ones(len(rows), dtype=torch.bool)
        trained[tok_ids] = False
        mean = base[name][trained].float().mean(0)
        assert mean.norm() > 0 and torch.allclose(rows[fixed], mean.expand(len(fixed), -1), atol=1e-5)
    merged = load_file(out / "merged" / "model.safetensors")
    expected = lora_merged_by_hand(base, adapter, scale=8 / 4)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    assert all(merged[k].dtype == torch.float32 for k in merged)
    wrong = [k for k in expected if not torch.allclose(merged[k].float(), expected[k], atol=1e-5)]
    assert not wrong, f"merged tensors that are not base + delta: {wrong[:5]}"
    moved = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(moved) >= 2 * 7 + 2  # every LoRA-targeted linear of both layers, and the two embeddings

    # The base's eos is <|end_of_text|>, the template ends turns with <|eot_id|>: the saved model stops at both
    from core.engines import EngineConfig, TransformersEngine

    eot, end_of_text = AutoTokenizer.from_pretrained(base_path).convert_tokens_to_ids(
        ["<|eot_id|>", "<|end_of_text|>"]
    )
    generation = json.loads((out / "merged" / "generation_config.json").read_text())
    assert eot in generation["eos_token_id"] and end_of_text in generation["eos_token_id"]
    assert eot in TransformersEngine(str(out / "merged"), EngineConfig()).eos_ids


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


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_zero3_lora_preference_training_on_two_cpu_processes(tmp_path, embedded_path, method):
    """The preference methods under ZeRO-3 (DPO with its reference model as the frozen base behind the adapter;
    SimPO on trl's CPO trainer): both processes train, the adapter is gathered and saved, every LoRA B matrix has
    moved from its zero start, and the reward margin grows."""
    from tests.train.test_preference_methods import write_pairs
    from tests.train.test_sft import tiny_llama3

    model = tiny_llama3(tmp_path, embedded_path)
    out = tmp_path / method
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/deepspeed_zero3_cpu.yaml"), str(ROOT / "train/dpo.py"),
           f"recipe=demo_{method}", f"model_name_or_path={model}", f"dataset={write_pairs(tmp_path / 'pairs.jsonl')}",
           f"output_dir={out}", "chat_template=llama3", "lora_r=4", "lora_alpha=8", "max_steps=4",
           "per_device_train_batch_size=1", "gradient_accumulation_steps=1", "max_length=64", "learning_rate=2e-2",
           "lr_scheduler_type=constant", "warmup_steps=0", "save_strategy=steps", "save_steps=4",
           "merge_lora=false"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = load_file(out / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(b) == 2 * 7 and all(
        v.abs().sum() > 0 for v in b.values()
    )  # every adapted linear of both layers
    log = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = [e for e in log if "rewards/margins" in e]
    assert len(steps) == 4 and ("nll_loss" in steps[0]) == (method == "simpo")  # CPO's metrics for SimPO
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]

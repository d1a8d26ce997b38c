"""SFT throughput on the embedded model: tokens/s and achieved FLOP/s against the machine's measured matmul
FLOP/s (the physical limit here), with and without packing, in one run.

    python benchmarks/train_throughput.py [--steps 4] [--out FILE]

Full fine-tuning, float32 on CPU, batch 4 x 256 tokens on conversations of varied length (so padding matters).
Achieved FLOP/s = 6 x parameters x trained tokens / time (forward + backward, Kaplan et al.); tokens counted are
real (non-padding) tokens. MFU = achieved / measured float32 matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig

from core.config import build
from core.io import atomic_write_json
from train.sft import SFTScriptArgs, build_trainer


def matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


class Timer(TrainerCallback):
    """Times the optimizer steps after the first (warm-up) one."""

    def __init__(self) -> None:
        self.start = None
        self.end = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == 1:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def run(data: Path, packing: bool, steps: int, out: Path) -> dict:
    script = SFTScriptArgs(
        model_name_or_path="embedded", dataset=str(data), peft="none", torch_dtype="float32"
    )
    (args,) = build({"output_dir": str(out), "max_steps": steps + 1, "per_device_train_batch_size": 4, "max_length": 256,
                     "packing": packing, "learning_rate": 1e-5, "save_strategy": "no", "report_to": "none", "bf16": False,
                     "activation_checkpointing": False, "logging_steps": 1, "padding_free": False}, SFTConfig)  # fmt: skip
    trainer = build_trainer(script, args)
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    seconds = timer.end - timer.start
    # Real tokens of the timed steps: the trainer counts them as num_tokens (non-padding, all processes).
    logs = [e for e in trainer.state.log_history if "num_tokens" in e]
    tokens = float(logs[-1]["num_tokens"]) - float(logs[0]["num_tokens"])
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"packing": packing, "timed_steps": steps, "seconds": round(seconds, 2), "tokens": int(tokens),
            "tokens_per_s": round(tokens / seconds, 1), "achieved_flops": 6 * params * tokens / seconds, "params": params}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    a = ap.parse_args()
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "rows.jsonl"
    words = ["the", "model", "learns", "to", "answer", "questions", "with", "clear", "and", "helpful", "text"]
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Question {i}: " + " ".join(rng.choices(words, k=rng.randint(5, 30))),
                        },
                        {
                            "role": "assistant",
                            "content": " ".join(rng.choices(words, k=rng.randint(10, 200))),
                        },
                    ]
                }
            )
            + "\n"
            for i in range(200)
        )
    )
    peak = matmul_flops()
    runs = [run(data, packing, a.steps, tmp / f"p{packing}") for packing in (False, True)]
    for r in runs:
        r["mfu"] = round(r["achieved_flops"] / peak, 4)
        r["achieved_gflops"] = round(r.pop("achieved_flops") / 1e9, 2)
    result = {"benchmark": "train_throughput", "model": "SmolLM2-135M-Instruct (embedded), float32, full SFT",
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
              "measured_matmul_gflops_fp32": round(peak / 1e9, 2), "runs": runs,
              "packing_speedup_tokens_per_s": round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 2),
              "gpu": "not measured: no GPU in this session"}  # fmt: skip
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

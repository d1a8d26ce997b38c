"""Memory and step time of each training optimizer against AdamW, with train.plan's prediction beside each.

    python benchmarks/train_memory.py [--steps 4] [--out benchmarks/results/train_memory.json]

Full fine-tuning of the embedded SmolLM2-135M-Instruct (fp32, CPU, batch 2 x 128 tokens), one fresh process per
optimizer, in one run. For each: the peak resident memory the training steps add above the loaded model (sampled
every 5 ms), the optimizer state it keeps (the tensors in optimizer.state, counted exactly), the most gradient
memory held at once (counted as each gradient lands), the mean step time
after the first step, and the planner's optimizer-state and gradient estimates for the same recipe; ratios are
against AdamW measured in the same run. Optimizers that cannot run on a CPU are recorded with the reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.io import atomic_write_json  # noqa: E402
from train.plan import GB, count_params, estimate, model_config, sharding  # noqa: E402

# (optim, extra training keys): GaLore and APOLLO project the blocks' linear layers, as their papers do
CASES = [
    ("adamw_torch", {}),
    ("adamw_bnb_8bit", {}),
    ("paged_adamw_8bit", {}),
    ("adafactor", {}),
    ("lomo", {}),
    ("adalomo", {}),
    ("galore_adamw", {"optim_target_modules": ["self_attn", "mlp"], "optim_args": "rank=64"}),
    ("galore_adamw_layerwise", {"optim_target_modules": ["self_attn", "mlp"], "optim_args": "rank=64"}),
    ("apollo_adamw", {"optim_target_modules": ["self_attn", "mlp"], "optim_args": "rank=64"}),
]
CHILD = r"""
import json, os, sys, threading, time
import torch
from trl import SFTConfig
from core.config import build
from train.sft import SFTScriptArgs, build_trainer
from transformers import TrainerCallback

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

optim, extra, out, data, steps = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
script = SFTScriptArgs(model_name_or_path="embedded", dataset=data, peft="none", torch_dtype="float32")
(args,) = build({"output_dir": out, "max_steps": steps, "per_device_train_batch_size": 2, "max_length": 128,
                 "learning_rate": 1e-5, "save_strategy": "no", "report_to": "none", "bf16": False, "optim": optim,
                 "activation_checkpointing": False, "logging_steps": 1, "padding_free": False,
                 "disable_tqdm": True, **extra}, SFTConfig)
trainer = build_trainer(script, args)
times = []

class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k):
        self.t = time.perf_counter()
    def on_step_end(self, *a, **k):
        times.append(time.perf_counter() - self.t)

trainer.add_callback(Clock())
# The gradients held at once: counted as each one lands (this hook runs before a layerwise optimizer's, which
# applies and frees it); LOMO applies gradients inside backward and never stores them in .grad.
params = [p for p in trainer.model.parameters() if p.requires_grad]
held = [0]

def count(_):
    held[0] = max(held[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

for p in params:
    p.register_post_accumulate_grad_hook(count)
peak, stop = [0], threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)

before = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
trainer.train()
stop.set()
thread.join()
opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
# a layerwise optimizer is a dummy holding one real optimizer per parameter
optimizers = list(opt.optimizer_dict.values()) if getattr(opt, "optimizer_dict", None) else [opt]
state = sum(t.numel() * t.element_size() for o in optimizers for s in getattr(o, "state", {}).values()
            for t in s.values() if torch.is_tensor(t))
print("RESULT " + json.dumps({"model_rss_gb": before / 2**30, "train_peak_above_model_gb": (peak[0] - before) / 2**30,
                              "optimizer_state_gb": state / 2**30, "gradients_held_gb": held[0] / 2**30,
                              "step_s": sum(times[1:]) / max(len(times) - 1, 1),
                              "optimizer_class": type(opt).__module__ + "." + type(opt).__name__}))
"""


def predicted(optim: str, extra: dict) -> dict:
    """The planner's per-process terms for this run (fp32 full fine-tuning, one CPU process)."""
    p = count_params(model_config(str(_embedded())))
    recipe = {
        "peft": "none",
        "bf16": False,
        "per_device_train_batch_size": 2,
        "max_length": 128,
        "optim": optim,
        **extra,
    }
    est = estimate(p, recipe, sharding({"distributed_type": "NO"}), 1)
    return {k: est[k] / GB for k in ("optimizer", "gradients", "activations", "logits")}


def _embedded() -> Path:
    from core.models import embedded_model_path

    return embedded_model_path()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/train_memory.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "rows.jsonl"
    answer = " ".join(["This sentence makes the answer long enough to fill the context."] * 12)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}
            for i in range(32)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for optim, extra in CASES:
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            optim,
            json.dumps(extra),
            str(tmp / optim),
            str(data),
            str(a.steps),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        plan = predicted(optim, extra)
        if line is None:
            error = [x for x in done.stderr.strip().splitlines() if x.strip()]
            results.append({"optim": optim, "runs_on_cpu": False, "error": error[-1][:300] if error else "no output",
                            "plan_optimizer_gb": round(plan["optimizer"], 4), "plan_gradients_gb": round(plan["gradients"], 4)})  # fmt: skip
            print(f"{optim:24s} cannot run here: {results[-1]['error']}", flush=True)
            continue
        got = json.loads(line[len("RESULT ") :])
        row = {"optim": optim, "runs_on_cpu": True, **{k: round(v, 4) if isinstance(v, float) else v for k, v in got.items()},
               "plan_optimizer_gb": round(plan["optimizer"], 4), "plan_gradients_gb": round(plan["gradients"], 4),
               "plan_train_gb": round(sum(plan.values()), 4)}  # fmt: skip
        if plan["optimizer"] > 0:
            row["optimizer_state_measured_over_plan"] = round(
                got["optimizer_state_gb"] / plan["optimizer"], 3
            )
        if got["gradients_held_gb"] > 0:
            row["gradients_measured_over_plan"] = round(got["gradients_held_gb"] / plan["gradients"], 3)
        row["train_peak_measured_over_plan"] = round(got["train_peak_above_model_gb"] / sum(plan.values()), 3)
        results.append(row)
        print(f"{optim:24s} peak +{row['train_peak_above_model_gb']:.2f} GB (plan {row['plan_train_gb']:.2f}), "
              f"state {got['optimizer_state_gb']:.3f} GB (plan {row['plan_optimizer_gb']:.3f}), gradients "
              f"{got['gradients_held_gb']:.3f} GB (plan {row['plan_gradients_gb']:.3f}), {got['step_s']:.2f} s/step",
              flush=True)  # fmt: skip
    adamw = next(r for r in results if r["optim"] == "adamw_torch" and r["runs_on_cpu"])
    for r in results:
        if r["runs_on_cpu"]:
            r["peak_vs_adamw"] = round(r["train_peak_above_model_gb"] / adamw["train_peak_above_model_gb"], 3)
            r["step_time_vs_adamw"] = round(r["step_s"] / adamw["step_s"], 3)
    import platform

    import torch

    atomic_write_json(
        Path(a.out),
        {
            "what": "full fine-tuning of the embedded SmolLM2-135M-Instruct, fp32, batch 2 x 128 tokens, "
            f"{a.steps} steps per optimizer, one process each",
            "machine": {
                "cpus": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "results": results,
        },
    )
    print(f"wrote {a.out}")


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


if __name__ == "__main__":
    main()

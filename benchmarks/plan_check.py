"""How far is `train.plan`'s memory estimate from a measured peak? LoRA and full SFT of the embedded model on CPU.

    python benchmarks/plan_check.py [--out FILE]

Each case runs a few training steps in a fresh process and measures the peak resident memory above what the
process held before loading the model (Python, torch and the libraries), against the plan's estimate for the
same recipe on one process (without its fixed CUDA overhead). Writes JSON with the relative error per case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from core.io import atomic_write_json
from train.plan import GB, PlanConfig, plan

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch  # noqa: F401  (the libraries are part of the baseline)
from trl import SFTConfig
from core.config import build
from train.sft import build_trainer
from train.sft import SFTScriptArgs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peft, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
script = SFTScriptArgs(model_name_or_path="embedded", dataset=data, peft=peft, torch_dtype="float32")
(args,) = build({"output_dir": out, "max_steps": 3, "per_device_train_batch_size": 4, "max_length": 256,
                 "learning_rate": 1e-4, "save_strategy": "no", "report_to": "none", "bf16": False,
                 "activation_checkpointing": False, "logging_steps": 1, "padding_free": False}, SFTConfig)
trainer = build_trainer(script, args)
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_kb": base, "peak_kb": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/plan_check.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "rows.jsonl"
    long_answer = " ".join(["This sentence makes the answer long enough to fill the context."] * 30)
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": long_answer},
                    ]
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    cases = []
    for peft in ("lora", "none"):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, peft, str(tmp / peft), str(data)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        measured_gb = (measured["peak_kb"] - measured["baseline_kb"]) * 1024 / GB
        overrides = {
            "peft": peft,
            "per_device_train_batch_size": 4,
            "max_length": 256,
            "bf16": False,
            "torch_dtype": "float32",
            "activation_checkpointing": False,
        }
        est = plan(PlanConfig(recipe="demo_sft", accelerate_config="cpu", gpus=1, overhead_gb=0.0), overrides)
        cases.append({"peft": peft, "measured_peak_above_baseline_gb": round(measured_gb, 3),
                      "estimated_gb": est["total_gb"], "estimate_parts_gb": est["per_gpu_gb"],
                      "relative_error": round((est["total_gb"] - measured_gb) / measured_gb, 3)})  # fmt: skip
    result = {"benchmark": "plan_check", "model": "SmolLM2-135M-Instruct (embedded), float32, CPU",
              "batch": 4, "max_length": 256, "cases": cases}  # fmt: skip
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

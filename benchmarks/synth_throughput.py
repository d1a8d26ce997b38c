"""Magpie synthesis throughput: the harness against a naive baseline, measured in the same run.

    python benchmarks/synth_throughput.py [--n 128] [--naive-n 16] [--batch-size 128] [--out FILE]

Both sides do the same work on the embedded SmolLM2-135M-Instruct: sample an instruction after the pre-query
template (T=1, stop at the newline or end of turn), then answer it greedily. The baseline is what a first
script does: one sequence at a time with plain `model.generate` (float32). The harness is `data_synth.magpie.run`
with the transformers engine (continuous batching), in float32 and with `engine.dtype=int8`. Reports
conversations/s and useful tokens/s (generated tokens kept in the data) for each, their ratios to the baseline,
and each as a fraction of the compute limit: 2 x parameters FLOPs per token at the fp32 matmul rate measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import render_prompt
from core.engines import Completion
from core.io import atomic_write_json
from core.models import embedded_model_path
from data_synth.magpie import MagpieConfig, clean_instruction, run
from data_synth.templates import pre_query


def naive(n: int, instruction_tokens: int, response_tokens: int) -> dict:
    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pq = pre_query(tok)
    torch.manual_seed(0)
    done, tokens, start = 0, 0, time.time()
    while done < n:
        ids = tok(pq.prompt_prefix, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=instruction_tokens,
                stop_strings=["\n", *pq.stop],
                tokenizer=tok,
                eos_token_id=pq.stop_token_ids,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        text = tok.decode(new, skip_special_tokens=True)
        reason = "length" if len(new) >= instruction_tokens else "stop"
        instruction, _ = clean_instruction(Completion(text.split("\n")[0], len(new), reason))
        tokens += len(new)
        if instruction is None:
            continue
        ids = tok(
            render_prompt(tok, [{"role": "user", "content": instruction}]),
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.inference_mode():
            out = model.generate(
                **ids,
                do_sample=False,
                max_new_tokens=response_tokens,
                eos_token_id=pq.stop_token_ids,
                pad_token_id=tok.pad_token_id,
            )
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        done += 1
    elapsed = time.time() - start
    return {
        "conversations": done,
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "conversations_per_s": round(done / elapsed, 4),
        "tokens_per_s": round(tokens / elapsed, 2),
    }


def harness(n: int, instruction_tokens: int, response_tokens: int, batch_size: int, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = MagpieConfig(n_conversations=n, output_dir=str(Path(tmp) / "m"), chunk_size=n, seed=0)
        cfg.engine.batch_size, cfg.engine.dtype = batch_size, dtype
        cfg.instruction.max_tokens = instruction_tokens
        cfg.response.max_tokens = response_tokens
        start = time.time()
        summary = run(cfg)
        elapsed = time.time() - start  # includes loading the model, as the baseline's does
    tokens = summary["instruction_tokens"] + summary["response_tokens"]
    return {
        "conversations": summary["rows"],
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "conversations_per_s": round(summary["rows"] / elapsed, 4),
        "tokens_per_s": round(tokens / elapsed, 2),
        "instructions_sampled": summary["instructions_sampled"],
        "duplicates_dropped": summary["duplicates_dropped"],
        "invalid_dropped": summary["invalid_dropped"],
    }


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matmul rate, in this run: the denominator of the compute limit."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.time()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.time() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128, help="conversations for the harness (one chunk)")
    ap.add_argument("--naive-n", type=int, default=16, help="conversations for the one-at-a-time baseline")
    ap.add_argument("--instruction-tokens", type=int, default=64)
    ap.add_argument("--response-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/synth_throughput.json")
    a = ap.parse_args()
    gflops = matmul_gflops()
    params = AutoModelForCausalLM.from_pretrained(embedded_model_path()).num_parameters()
    limit = gflops * 1e9 / (2 * params)  # tokens/s if every FLOP went into the model at the matmul rate
    base = naive(a.naive_n, a.instruction_tokens, a.response_tokens)
    sides = {"naive_one_at_a_time": base}
    for dtype in ("float32", "int8"):
        ours = harness(a.n, a.instruction_tokens, a.response_tokens, a.batch_size, dtype)
        ours["speedup_tokens_per_s"] = round(ours["tokens_per_s"] / base["tokens_per_s"], 2)
        ours["speedup_conversations_per_s"] = round(
            ours["conversations_per_s"] / base["conversations_per_s"], 2
        )
        ours["fraction_of_compute_limit"] = round(ours["tokens_per_s"] / limit, 3)
        sides[f"harness_{dtype}"] = ours
    base["fraction_of_compute_limit"] = round(base["tokens_per_s"] / limit, 3)
    result = {
        "benchmark": "synth_throughput",
        "model": f"SmolLM2-135M-Instruct (embedded), {params / 1e6:.1f}M parameters",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": vars(a),
        "fp32_matmul_gflops": round(gflops, 1),
        "compute_limit_tokens_per_s": round(limit, 1),
        **sides,
    }
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

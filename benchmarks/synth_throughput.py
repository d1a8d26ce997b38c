"""Magpie synthesis throughput: the harness against a naive baseline, measured in the same run.

    python benchmarks/synth_throughput.py [--n 16] [--response-tokens 96] [--batch-size 16] [--out FILE]

Both sides do the same work on the embedded SmolLM2-135M-Instruct: sample an instruction after the pre-query
template (T=1, stop at the newline or end of turn), then answer it greedily. The baseline is what a first
script does: one sequence at a time with plain `model.generate`. The harness is `data_synth.magpie.run` with
the transformers engine (batched, left padded). Reports conversations/s and useful tokens/s (generated tokens
kept in the data) for both, and their ratio, as JSON.
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


def harness(n: int, instruction_tokens: int, response_tokens: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = MagpieConfig(n_conversations=n, output_dir=str(Path(tmp) / "m"), chunk_size=batch_size, seed=0)
        cfg.engine.batch_size = batch_size
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
        "duplicates_dropped": summary["duplicates_dropped"],
        "invalid_dropped": summary["invalid_dropped"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="conversations per side")
    ap.add_argument("--instruction-tokens", type=int, default=64)
    ap.add_argument("--response-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/synth_throughput.json")
    a = ap.parse_args()
    base = naive(a.n, a.instruction_tokens, a.response_tokens)
    ours = harness(a.n, a.instruction_tokens, a.response_tokens, a.batch_size)
    result = {
        "benchmark": "synth_throughput",
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": vars(a),
        "naive_one_at_a_time": base,
        "harness_transformers_engine": ours,
        "speedup_tokens_per_s": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
        "speedup_conversations_per_s": round(ours["conversations_per_s"] / base["conversations_per_s"], 2),
    }
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Speculative decoding on the transformers engine: does transformers' prompt-lookup decoding beat what ships?

    python benchmarks/speculative_decoding.py [--n 16] [--max-tokens 128] [--out FILE]

The same greedy responses (Magpie's response stage: temperature 0) to `--n` instructions, on the embedded
SmolLM2-135M-Instruct in float32, three ways, in one run:
- `engine`: the harness's transformers engine (continuous batching, batch 16): what ships;
- `plain`: `model.generate`, one request at a time (prompt lookup and assisted decoding take a batch of one);
- `prompt_lookup`: the same with `prompt_lookup_num_tokens=10` (draft tokens copied from the prompt's n-grams).
Assisted decoding with a draft model is not measured: no smaller model shares SmolLM2's tokenizer here.
Useful tokens/s each, the ratios, and (the quality check) how many greedy outputs are token-identical to `plain`.
On GPUs, vLLM's own speculative decoding is a setting of the vLLM engine (`engine.speculative_config`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.chat import render_prompt  # noqa: E402
from core.engines import EngineConfig, Sampling  # noqa: E402
from core.engines.transformers_engine import TransformersEngine  # noqa: E402
from core.io import atomic_write_json  # noqa: E402
from core.models import embedded_model_path  # noqa: E402
from core.questions import load_questions  # noqa: E402

QUESTIONS = ROOT / "tests/fixtures/alpaca_eval_cd543a1/alpaca_eval.json"


def one_at_a_time(model, tok, prompts: list[str], max_tokens: int, **extra) -> tuple[list[list[int]], float]:
    outs, start = [], time.perf_counter()
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, **extra
            )
        outs.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return outs, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/speculative_decoding.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    path = str(embedded_model_path())
    engine = TransformersEngine(path, EngineConfig(batch_size=16, dtype="float32"))
    tok, model = engine.tokenizer, engine.model
    questions = [q["turns"][0] for q in load_questions("alpaca_eval", str(QUESTIONS))][: a.n]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    eos = engine.eos_ids

    start = time.perf_counter()
    done = engine.complete(prompts, Sampling(temperature=0.0, max_tokens=a.max_tokens))
    engine_s = time.perf_counter() - start
    engine_tokens = sum(c.n_tokens for c in done)
    plain, plain_s = one_at_a_time(model, tok, prompts, a.max_tokens, eos_token_id=eos)
    lookup, lookup_s = one_at_a_time(
        model, tok, prompts, a.max_tokens, eos_token_id=eos, prompt_lookup_num_tokens=10
    )

    def strip(ids: list[int]) -> list[int]:  # generate pads finished rows and keeps the eos; compare the text
        return [t for t in ids if t not in eos and t != tok.pad_token_id]

    plain_tokens = sum(len(strip(o)) for o in plain)
    lookup_tokens = sum(len(strip(o)) for o in lookup)
    result = {
        "benchmark": "speculative_decoding",
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "model": "SmolLM2-135M-Instruct (float32)",
        "requests": len(prompts),
        "max_tokens": a.max_tokens,
        "engine": {"seconds": round(engine_s, 2), "tokens": engine_tokens, "tokens_per_s": round(engine_tokens / engine_s, 1)},
        "plain": {"seconds": round(plain_s, 2), "tokens": plain_tokens, "tokens_per_s": round(plain_tokens / plain_s, 1)},
        "prompt_lookup": {"seconds": round(lookup_s, 2), "tokens": lookup_tokens, "tokens_per_s": round(lookup_tokens / lookup_s, 1)},
    }  # fmt: skip
    result["prompt_lookup_vs_plain"] = round(
        result["prompt_lookup"]["tokens_per_s"] / result["plain"]["tokens_per_s"], 2
    )
    result["prompt_lookup_vs_engine"] = round(
        result["prompt_lookup"]["tokens_per_s"] / result["engine"]["tokens_per_s"], 2
    )
    result["prompt_lookup_identical_outputs"] = sum(
        strip(x) == strip(y) for x, y in zip(plain, lookup, strict=True)
    )
    result["kept"] = result["prompt_lookup_vs_engine"] > 1.0  # the rule: keep it only if it beats what ships
    print(json.dumps(result, indent=1))
    atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()

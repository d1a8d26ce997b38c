"""Decoding attention per layer call: the engine's compiled kernel against PyTorch's sdpa, in the same run.

    python benchmarks/decode_attention.py [--rows 128] [--columns 60,141,300] [--repeats 5] [--out FILE]

The shapes are the continuous batcher's on the embedded SmolLM2 (9 query heads over 3 kv heads of 64): one new
token per row against the columns [lo, t] of a longer cache, one boolean mask row per row. Every layer of the
model has its own cache (30 of them), called in turn as a decoding step does, so the keys and values come from
memory, not from a warm cache. Reported per column count: milliseconds per layer call for each (best of
`--repeats` passes over the 30 layers), the kernel's speedup, the rate each goes through the cache at (the whole
span's bytes over the call's time; the kernel skips the masked columns sdpa reads), and, as the floor any kernel
pays, a plain `sum` over the same views. sdpa is called as transformers calls it, with the query heads
of a kv head folded into the query length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from core.engines.cpu_kernels import decode_kernel
from core.io import atomic_write_json

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30


def per_layer_ms(step, caches, repeats: int) -> float:
    step(*caches[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in caches:
            step(k, v)
        best = min(best, time.perf_counter() - start)
    return best / len(caches) * 1000


def measure(rows: int, columns: int, repeats: int) -> dict:
    kernel = decode_kernel()
    g = torch.Generator().manual_seed(0)
    lo, capacity = 50, columns + 150
    shape = (rows, KV_HEADS, capacity, HEAD_DIM)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(LAYERS)]
    views = [(k[:, :, lo : lo + columns], v[:, :, lo : lo + columns]) for k, v in caches]
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=g)
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    for r in range(rows):  # rows of different ages: each starts at its own column
        mask[r, (r * 7) % max(1, columns // 3) :] = True
    folded, mask4 = q.view(rows, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), mask[:, None, None]
    scale = HEAD_DIM**-0.5

    def sdpa(k, v):
        return F.scaled_dot_product_attention(folded, k, v, attn_mask=mask4, scale=scale)

    def compiled(k, v):
        return kernel.decode_attention(q, k, v, mask, scale)

    want = sdpa(*views[0]).reshape(rows, 1, HEADS, HEAD_DIM)
    error = (compiled(*views[0]) - want).abs().max().item()
    with torch.inference_mode():
        ms = {
            "sdpa": per_layer_ms(sdpa, views, repeats),
            "kernel": per_layer_ms(compiled, views, repeats),
            "sum_of_the_cache": per_layer_ms(lambda k, v: (k.sum(), v.sum()), views, repeats),
        }
    cache_bytes = 2 * rows * KV_HEADS * columns * HEAD_DIM * 4
    return {
        "rows": rows,
        "columns": columns,
        "ms_per_layer_call": {name: round(t, 3) for name, t in ms.items()},
        "cache_read_gb_per_s": {name: round(cache_bytes / (t / 1000) / 1e9, 1) for name, t in ms.items()},
        "kernel_speedup_over_sdpa": round(ms["sdpa"] / ms["kernel"], 2),
        "max_abs_difference": error,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--columns", default="60,141,300", help="cache columns per call, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    a = ap.parse_args()
    columns = [int(c) for c in a.columns.split(",") if c]
    if a.rows < 1 or a.repeats < 1 or not columns or min(columns) < 1:
        ap.error("--rows, --repeats and every --columns value must be at least 1")
    if decode_kernel() is None:
        ap.error("the decode attention kernel could not be built here (see the line above)")
    result = {
        "benchmark": "decode_attention",
        "shapes": f"{HEADS} query heads over {KV_HEADS} kv heads of {HEAD_DIM}, float32, {LAYERS} layers' caches",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "settings": vars(a),
        "results": [measure(a.rows, c, a.repeats) for c in columns],
    }
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

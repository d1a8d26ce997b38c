"""Tagging throughput per tagger (rows/s), each against a simple baseline measured in the same run.

    python benchmarks/tag_throughput.py [--rows 10000] [--judge-rows 32] [--out FILE]

- lengths, language: rows/s over `--rows` instructions (no baseline: they are single library calls).
- neighbors (embedding + FAISS, the issue's bar: 10K rows in under a minute): against brute-force numpy
  distances on the same embeddings.
- judge labels (quality) and judge scores (reward stand-in) with the embedded model: batched as the tagger runs
  them, against one prompt at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from core.engines import EngineConfig
from core.io import atomic_write_json
from core.judge import JudgeConfig
from data_synth import tag

SUBJECTS = [
    "a Python function",
    "my resume",
    "a birthday party",
    "the French Revolution",
    "a sourdough starter",
    "quantum entanglement",
    "a marketing plan",
    "my vegetable garden",
    "a SQL query",
    "a short story",
    "the stock market",
    "a wedding speech",
    "photosynthesis",
    "a job interview",
    "a budget spreadsheet",
]
ASKS = [
    "How do I improve",
    "Can you explain",
    "Write a summary of",
    "Give me ideas for",
    "What is wrong with",
    "Help me plan",
    "Compare two approaches to",
    "Translate into Spanish a note about",
    "Debug",
    "Critique",
]
DETAILS = [
    "for a beginner",
    "in three steps",
    "with examples",
    "in under 100 words",
    "for my manager",
    "using only free tools",
    "for a ten-year-old",
    "step by step",
    "with pros and cons",
    "as a table",
]


def instructions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    combos = list(itertools.product(ASKS, SUBJECTS, DETAILS))
    return [f"{a} {s} {d}? (note {rng.randint(0, 10**6)})" if i >= len(combos) else f"{a} {s} {d}?"
            for i, (a, s, d) in enumerate(rng.choice(combos) for _ in range(n))]  # fmt: skip


def rows_of(texts: list[str]) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Sure."}]}
        for t in texts
    ]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def brute_force_min_distance(emb: np.ndarray, block: int = 1024) -> np.ndarray:
    best = np.full(len(emb), np.inf, dtype=np.float32)
    sq = (emb**2).sum(1)
    for start in range(0, len(emb), block):
        d2 = sq[start : start + block, None] + sq[None, :] - 2 * emb[start : start + block] @ emb.T
        for i in range(d2.shape[0]):
            d2[i, start + i] = np.inf
        best[start : start + block] = np.sqrt(np.maximum(d2.min(1), 0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--judge-rows", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/tag_throughput.json")
    a = ap.parse_args()
    cfg = tag.TagConfig()
    rows = rows_of(instructions(a.rows))
    result: dict = {
        "benchmark": "tag_throughput",
        "rows": a.rows,
        "machine": {"cpus": os.cpu_count()},
        "taggers": {},
    }

    scratch = tempfile.mkdtemp()
    pairs = [tag.first_turn(r) for r in rows]
    for name in ("lengths", "language"):
        ctx = tag.Context(cfg, Path(scratch))
        _, seconds = timed(tag.TAGGERS[name].tag, ctx, pairs, np.arange(len(pairs)))
        result["taggers"][name] = {"seconds": round(seconds, 2), "rows_per_s": round(a.rows / seconds, 1)}

    texts = [q for q, _ in pairs]
    emb, embed_s = timed(tag.embed, texts, cfg.embedder, cfg.embed_batch_size)
    tags, faiss_s = timed(tag.neighbor_tags, emb, cfg.neighbors_k, cfg.near_duplicate_distance)
    brute, brute_s = timed(brute_force_min_distance, emb)
    agree = float(np.max(np.abs(tags["min_neighbor_distance"] - brute)))
    result["taggers"]["neighbors"] = {
        "embed_seconds": round(embed_s, 2), "faiss_seconds": round(faiss_s, 2),
        "total_seconds": round(embed_s + faiss_s, 2), "rows_per_s": round(a.rows / (embed_s + faiss_s), 1),
        "under_a_minute": embed_s + faiss_s < 60, "baseline_bruteforce_numpy_seconds": round(brute_s, 2),
        "max_abs_difference_vs_bruteforce": agree, "k": cfg.neighbors_k,
    }  # fmt: skip

    judge_rows = pairs[: a.judge_rows]
    for batch, label in ((16, "batched"), (1, "one_at_a_time")):
        # a fresh judge cache per setting, so every prompt is really judged
        judge = JudgeConfig(engine=EngineConfig(batch_size=batch), max_tokens=96, retries=0, logprobs=None)
        ctx = tag.Context(tag.TagConfig(judge=judge), Path(tempfile.mkdtemp()))
        _, q_s = timed(tag.TAGGERS["quality"].tag, ctx, judge_rows, np.arange(len(judge_rows)))
        _, r_s = timed(tag.TAGGERS["reward"].tag, ctx, [(q, "Sure.") for q, _ in judge_rows], None)
        result["taggers"].setdefault("quality_judge", {})[label] = {
            "seconds": round(q_s, 2),
            "rows_per_s": round(len(judge_rows) / q_s, 2),
        }
        result["taggers"].setdefault("reward_judge_score", {})[label] = {
            "seconds": round(r_s, 2),
            "rows_per_s": round(len(judge_rows) / r_s, 2),
        }
    for key in ("quality_judge", "reward_judge_score"):
        t = result["taggers"][key]
        t["speedup"] = round(t["batched"]["rows_per_s"] / t["one_at_a_time"]["rows_per_s"], 2)
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

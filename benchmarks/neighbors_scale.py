"""The neighbour tags at the paper's scale: which embedder and which index, how fast, and how close to exact.

    python benchmarks/neighbors_scale.py [--embed-rows 3000] [--index-rows 100000] [--rows 1000000] [--out FILE]

Rows are Magpie-shaped instructions (sentences of Python's documentation recombined, median ~200 characters, as
benchmarks/decontaminate_scale.py writes them) with planted repeats: 2% exact copies of an earlier row and 2% near
copies (one word dropped, or re-cased and re-punctuated). In one run:

1. Embedders, on `--embed-rows` rows: all-MiniLM-L6-v2 in float32 (the baseline), under bfloat16 autocast, and the
   static embedder distilled from it. Rows/s, cosine to float32, and the neighbour tags each gives (exact search)
   against float32's: recall@10, Spearman of min_neighbor_distance, planted near copies found as nearest
   neighbour, rows whose paper filter (min_neighbor_distance > 0) decides the same.
2. Index, on `--index-rows` rows (static embeddings): exact IndexFlatL2 against IVF (what `neighbors_index=auto`
   picks from 100K rows): seconds of each (the ratio), recall@10, mean |error| of min_neighbor_distance, rows
   with the same repeat_count, and near-duplicate clusters (adjusted Rand index, rows with the same cluster id).
3. The fast path at `--rows` (1M) in its own process: static embedding + IVF search, seconds per part and peak RSS,
   beside the float32 path's cost extrapolated from part 1's rate and part 2's exact search (quadratic).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decontaminate_scale import sentences  # noqa: E402
from core.embed import embed  # noqa: E402
from core.io import atomic_write_json  # noqa: E402
from data_synth.tag.neighbors import build_index, neighbor_tags  # noqa: E402

K, THRESHOLD = 500, 0.05  # the tagger's defaults


def instructions(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """n instructions and the planted (copy, original) pairs of near copies."""
    rng = random.Random(seed)
    pool = sentences()
    rows, near = [], []
    for i in range(n):
        if i > 100 and i % 50 == 7:
            rows.append(rows[rng.randrange(i)])  # an exact repeat
        elif i > 100 and i % 50 == 19:
            j = rng.randrange(i)
            words = rows[j].split()
            if rng.random() < 0.5 and len(words) > 3:
                del words[rng.randrange(len(words))]
                rows.append(" ".join(words))
            else:
                rows.append(rows[j].lower().rstrip(".?!") + "?")
            near.append((i, j))
        else:
            q, target = "", rng.lognormvariate(5.3, 0.6)
            while len(q) < target:
                q += rng.choice(pool) + " "
            rows.append(q.strip())
    return rows, near


def top_others(emb: np.ndarray, index, k: int = 10, block: int = 4096) -> np.ndarray:
    """Each row's k nearest other rows (self dropped)."""
    out = np.empty((len(emb), k), dtype=np.int64)
    for start in range(0, len(emb), block):
        _, ids = index.search(emb[start : start + block], k + 1)
        rows = np.arange(start, start + len(ids))[:, None]
        for r, (row, hit) in enumerate(zip(rows[:, 0], ids, strict=True)):
            others = hit[(hit != row) & (hit >= 0)][:k]
            out[start + r, : len(others)] = others
            out[start + r, len(others) :] = -1
    return out


def recall(emb_ref: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = 8192) -> float:
    """recall@10 with ties: the share of b's 10 neighbours that are, in the reference space, no farther than the
    reference's own 10th (a row repeated 50 times has 49 equally right neighbours; matching ids would miss that)."""
    hits = 0
    for s in range(0, len(a), block):
        x = emb_ref[s : s + block, None, :]
        tenth = np.linalg.norm(x[:, 0] - emb_ref[a[s : s + block, -1]], axis=1)
        d = np.linalg.norm(x - emb_ref[b[s : s + block]], axis=2)
        hits += int((d <= tenth[:, None] + 1e-4).sum())
    return hits / b.size


def found(emb: np.ndarray, min_dist: np.ndarray, near: list) -> float:
    """The share of planted near copies whose original is (one of) their nearest rows."""
    i, j = np.array(near).T
    return round(float(np.mean(np.linalg.norm(emb[i] - emb[j], axis=1) <= min_dist[i] + 1e-4)), 4)


def agreement(ref: dict, emb_ref: np.ndarray, tags: dict, emb: np.ndarray, near: list, kind: str) -> dict:
    """`tags` (found with index `kind`) against `ref` (exact search)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import adjusted_rand_score

    a, b = top_others(emb_ref, build_index(emb_ref, "exact")), top_others(emb, build_index(emb, kind))
    md_ref, md = ref["min_neighbor_distance"], tags["min_neighbor_distance"]
    return {
        "recall_at_10": round(recall(emb_ref, a, b), 4),
        "min_neighbor_distance_spearman": round(float(spearmanr(md_ref, md).statistic), 4),
        "near_copies_found_as_nearest": found(emb, md, near),
        "near_copies_found_as_nearest_by_reference": found(emb_ref, md_ref, near),
        "same_filter_decision_min_distance_gt_0": round(float(np.mean((md_ref > 0) == (md > 0))), 4),
        "same_repeat_count": round(float(np.mean(ref["repeat_count"] == tags["repeat_count"])), 4),
        "clusters_adjusted_rand": round(float(adjusted_rand_score(ref["cluster_id"], tags["cluster_id"])), 4),
    }


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - start, 2)


def embedders(n: int) -> dict:
    texts, near = instructions(n)
    embed(
        texts[:8], "embedded-embedder", 64, static=True
    )  # distil (cached) and load once, outside the timing
    ref, ref_s = timed(embed, texts, "embedded-embedder", 64)
    ref_tags = neighbor_tags(ref, K, THRESHOLD, index="exact")
    out = {"rows": n, "float32": {"seconds": ref_s, "rows_per_s": round(n / ref_s, 1)}}
    for name, kwargs in {"bfloat16": {"dtype": "bfloat16"}, "static": {"static": True}}.items():
        emb, secs = timed(embed, texts, "embedded-embedder", 64 if name != "static" else 1024, **kwargs)
        cos = (emb * ref).sum(1) if emb.shape == ref.shape else None  # the static model has its own space
        tags = neighbor_tags(emb, K, THRESHOLD, index="exact")
        out[name] = {
            "seconds": secs,
            "rows_per_s": round(n / secs, 1),
            "speedup_vs_float32": round(ref_s / secs, 2),
            "cosine_to_float32_min": None if cos is None else round(float(cos.min()), 5),
            "cosine_to_float32_mean": None if cos is None else round(float(cos.mean()), 5),
            **agreement(ref_tags, ref, tags, emb, near, "exact"),
        }
    return out


def indexes(n: int) -> dict:
    texts, near = instructions(n)
    emb = embed(texts, "embedded-embedder", 1024, static=True)
    exact, exact_s = timed(neighbor_tags, emb, K, THRESHOLD, index="exact")
    ivf, ivf_s = timed(neighbor_tags, emb, K, THRESHOLD, index="ivf")
    farther = ivf["min_neighbor_distance"] > exact["min_neighbor_distance"] + 1e-6
    return {
        "rows": n,
        "embedder": "static",
        "exact_seconds": exact_s,
        "ivf_seconds": ivf_s,
        "speedup": round(exact_s / ivf_s, 2),
        "ivf_vs_exact": {
            **agreement(exact, emb, ivf, emb, near, "ivf"),
            "min_neighbor_distance_mean_abs_error": float(
                np.mean(np.abs(exact["min_neighbor_distance"] - ivf["min_neighbor_distance"]))
            ),
            "repeat_count_mean_abs_difference": float(
                np.mean(np.abs(exact["repeat_count"] - ivf["repeat_count"]))
            ),
            "same_cluster_id": round(float(np.mean(exact["cluster_id"] == ivf["cluster_id"])), 4),
            # rows whose true nearest sits in a list IVF did not search: how many, and how isolated they are
            "rows_with_a_farther_nearest": int(farther.sum()),
            "smallest_true_min_distance_among_them": (
                float(exact["min_neighbor_distance"][farther].min()) if farther.any() else None
            ),
        },
    }


FAST_PATH = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from benchmarks.neighbors_scale import instructions
from core.embed import embed
from data_synth.tag.neighbors import neighbor_tags
n = int(sys.argv[1])
t = time.perf_counter(); texts, _ = instructions(n); make = time.perf_counter() - t
t = time.perf_counter(); emb = embed(texts, "embedded-embedder", 1024, static=True); e = time.perf_counter() - t
t = time.perf_counter(); tags = neighbor_tags(emb, 500, 0.05); s = time.perf_counter() - t
print(json.dumps({"rows": n, "make_rows_seconds": round(make, 1), "embed_seconds": round(e, 1),
    "search_seconds": round(s, 1), "neighbors_seconds": round(e + s, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "rows_with_a_repeat": int((tags["repeat_count"] > 0).sum())}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed-rows", type=int, default=3000)
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/neighbors_scale.json"))
    a = p.parse_args()
    result = {
        "benchmark": "neighbors_scale",
        "machine": {"cpus": os.cpu_count()},
        "k": K,
        "threshold": THRESHOLD,
    }
    result["embedders"] = embedders(a.embed_rows)
    print(json.dumps(result["embedders"], indent=1), flush=True)
    result["index"] = indexes(a.index_rows)
    print(json.dumps(result["index"], indent=1), flush=True)
    done = subprocess.run(
        [sys.executable, "-c", FAST_PATH, str(a.rows), str(ROOT)], capture_output=True, text=True, check=True
    )
    fast = json.loads(done.stdout.strip().splitlines()[-1])
    # the float32 path at the same size: its embedding rate from part 1, exact search quadratic from part 2
    f32_embed = a.rows / result["embedders"]["float32"]["rows_per_s"]
    f32_search = result["index"]["exact_seconds"] * (a.rows / a.index_rows) ** 2
    fast["float32_exact_path_seconds_extrapolated"] = round(f32_embed + f32_search)
    fast["speedup_vs_float32_exact_path"] = round((f32_embed + f32_search) / fast["neighbors_seconds"], 1)
    fast["under_30_minutes"] = fast["neighbors_seconds"] < 1800
    result["fast_path"] = fast
    print(json.dumps(fast, indent=1), flush=True)
    result["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()

"""Curation at the paper's scale: tag (lengths, language), a paper selection preset and the report over synthetic
Magpie-shaped rows, with wall time and peak memory of each stage, at several sizes.

    python benchmarks/curation_scale.py [--rows 100000,1000000] [--work DIR] [--out FILE]

The rows are in the harness's Magpie layout (`messages`, one exchange) with the tag columns the preset reads
(`input_quality`, `min_neighbor_distance`, `instruct_reward`, ...), instruction and response lengths drawn
around the released Magpie-Pro's (instructions ~70-900 characters, responses ~300-5,000; mean row ~2.6 KB).
Each stage runs as its own process, as a user runs it, and its memory is sampled from /proc every 0.1 s:
peak RSS, and its anonymous part (what the process really holds; the rest is memory-mapped Arrow files the
kernel can drop). The baseline, in the same run and on the same files, is what every stage did before: the
whole set as Python rows (`datasets` `to_list`, as `core.data.load_rows` did).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.io import atomic_write_json  # noqa: E402

WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "value",
    "function",
    "list",
    "error",
    "result",
    "number",
    "file",
    "table",
    "user",
    "system",
    "time",
    "question",
    "answer",
    "write",
    "explain",
    "describe",
    "compare",
    "story",
    "python",
    "code",
    "example",
    "step",
    "first",
    "second",
    "because",
    "however",
    "therefore",
    "memory",
    "network",
    "language",
    "water",
    "history",
    "market",
    "garden",
    "recipe",
    "planet",
    "energy",
    "music",
    "theory",
]
QUALITY = ["very poor", "poor", "average", "good", "excellent"]
DIFFICULTY = ["very easy", "easy", "medium", "hard", "very hard"]
CATEGORIES = ["Information seeking", "Reasoning", "Planning", "Editing", "Coding & Debugging", "Math",
              "Role playing", "Data analysis", "Creative writing", "Advice seeking", "Brainstorming", "Others"]  # fmt: skip
SHARD = 100_000


def text(rng: random.Random, chars: int) -> str:
    words, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words).capitalize() + "."


def write_rows(directory: Path, n: int, seed: int = 0) -> float:
    """n rows as train-NNNNN.parquet shards of SHARD rows; returns the mean row size in bytes of text."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for k, start in enumerate(range(0, n, SHARD)):
        rows = []
        for i in range(start, min(n, start + SHARD)):
            q = text(rng, int(rng.lognormvariate(5.3, 0.6)))  # median ~200 characters
            a = text(rng, int(rng.lognormvariate(7.6, 0.5)))  # median ~2,000 characters
            total += len(q) + len(a)
            rows.append({
                "conversation_id": f"c{i}",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "input_quality": rng.choices(QUALITY, [2, 8, 25, 45, 20])[0],
                "difficulty": rng.choice(DIFFICULTY),
                "task_category": rng.choice(CATEGORIES),
                "instruct_reward": rng.gauss(-5, 4),
                "reward_difference": rng.gauss(1, 2),
                "min_neighbor_distance": 0.0 if rng.random() < 0.03 else rng.uniform(0.05, 1.2),
                "repeat_count": 0,
            })  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), directory / f"train-{k:05d}.parquet")
    return total / n


def measured(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its memory; wall seconds, peak RSS and peak anonymous RSS in MB."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(peak["VmRSS"] / 1024),
            "peak_anon_mb": round(peak["RssAnon"] / 1024)}  # fmt: skip


# The neighbour search over n rows of 384-d unit vectors (all-MiniLM-L6-v2's size), k=500, in query blocks, as
# the tagger runs it after embedding; the embedding itself is measured by benchmarks/tag_throughput.py.
NEIGHBORS = """
import sys, numpy as np
from data_synth.tag import neighbor_tags
n = int(sys.argv[1])
rng = np.random.default_rng(0)
emb = rng.normal(size=(n, 384)).astype(np.float32)
emb /= np.linalg.norm(emb, axis=1, keepdims=True)
emb[1::50] = emb[::50][: len(emb[1::50])]  # 2% exact duplicates
tags = neighbor_tags(emb, k=500, threshold=0.05, block=4096)
print(int((tags["repeat_count"] > 0).sum()))
"""

BASELINE = "from core.data import open_dataset; import sys; rows = open_dataset(sys.argv[1]).to_list(); print(len(rows))"


def one_size(n: int, work: Path) -> dict:
    data, py = work / f"rows_{n}", sys.executable
    t0 = time.time()
    mean_bytes = write_rows(data, n)
    result = {
        "rows": n,
        "mean_text_bytes_per_row": round(mean_bytes),
        "write_seconds": round(time.time() - t0, 1),
    }
    out = work / f"out_{n}"
    shutil.rmtree(
        out, ignore_errors=True
    )  # this benchmark's own output of an earlier run (overwrite would keep it)
    stages = {
        "tag": [py, "-m", "data_synth.tag", "taggers=[lengths,language]", f"input={data}",
                f"output_dir={out / 'tagged'}"],
        "select": [py, "-m", "data_synth.select", "recipe=pro_300k_filtered", f"input={out / 'tagged'}",
                   f"output_dir={out / 'selected'}"],
        "report": [py, "-m", "data_synth.report", f"input={out / 'tagged'}", f"output_dir={out / 'report'}",
                   "max_points=1000"],
        "baseline_python_rows": [py, "-c", BASELINE, str(out / "tagged")],
    }  # fmt: skip
    for name, cmd in stages.items():
        result[name] = measured(cmd)
        print(n, name, result[name], flush=True)
    selected = json.loads((out / "selected" / "manifest.json").read_text())["selected_rows"]
    result["selected_rows"] = selected
    stage_peaks = [result[s]["peak_anon_mb"] for s in ("tag", "select", "report")]
    result["anon_ratio_baseline_over_worst_stage"] = round(
        result["baseline_python_rows"]["peak_anon_mb"] / max(stage_peaks), 2
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curation_scale.json"))
    ap.add_argument(
        "--neighbors-rows", default="10000,100000", help="sizes for the blocked FAISS search alone"
    )
    ap.add_argument("--skip-curation", action="store_true", help="only the neighbour search")
    a = ap.parse_args()
    neighbors = {}
    for n in [int(x) for x in a.neighbors_rows.split(",") if x]:
        neighbors[n] = measured([sys.executable, "-c", NEIGHBORS, str(n)])
        print("neighbors", n, neighbors[n], flush=True)
    if a.skip_curation:
        previous = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
        atomic_write_json(a.out, {**previous, "neighbors_faiss_k500": neighbors})
        return
    sizes = [int(x) for x in a.rows.split(",")]
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        results = [one_size(n, Path(tmp)) for n in sizes]
    growth = {}
    if len(results) > 1:
        small, large = results[0], results[-1]
        scale = large["rows"] / small["rows"]
        for stage in ("tag", "select", "report", "baseline_python_rows"):
            growth[stage] = {
                "time_ratio": round(large[stage]["seconds"] / max(small[stage]["seconds"], 0.1), 2),
                "peak_rss_ratio": round(large[stage]["peak_rss_mb"] / max(small[stage]["peak_rss_mb"], 1), 2),
                "peak_anon_ratio": round(
                    large[stage]["peak_anon_mb"] / max(small[stage]["peak_anon_mb"], 1), 2
                ),
            }
        growth["rows_ratio"] = scale
    atomic_write_json(a.out, {"machine": "2 CPU cores, 24 GiB RAM", "results": results, "growth": growth,
                              "neighbors_faiss_k500": neighbors})  # fmt: skip
    print(json.dumps({"results": results, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()

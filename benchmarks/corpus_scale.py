"""Humpback's corpus step at the paper's scale: documents -> deduplicated passages, time and peak memory.

    python benchmarks/corpus_scale.py [--docs 100000,500000] [--work DIR] [--out FILE]

The documents are real English prose recombined: each is 3-8 paragraphs drawn from Python's own documentation
(`pydoc_data.topics`, the demo corpus) under Markdown headings. 1 in 20 documents is an earlier one again (a mirrored
page) and 1 in 10 paragraphs is copied from an earlier document, so deduplication has work to do; the rest carry a
document number, so they are unique. Mean document ~1.7 KB, stored as Parquet with a `text` column, as a web dump is.

`data_synth.corpus` runs as its own process, as a user runs it, with its memory sampled from /proc
(benchmarks/curation_scale.py's `measured`). The baseline, in the same run and on the same files, reads the text
column and hashes every document: the floor any segmenter pays (the ratio says what segmentation adds).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.curation_scale import measured  # noqa: E402
from core.io import atomic_write_json  # noqa: E402

SHARD = 100_000
BASELINE = """
import hashlib, sys, pyarrow.parquet as pq, pathlib
n = 0
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.parquet")):
    for batch in pq.ParquetFile(f).iter_batches(columns=["text"], batch_size=10_000):
        for t in batch.column(0).to_pylist():
            hashlib.sha1(t.encode()).digest()
            n += 1
print(n)
"""


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [p.strip() for doc in topics.values() for p in doc.split("\n\n") if len(p.strip()) > 80]


def write_docs(directory: Path, n: int, seed: int = 0) -> float:
    """n documents as Parquet shards of SHARD rows; returns the mean document size in characters."""
    rng = random.Random(seed)
    pool = paragraphs()
    directory.mkdir(parents=True, exist_ok=True)
    total, earlier = 0, []
    for k, start in enumerate(range(0, n, SHARD)):
        docs = []
        for i in range(start, min(n, start + SHARD)):
            if docs and rng.random() < 0.05:  # a mirrored page: an earlier document again, verbatim
                copy = rng.choice(docs)["text"]
                total += len(copy)
                docs.append({"text": copy, "url": f"https://mirror.example.org/{i}"})
                continue
            parts = [f"# Notes {i}"]
            for j in range(rng.randint(3, 8)):
                if earlier and rng.random() < 0.1:
                    parts.append(rng.choice(earlier))  # a verbatim repeat of an earlier document's paragraph
                    continue
                p = f"{rng.choice(pool)} (document {i}, part {j})"
                parts.append(p)
                if rng.random() < 0.01:
                    earlier.append(p)
            text = "\n\n".join(parts)
            total += len(text)
            docs.append({"text": text, "url": f"https://example.org/{i}"})
        pq.write_table(pa.Table.from_pylist(docs), directory / f"train-{k:05d}.parquet")
    return total / n


def one_size(n: int, work: Path) -> dict:
    data, py = work / f"docs_{n}", sys.executable
    t0 = time.time()
    mean_chars = write_docs(data, n)
    result = {
        "documents": n,
        "mean_chars_per_doc": round(mean_chars),
        "write_seconds": round(time.time() - t0, 1),
    }
    out = work / f"passages_{n}"
    shutil.rmtree(
        out, ignore_errors=True
    )  # this benchmark's own output of an earlier run (overwrite would keep it)
    result["corpus"] = measured([py, "-m", "data_synth.corpus", f"source={data}", "title_column=url",
                                 f"output_dir={out}"])  # fmt: skip
    result["baseline_read_and_hash"] = measured([py, "-c", BASELINE, str(data)])
    manifest = json.loads((out / "manifest.json").read_text())
    result.update(passages=manifest["passages"], dropped=manifest["dropped"])
    result["time_ratio_corpus_over_baseline"] = round(
        result["corpus"]["seconds"] / max(result["baseline_read_and_hash"]["seconds"], 0.1), 2
    )
    result["docs_per_second"] = round(n / max(result["corpus"]["seconds"], 0.1))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default="100000,500000")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corpus_scale.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        results = [one_size(int(n), Path(tmp)) for n in a.docs.split(",")]
    growth = {}
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = {"docs_ratio": large["documents"] / small["documents"],
                  "time_ratio": round(large["corpus"]["seconds"] / max(small["corpus"]["seconds"], 0.1), 2),
                  "peak_rss_ratio": round(large["corpus"]["peak_rss_mb"] / max(small["corpus"]["peak_rss_mb"], 1), 2)}  # fmt: skip
    atomic_write_json(a.out, {"machine": "2 CPU cores, 24 GiB RAM", "results": results, "growth": growth})
    print(json.dumps({"results": results, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()

"""Decontamination at the paper's scale: `data_synth.decontaminate` over 100K and 1M rows against the four benchmarks'
prompts, with wall time and peak memory, and how they grow with the rows.

    python benchmarks/decontaminate_scale.py [--rows 100000,1000000] [--embed-rows 10000,100000] \
        [--embed-dtypes float32[,bfloat16]] [--questions alpaca_eval=PATH,arena_hard=PATH,...] [--work DIR] [--out FILE]

The rows are Magpie-shaped (`messages`, one exchange): instructions of real English prose recombined (sentences of
Python's own documentation, `pydoc_data.topics`, median ~290 characters) and responses of ~2,000 characters. 1 row in 1,000
is a benchmark prompt planted verbatim or shouted and re-spaced (each must be flagged), and 1 in 10 quotes ten words
of a long prompt (n-gram hits that the exact check runs on, mostly below the threshold). The prompts are those
of `--questions` (default: the trimmed copies in tests/fixtures; the full files give the real index size).

Each run is its own process, as a user runs it, its memory sampled from /proc (benchmarks/curation_scale.py's
`measured`). The n-gram rule runs at every `--rows` size; with the MiniLM embedding check too at `--embed-rows` (on
CPU it is the embedding that costs: 100K and 1M rows are extrapolated from two sizes, fixed cost + rate x rows). Baselines in
the same run, on the same files: a read pass (stream every row's user turns and tokenize them: the floor any check
pays) and the textbook all-pairs comparison (each row's n-gram set against each prompt's, on a sample of rows).

With two `--embed-dtypes`, each embedding run is made in both and compared in the same run (`embed_dtype_comparison`:
the speedup over the first, whether the same rows are flagged, the largest cosine difference).

results/decontaminate_scale.json: `--embed-rows 2000,8000` (the embedding ran at ~20 rows/s on the shared cores) and
`--questions` naming the full files at the fixtures' commits (tests/fixtures/*/README.md say where they come from).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
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
from core.questions import load_questions  # noqa: E402
from data_synth.decontaminate import tokens  # noqa: E402

SHARD = 100_000
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_QUESTIONS = {
    "alpaca_eval": FIXTURES / "alpaca_eval_cd543a1" / "alpaca_eval.json",
    "arena_hard": FIXTURES / "arena_hard_auto_196f6b8" / "arena-hard-v0.1" / "question.jsonl",
    "arena_hard_v2": FIXTURES / "arena_hard_auto_196f6b8" / "arena-hard-v2.0" / "question.jsonl",
    "mt_bench": FIXTURES / "fastchat_0e6d3e4" / "mt_bench" / "question.jsonl",
}
# The floor: every row's user turns streamed as the stage streams them (Arrow blocks, batches of row dicts) and
# tokenized, nothing matched or written.
READ_PASS = """
import sys
from core.chat import to_messages
from core.data import open_dataset, table_block
from data_synth.decontaminate import tokens
ds = open_dataset(sys.argv[1])
n = 0
for start in range(0, len(ds), 100_000):
    block = table_block(ds, start, min(100_000, len(ds) - start)).select(["messages"])
    for first in range(0, block.num_rows, 10_000):
        for row in block.slice(first, 10_000).to_pylist():
            n += sum(len(tokens(m["content"])) for m in to_messages(row, "x") if m["role"] == "user")
print(n)
"""


def sentences() -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(p.strip() for doc in topics.values() for p in doc.split("\n\n") if len(p.strip()) > 80)
    return [s for s in re.split(r"(?<=[.?!])\s+", text) if 20 < len(s) < 400]


def write_rows(directory: Path, n: int, prompts: list[str], seed: int = 0) -> dict:
    """n rows as train-NNNNN.parquet shards; the planted prompts and how many rows quote a long prompt."""
    rng = random.Random(seed)
    pool = sentences()
    long = [p for p in prompts if len(tokens(p)) >= 40 and len(p.split()) >= 40]
    usable = [p for p in prompts if len(tokens(p)) >= 8]  # shorter prompts have no 8-gram (embedding only)
    directory.mkdir(parents=True, exist_ok=True)
    planted, quoted, chars = [], 0, 0
    for k, start in enumerate(range(0, n, SHARD)):
        rows = []
        for i in range(start, min(n, start + SHARD)):
            q, a = "", ""
            q_chars, a_chars = (
                rng.lognormvariate(5.3, 0.6),
                rng.lognormvariate(7.6, 0.5),
            )  # medians ~200, ~2,000
            while len(q) < q_chars:
                q += rng.choice(pool) + " "
            while len(a) < a_chars:
                a += rng.choice(pool) + " "
            if i % 1000 == 500:
                q = usable[(i // 1000) % len(usable)]
                if (i // 1000) % 2:
                    q = "  " + q.upper().replace(" ", "\n  ")
                planted.append(i)
            elif i % 10 == 3 and long:
                words = rng.choice(long).split()
                at = rng.randrange(0, len(words) - 10)
                q = f"{q} As someone wrote: {' '.join(words[at : at + 10])}"
                quoted += 1
            chars += len(q) + len(a)
            rows.append(
                {"messages": [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a}]}
            )
        pq.write_table(pa.Table.from_pylist(rows), directory / f"train-{k:05d}.parquet")
    return {"planted": planted, "quoted_rows": quoted, "mean_text_chars_per_row": round(chars / n)}


def pairwise_rows_per_s(data: Path, prompts: list[str], rows: int = 500, n: int = 8) -> float:
    """The all-pairs way: each row's n-gram set intersected with every prompt's (sets prepared once), the matched
    positions counted; on the first `rows` rows."""
    grams = []
    for p in prompts:
        t = tokens(p)
        mapping = {tuple(t[i : i + n]): range(i, i + n) for i in range(len(t) - n + 1)}
        grams.append((mapping, set(mapping), len(t)))
    table = pq.read_table(sorted(data.glob("*.parquet"))[0]).slice(0, rows).to_pylist()
    start = time.perf_counter()
    for row in table:
        d = tokens(row["messages"][0]["content"])
        mine = {tuple(d[i : i + n]) for i in range(len(d) - n + 1)}
        for mapping, keys, length in grams:
            matched = {t for g in mine & keys for t in mapping[g]}
            _ = len(matched) / length if length else 0.0
    return len(table) / (time.perf_counter() - start)


def decontaminate(
    data: Path, out: Path, questions: dict[str, Path], embed: bool, dtype: str = "float32"
) -> dict:
    cmd = [sys.executable, "-m", "data_synth.decontaminate", f"input={data}", f"output_dir={out}",
           f"benchmarks=[{','.join(questions)}]", *[f"questions.{b}={p}" for b, p in questions.items()]]  # fmt: skip
    cmd.append(f"embed_dtype={dtype}" if embed else "embedder=null")
    result = measured(cmd)
    manifest = json.loads((out / "manifest.json").read_text())
    result["flagged_rows"] = manifest["flagged_rows"]
    result["flagged_per_benchmark"] = {b: s["flagged_rows"] for b, s in manifest["benchmarks"].items()}
    return result


def columns(out: Path, prefix: str) -> dict[str, list]:
    """Every column of the output whose name starts with `prefix`, in row order."""
    table = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("train-*"))])
    return {c: table.column(c).to_pylist() for c in table.column_names if c.startswith(prefix)}


def compare_dtypes(runs: dict[str, dict], outputs: dict[str, Path]) -> dict:
    """The second dtype against the first, in the same run: speed, flags and cosines."""
    (base, first), (name, second) = list(runs.items())[:2]
    flags = [columns(outputs[d], "contaminated_") for d in (base, name)]
    cosines = [columns(outputs[d], "contamination_embed_") for d in (base, name)]
    return {
        base: first,
        name: second,
        f"speedup_{name}_over_{base}": round(first["seconds"] / second["seconds"], 2),
        "same_rows_flagged": flags[0] == flags[1],
        "max_cosine_difference": max(
            abs(x - y) for c in cosines[0] for x, y in zip(cosines[0][c], cosines[1][c], strict=True)
        ),
    }


def planted_flagged(out: Path, planted: list[int], benches: list[str]) -> int:
    flags = pa.concat_tables(
        [
            pq.read_table(f, columns=[f"contaminated_{b}" for b in benches])
            for f in sorted(out.glob("train-*"))
        ]
    )
    hit = [any(flags.column(c)[i].as_py() for c in flags.column_names) for i in planted]
    return sum(hit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--embed-rows", default="10000,100000")
    ap.add_argument(
        "--embed-dtypes", default="float32", help="embed_dtype of the embedding runs (two: compared)"
    )
    ap.add_argument("--questions", default="", help="bench=path,... (default: the fixtures' trimmed copies)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decontaminate_scale.json"))
    a = ap.parse_args()
    questions = {
        **DEFAULT_QUESTIONS,
        **{b: Path(p) for b, _, p in (x.partition("=") for x in a.questions.split(",") if x)},
    }
    prompts = {b: [t for q in load_questions(b, str(p)) for t in q["turns"]] for b, p in questions.items()}
    every = [t for texts in prompts.values() for t in texts]
    result: dict = {
        "machine": "2 CPU cores, 24 GiB RAM (shared)",
        # other work on the same cores slows every number: the load when the run starts and ends
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "benchmark_prompts": {b: {"file": str(questions[b]), "prompts": len(t)} for b, t in prompts.items()},
        "ngram": {},
        "embedding": {},
    }
    sizes = sorted({int(x) for x in a.rows.split(",") if x} | {int(x) for x in a.embed_rows.split(",") if x})
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for n in sizes:
            data = Path(tmp) / f"rows_{n}"
            t0 = time.time()
            made = write_rows(data, n, every)
            print(n, "written", round(time.time() - t0, 1), flush=True)
            info = {"mean_text_chars_per_row": made["mean_text_chars_per_row"], "planted": len(made["planted"]),
                    "quoting_rows": made["quoted_rows"]}  # fmt: skip
            if n == sizes[0]:
                result["baseline_pairwise_rows_per_s"] = round(pairwise_rows_per_s(data, every), 1)
            for embed, runs in ((False, a.rows), (True, a.embed_rows)):
                if str(n) not in runs.split(","):
                    continue
                dtypes = a.embed_dtypes.split(",") if embed else ["float32"]
                by_dtype, outputs = {}, {}
                for dtype in dtypes:
                    out = outputs[dtype] = Path(tmp) / f"out_{n}_{'embed' if embed else 'ngram'}_{dtype}"
                    shutil.rmtree(out, ignore_errors=True)
                    run = by_dtype[dtype] = {**info, **decontaminate(data, out, questions, embed, dtype)}
                    run["planted_flagged"] = planted_flagged(out, made["planted"], list(questions))
                    run["rows_per_s"] = round(n / run["seconds"], 1)
                if len(dtypes) > 1:
                    result.setdefault("embed_dtype_comparison", {})[str(n)] = compare_dtypes(
                        by_dtype, outputs
                    )
                run = by_dtype[dtypes[0]]
                if not embed:
                    run["read_pass"] = measured([sys.executable, "-c", READ_PASS, str(data)])
                    run["time_ratio_over_read_pass"] = round(run["seconds"] / run["read_pass"]["seconds"], 2)
                    run["speedup_over_pairwise"] = round(
                        run["rows_per_s"] / result["baseline_pairwise_rows_per_s"], 1
                    )
                (result["embedding" if embed else "ngram"])[str(n)] = run
                print(n, "embed" if embed else "ngram", run, flush=True)
                atomic_write_json(a.out, result)  # what is measured so far
                for out in outputs.values():
                    shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
    for kind in ("ngram", "embedding"):
        runs = result[kind]
        if len(runs) > 1:
            small, large = runs[min(runs, key=int)], runs[max(runs, key=int)]
            result[kind]["growth"] = {
                "rows_ratio": int(max(runs, key=int)) // int(min(runs, key=int)),
                "time_ratio": round(large["seconds"] / max(small["seconds"], 0.1), 2),
                "peak_rss_ratio": round(large["peak_rss_mb"] / max(small["peak_rss_mb"], 1), 2),
                "peak_anon_ratio": round(large["peak_anon_mb"] / max(small["peak_anon_mb"], 1), 2),
            }
    sizes_run = sorted((k for k in result["embedding"] if k.isdigit()), key=int)
    # the fixed cost (imports, the prompts' embeddings) is the smaller run's; the rest grows linearly
    if len(sizes_run) > 1:
        small, large = sizes_run[0], sizes_run[-1]
        t_small, t_large = result["embedding"][small]["seconds"], result["embedding"][large]["seconds"]
        per_row = (t_large - t_small) / (int(large) - int(small))
        result["embedding"]["marginal_rows_per_s"] = round(1 / per_row, 1)
        for n in (100_000, 1_000_000):
            result["embedding"][f"extrapolated_{n // 1000}k_seconds"] = round(
                t_small + (n - int(small)) * per_row
            )
        result["embedding"]["extrapolated_from"] = (
            f"{small} and {large} rows: fixed cost + marginal rate x rows"
        )
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    atomic_write_json(a.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

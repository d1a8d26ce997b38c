"""Self-augmentation (Humpback): the backward model M_yx writes the instruction each passage would answer.

    python -m data_synth.augment recipe=humpback_demo model=runs/humpback/backward/merged input=runs/corpus \
        output_dir=runs/humpback/augment

M_yx is a model trained with `train/sft.py reverse_pairs=true` (response -> instruction), so its prompt is the
passage as the user turn of its chat template, and its reply is the instruction. Sampling follows the paper
(nucleus, T=0.7, p=0.9) with a seed of its own per request, derived from (seed, passage index, attempt): a serving
engine seeds each request on its own, and one shared seed would give every identical prompt the same sample.

Output: `train-NNNNN.parquet`, one shard per chunk of passages, with `messages` (the generated instruction, then
the passage as the answer), `passage_index`, `title`, `doc_id`, `generator` and `finish_reason`. An empty
instruction is sampled again (`retries`, new seed), then counted as failed in `manifest.json` with its passage
index, never dropped silently. Re-running resumes after the last complete shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import ConfigError, cli, load_config, resolved
from core.data import open_dataset, table_block
from core.engines import EngineConfig, Sampling, make_engine, request_seed
from core.io import atomic_write_json, digest, read_parquet
from core.rundir import prepare_output_dir
from core.shards import drop_chunk, finished_chunks, write_chunk

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("messages", pa.list_(MESSAGE)),
        ("passage_index", pa.int64()),
        ("title", pa.string()),
        ("doc_id", pa.string()),
        ("generator", pa.string()),
        ("finish_reason", pa.string()),
    ]
)


@dataclass
class AugmentConfig:
    model: str = "runs/humpback/backward/merged"  # the backward model M_yx
    input: str = "runs/corpus"  # passages (data_synth.corpus, or any data set with a text column)
    text_column: str = "text"
    engine: EngineConfig = field(default_factory=EngineConfig)
    temperature: float = 0.7  # the paper's nucleus sampling
    top_p: float = 0.9
    max_tokens: int = 512
    retries: int = 1  # an empty instruction is sampled again with a new seed this many times, then failed
    seed: int = 0
    max_passages: int | None = None  # the first N passages
    chunk_size: int = 256  # passages per shard: the resumable unit (the engine batches itself)
    output_dir: str = "runs/humpback/augment"
    overwrite: bool = False


def generate_chunk(
    engine: Any, cfg: AugmentConfig, block: pa.Table, first: int
) -> tuple[list[dict], list[dict]]:
    """Instructions for one chunk of passages: (rows, failures)."""
    texts = block.column(cfg.text_column).to_pylist()
    titles = block.column("title").to_pylist() if "title" in block.column_names else [None] * len(texts)
    doc_ids = block.column("doc_id").to_pylist() if "doc_id" in block.column_names else [None] * len(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{cfg.input}: row {first + i}: '{cfg.text_column}' is empty or not text")
    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    done: dict[int, Any] = {}
    pending = list(range(len(texts)))
    for attempt in range(cfg.retries + 1):
        samplings = [
            Sampling(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=request_seed(cfg.seed, "augment", first + i, attempt),
            )
            for i in pending
        ]
        outs = engine.complete([prompts[i] for i in pending], samplings)
        for i, c in zip(pending, outs, strict=True):
            done[i] = c
        pending = [i for i in pending if not done[i].text.strip()]
        if not pending:
            break
    rows, failures, failed = [], [], set(pending)
    for i, text in enumerate(texts):
        c = done[i]
        if i in failed:
            failures.append(
                {"passage_index": first + i, "reason": "empty instruction", "finish_reason": c.finish_reason}
            )
            continue
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": c.text.strip()},
                    {"role": "assistant", "content": text},
                ],
                "passage_index": first + i,
                "title": titles[i],
                "doc_id": doc_ids[i],
                "generator": cfg.model,
                "finish_reason": c.finish_reason,
            }
        )
    return rows, failures


def passages_digest(ds: Any, cfg: AugmentConfig, first: int, count: int) -> str:
    return digest(table_block(ds, first, count).column(cfg.text_column).to_pylist())


def rows_match(out: Path, k: int, ds: Any, cfg: AugmentConfig) -> bool:
    """For a chunk written before chunks carried a digest: whether every passage its rows answer is still the input's
    passage at that index (a chunk with no rows cannot tell, and is redone)."""
    shard = out / f"train-{k:05d}.parquet"
    if not shard.is_file():
        return False
    rows = read_parquet(shard, columns=["passage_index", "messages"]).to_pylist()
    return all(
        r["passage_index"] < len(ds)
        and r["messages"][1]["content"]
        == table_block(ds, r["passage_index"], 1).column(cfg.text_column)[0].as_py()
        for r in rows
    )


def uncovered(covered: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(first, count) spans of at most `size` passages over the runs of passages not yet covered."""
    spans = []
    edges = np.flatnonzero(np.diff(np.concatenate([[1], covered.astype(np.int8), [1]])))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):  # each run of uncovered passages
        spans += [(int(i), int(min(size, stop - i))) for i in range(start, stop, size)]
    return spans


def run(cfg: AugmentConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.augment",
        inputs=(cfg.input, cfg.model),
        overwrite=cfg.overwrite,
    )
    ds = open_dataset(cfg.input)
    if cfg.text_column not in ds.column_names:
        raise ConfigError(
            f"{cfg.input}: no column '{cfg.text_column}' (columns: {', '.join(ds.column_names)})"
        )
    n = len(ds) if cfg.max_passages is None else min(len(ds), cfg.max_passages)
    # Resume: each finished chunk records the passages it covered (so a changed chunk_size neither repeats nor skips
    # any) and a digest of their text: a chunk whose passages changed under the same path is redone, never kept.
    done = finished_chunks(out)
    covered = np.zeros(n, dtype=bool)
    for k, meta in done.items():
        first, count = meta["first"], meta["count"]
        same = first + count <= len(ds) and (
            meta.get("digest") == passages_digest(ds, cfg, first, count)
            if "digest" in meta
            else rows_match(out, k, ds, cfg)
        )
        if not same:
            drop_chunk(out, k)  # ours, computed from passages that are no longer there
            continue
        covered[first : first + count] = True
    spans = uncovered(covered, cfg.chunk_size)
    engine = make_engine(cfg.model, cfg.engine) if spans else None
    bar = tqdm(total=n, initial=int(covered.sum()), desc="augment", unit="passage")
    k = max(done, default=-1) + 1
    for first, count in spans:
        rows, failures = generate_chunk(engine, cfg, table_block(ds, first, count), first)
        # The chunk's failures travel with its rows: one atomic file holds the whole chunk's outcome.
        meta = {
            "first": first,
            "count": count,
            "digest": passages_digest(ds, cfg, first, count),
            "rows": len(rows),
            "failures": failures,
            "truncated": sum(r["finish_reason"] == "length" for r in rows),
        }
        write_chunk(out, k, pa.Table.from_pylist(rows, schema=SCHEMA), meta)
        k += 1
        bar.update(count)
    bar.close()
    metas = list(finished_chunks(out).values())
    failures = [f for m in metas for f in m["failures"]]
    summary = {
        "model": cfg.model,
        "passages": n,
        "rows": sum(m["rows"] for m in metas),
        "failed": len(failures),
        "truncated": sum(m["truncated"] for m in metas),
        "failures": failures[:1000],
        "sampling": {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": "per request: (seed, passage index, attempt)",
        },
    }
    atomic_write_json(out / "manifest.json", summary)
    if summary["rows"] == 0:
        raise ConfigError(
            f"{cfg.model}: no instruction for any of {n} passages ({len(failures)} empty after "
            f"{cfg.retries} retries; see {out / 'manifest.json'})"
        )
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("augment", argv, AugmentConfig)
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("passages", "rows", "failed", "truncated")}, indent=2))


if __name__ == "__main__":
    main()

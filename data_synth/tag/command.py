"""Tag every conversation with the columns Magpie filters on (the paper's tags).

    python -m data_synth.tag recipe=tag_demo input=runs/demo/magpie output_dir=runs/demo/tagged [taggers=...]

Each tagger writes its own resumable shards under `output_dir/tags/<tagger>/` keyed by input row index, so
any tagger can run alone and a killed run redoes only unfinished chunks. At the end the input rows and every
tag are joined into `output_dir/train-NNNNN.parquet`. What produced each column (a reward model, or a judge
standing in for one on CPU) is recorded in the Parquet field metadata and in `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from core.chat import first_turn, to_messages
from core.config import cli, load_config, resolved
from core.data import iter_rows, open_dataset, remapped, shard_bounds, table_block
from core.engines import EngineConfig
from core.io import atomic_write_json, write_parquet
from core.judge import JudgeConfig
from core.rundir import prepare_output_dir
from core.shards import ShardWriter
from data_synth.tag.context import Context, aligned_tags
from data_synth.tag.taggers import FAST_CHUNK, MAGPIE_TAGGERS, TAGGERS, in_order


@dataclass
class TagConfig:
    input: str = "runs/demo/magpie"
    output_dir: str = "runs/demo/tagged"
    taggers: list[str] = field(default_factory=lambda: list(MAGPIE_TAGGERS))
    # The judge of the LLM-judged tags (quality, difficulty, task_category; reward and safety on CPU), with the
    # cache, retries and failure accounting every judge has. Labels are its JSON replies (prefilled "{", stopped
    # at "}"), at most judge.max_tokens long.
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=256, logprobs=None))
    # instruct_reward: a sequence-classification reward model; null = the judge's probability-weighted 1-10
    # score, labelled as such in the column metadata
    reward_model: str | None = None
    reward_batch_size: int = 8
    # ArmoRM ships its own model code: set true to run it (you trust it)
    reward_trust_remote_code: bool = False
    # reward_difference: r(response) - r(base model's URIAL response), same scorer as instruct_reward
    base_model: str = "embedded"  # Llama-3-8B base in GPU recipes; on CPU the embedded model stands in
    base_engine: EngineConfig = field(default_factory=EngineConfig)
    base_max_tokens: int = 512
    # safety: a Llama-Guard model (verdict + categories); null = the judge's yes/no probability, labelled
    safety_model: str | None = None
    safety_engine: EngineConfig = field(default_factory=EngineConfig)
    # neighbors: FAISS over sentence embeddings of the first user turn, searched in blocks of query rows
    embedder: str = "embedded-embedder"
    embed_batch_size: int = 256
    # bfloat16: autocast, ~2x on CPUs with AVX512-BF16 and on GPUs (cosine to float32 > 0.9999). embed_static: a
    # bag-of-tokens model distilled from the embedder, ~100x faster and coarser (1M rows on 2 cores in minutes).
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    embed_static: bool = False
    neighbors_k: int = 500
    neighbors_block: int = 4096  # query rows per FAISS search: memory is block x k, not rows x k
    # auto: exact search below 100K rows, FAISS IVF (4 sqrt(rows) lists, nprobe of them searched) from there
    neighbors_index: Literal["auto", "exact", "ivf"] = "auto"
    neighbors_nprobe: int = 32
    near_duplicate_distance: float = 0.05
    # curation (Humpback self-curation): `paper` = the judge writes its reasoning, then "Score: N" on the last line
    # (parsed; a reply without one is retried, then failed). `probability` = the reply is prefilled "Score: " and
    # the score is the probability-weighted 1-5 of its first token, rounded: for judges too small to follow the
    # format (the embedded 135M model), and labelled as such in the column metadata.
    curation: Literal["paper", "probability"] = "paper"
    # lengths
    tokenizer: str = "embedded"
    chunk_size: int = 256  # rows per resumable unit of the model-bound taggers
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [t for t in self.taggers if t not in TAGGERS]
        if unknown:
            raise ValueError(f"taggers: unknown {unknown}; choose from {list(TAGGERS)}")


def row_keys(ds: Any, where: str) -> pa.Array:
    """What each row's tags were computed from: a hash of its conversation (any layout), batch by batch. Resume
    and merge key tags to it, so tags never land on other rows when the input changes under the same path. A row
    with no conversation fails here, naming it, before any work."""
    keys: list[str] = []
    for batch in iter_rows(ds):
        for row in batch:
            blob = json.dumps(
                to_messages(row, f"{where}: row {len(keys)}"), sort_keys=True, ensure_ascii=False
            )
            keys.append(hashlib.sha1(blob.encode()).hexdigest()[:16])
    return pa.array(keys, pa.string())


def run_tagger(name: str, ds: Any, ctx: Context, out: Path) -> int:
    """Tag every row not yet tagged, one shard per chunk (the unit a killed run redoes); return how many rows stay
    untagged because the judge never answered for them (a re-run asks again)."""
    tagger, cfg, keys = TAGGERS[name], ctx.cfg, ctx.keys
    chunk = FAST_CHUNK if tagger.fast else max(1, cfg.chunk_size)
    tag_dir = out / "tags" / name
    done = aligned_tags(tag_dir, keys, columns=[]).column("__tagged__").to_numpy(zero_copy_only=False)
    todo = np.flatnonzero(~done)
    if tagger.whole_set and len(todo):  # the neighbour search needs every row: redo all of it
        for shard in tag_dir.glob("part-*.parquet"):
            shard.unlink()
        todo = np.arange(len(keys))
    writer = ShardWriter(tag_dir, rows_per_shard=chunk, split="part")
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"tag {name}", unit="row")
    step = len(todo) if tagger.whole_set else chunk
    missing = 0
    for start in range(0, len(todo), max(1, step)):
        idx = todo[start : start + step]
        pairs = instructions(ds, cfg.input) if tagger.whole_set else first_turns(ds, idx, cfg.input)
        ctx.missing.clear()
        results = tagger.tag(ctx, pairs, idx)
        row_keys_ = keys.take(pa.array(idx)).to_pylist()
        # A failed judgment (an unreadable reply) is a result; a row the engine never answered is left untagged
        rows = [
            {
                "row_index": int(i),
                "row_key": key,
                f"{name}_failed": res is None,
                **{c: (res or {}).get(c) for c in tagger.columns},
            }
            for k, (i, key, res) in enumerate(zip(idx, row_keys_, results, strict=True))
            if k not in ctx.missing
        ]
        for block in range(0, len(rows), chunk):
            writer.add(rows[block : block + chunk])
            writer.flush()
        missing += len(ctx.missing)
        bar.update(len(idx))
    bar.close()
    return missing


def first_turns(ds: Any, idx: np.ndarray, where: str) -> list[tuple[str, str]]:
    rows = remapped(ds).select(idx).to_list() if len(idx) else []  # only this chunk's pages stay mapped
    return [first_turn(r, f"{where}: row {i}") for i, r in zip(idx, rows, strict=True)]


def instructions(ds: Any, where: str) -> list[tuple[str, str]]:
    """Every row's first user turn with an empty response: what a whole-set tagger (the neighbour search) reads,
    without holding every response in memory."""
    out: list[tuple[str, str]] = []
    for batch in iter_rows(ds):
        out += [(first_turn(r, f"{where}: row {len(out) + k}")[0], "") for k, r in enumerate(batch)]
    return out


def run(cfg: TagConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    models = (
        cfg.judge.model,
        cfg.reward_model,
        cfg.base_model,
        cfg.safety_model,
        cfg.embedder,
        cfg.tokenizer,
    )
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.tag",
        inputs=(cfg.input, *models),
        may_differ=("taggers",),
        overwrite=cfg.overwrite,
    )
    ds = open_dataset(cfg.input)  # Arrow, memory-mapped: never the whole set as Python objects
    start = time.time()
    ctx = Context(cfg, out, row_keys(ds, cfg.input))
    timings: dict[str, float] = {}
    order = in_order(cfg.taggers)
    for name in order:
        t0 = time.time()
        ctx.release(keep=TAGGERS[name].uses(cfg))
        missing = run_tagger(name, ds, ctx, out)
        timings[name] = round(time.time() - t0, 2)
        # Rows the judge never answered stay untagged; past the tolerated share the stage fails here
        if missing:
            ctx.judge.raise_for_outages(missing, len(ctx.keys), f"rows of tagger '{name}'")
    ctx.release(keep=set())
    judge = ctx.built("judge")
    summary = merge(ds, ctx.keys, cfg, out)
    summary["seconds_per_tagger"] = timings
    if judge is not None:
        summary["judge_calls"] = judge.stats.as_dict()
    summary["wall_seconds"] = round(time.time() - start, 2)
    atomic_write_json(out / "manifest.json", summary)
    return summary


def merge(ds: Any, keys: pa.Array, cfg: TagConfig, out: Path) -> dict[str, Any]:
    """The input's rows with every tag present under tags/ whose `row_key` matches its row, written as
    train-NNNNN.parquet shards aligned with the input's (a tag column replaces an input column of its name)."""
    tags, sources, failures = {}, {}, {}
    for tag_dir in sorted((out / "tags").iterdir()):
        if tag_dir.name not in TAGGERS or not any(tag_dir.glob("part-*.parquet")):
            continue
        table = aligned_tags(tag_dir, keys)
        tagged = table.column("__tagged__")
        failed_column = f"{tag_dir.name}_failed"
        failures[tag_dir.name] = {
            "failed": pc.sum(pc.fill_null(table.column(failed_column), False)).as_py() or 0,
            "untagged": len(keys) - (pc.sum(tagged).as_py() or 0),
        }
        sources[tag_dir.name] = TAGGERS[tag_dir.name].source(cfg)
        tags[tag_dir.name] = table.drop_columns(["__tagged__"])
    for old in out.glob("train-*.parquet"):
        old.unlink()
    columns: list[str] = []
    for k, (start, length) in enumerate(shard_bounds(ds, cfg.input)):
        block = table_block(ds, start, length)
        for name, table in tags.items():
            for c in table.column_names:
                if c in block.column_names:
                    block = block.drop_columns([c])
                column = table.column(c).slice(start, length)
                block = block.append_column(
                    pa.field(c, column.type, metadata={"source": sources[name]}), column
                )
        write_parquet(out / f"train-{k:05d}.parquet", block)
        columns = block.column_names
    return {"rows": len(keys), "columns": columns, "sources": sources, "failures": failures}


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("tag", argv, TagConfig)
    summary = run(cfg)
    print(
        json.dumps(
            {k: summary[k] for k in ("rows", "failures", "seconds_per_tagger", "wall_seconds")}, indent=2
        )
    )


if __name__ == "__main__":
    main()

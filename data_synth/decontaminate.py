"""Flag training rows that overlap an evaluation prompt: long n-gram overlap (Tulu 3's rule) and near-exact matches by
sentence embedding.

    python -m data_synth.decontaminate recipe=paper_benchmarks input=runs/magpie_pro_tagged \
        output_dir=runs/magpie_pro_decontaminated

The evaluation prompts are the ones `eval.generate` answers, read by its loader (`core.questions`): the Hub by
default, or a local file per benchmark (`questions: {alpaca_eval: path}`). Every user turn of every training row is
compared with every turn of every benchmark question. For each benchmark the input rows get four columns:

    contaminated_<bench>         true when the row overlaps a prompt of <bench> by either rule
    contamination_ngram_<bench>  the largest share of a prompt's tokens covered by n-grams the row shares with it
    contamination_embed_<bench>  the largest cosine similarity between a user turn and a prompt (with an embedder)
    contamination_match_<bench>  the prompt that flagged the row (question id, `#turn` for multi-turn questions)

No row is dropped or moved: `python -m data_synth.select drop_contaminated=true` drops the flagged ones (counted in
its manifest), and `data_synth.report` puts the rate per benchmark in the data card. The rate per benchmark and the
number of benchmark questions hit are in `manifest.json`. One pass over the rows: the benchmark n-grams are hashed
once, the rows streamed in batches; embeddings are searched in a FAISS inner-product index of the benchmark prompts.
Output shards match the input's and carry a digest of what they were computed from, so a killed or repeated run
redoes only shards whose rows or settings changed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from core.chat import CONVERSATION_COLUMNS, to_messages
from core.config import ConfigError, cli, load_config, resolved
from core.data import open_dataset, shard_bounds, table_block
from core.embed import encode, encoder
from core.io import atomic_write_json, digest, parquet_schema, read_parquet, write_parquet
from core.questions import HUB_QUESTIONS, Bench, load_questions
from core.rundir import prepare_output_dir
from core.shards import chunk_meta, drop_chunk

FLAG = "contaminated_"  # the flag columns' prefix: what `select drop_contaminated=true` and the report read


@dataclass
class DecontaminateConfig:
    input: str = "runs/demo/tagged"
    output_dir: str = "runs/demo/decontaminated"
    benchmarks: list[Bench] = field(
        default_factory=lambda: ["alpaca_eval", "arena_hard", "arena_hard_v2", "mt_bench"]
    )
    # a local questions file per benchmark (as eval.generate's `questions`); the others are read from the Hub
    questions: dict[str, str] = field(default_factory=dict)
    turns: Literal["all", "first"] = "all"  # which user turns of a training row are compared
    # n-gram overlap (Tulu 3): flag a row when more than `ngram_threshold` of a prompt's tokens lie in n-grams it
    # shares with one user turn. GPT-3's rule (any 13-gram in common) is ngram_size=13 ngram_threshold=0.
    ngram_size: int = 8
    ngram_threshold: float = 0.5
    # near-exact matches: flag a row when a user turn's embedding has cosine > embed_threshold with a prompt's;
    # null turns the embedding check off (n-grams only)
    embedder: str | None = "embedded-embedder"  # all-MiniLM-L6-v2
    embed_threshold: float = 0.95
    embed_max_tokens: int | None = None  # truncate texts to this many word pieces (null: the model's 256)
    # bfloat16: autocast, 1.7x on CPUs with AVX512-BF16 (and on GPUs), cosines within 0.003 of float32's
    # (benchmarks/decontaminate_scale.py --embed-dtypes float32,bfloat16 compares both in one run)
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    embed_batch_size: int = 64  # texts per forward pass (sorted by length, so little padding)
    batch_size: int = 10_000  # rows read, tokenized and embedded at a time
    rows_per_shard: int = 100_000  # output shard size for an input that is not Parquet shards (else: its own)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError(f"benchmarks: name at least one of {list(HUB_QUESTIONS)}")
        repeated = sorted({b for b in self.benchmarks if self.benchmarks.count(b) > 1})
        if repeated:
            raise ValueError(f"benchmarks: {repeated} named twice")
        stray = sorted(set(self.questions) - set(self.benchmarks))
        if stray:
            raise ValueError(
                f"questions: {stray} not in benchmarks {list(self.benchmarks)}; add them there or remove the file"
            )


# Tokens for n-grams: lowercase words, split on whitespace and , . ? ! : ; ( ) " - \ (the characters dropped).
# This is open-instruct's Elasticsearch analyzer for decontamination (decontamination/index.py, `tulu_analyzer`:
# pattern `[ ,.?!:;()"-]|\n|\\`, lowercase), with every whitespace character where it has space and newline. Text
# without spaces (Chinese, Japanese) becomes few long tokens: such prompts are caught by the embedding check only.
TOKEN = re.compile(r'[^\s,.?!:;()"\-\\]+')


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


_MULT = np.uint64(0x9E3779B97F4A7C15)


def window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every window of `n` consecutive token ids (wrapping arithmetic): a filter only, every hit is
    checked against the n-gram itself."""
    x = ids.astype(np.uint64) + np.uint64(1)
    m = len(x) - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    for j in range(n):
        h = h * _MULT + x[j : j + m]
    return h


@dataclass
class Prompt:
    bench: str
    name: str  # the question id, with `#turn` for a question of several turns
    question: str
    text: str


class NgramIndex:
    """Every n-gram of the benchmark prompts, hashed once: a training turn is scored in one pass over its tokens.

    The rule is open-instruct's `ngram_match` (decontamination/search.py, allenai/open-instruct@e6c3044), as the
    Tulu 3 report uses it (n = 8, a test instance overlaps a training instance when more than 50% of its tokens match):
    each user turn of a training row is a document (index.py indexes user messages one by one); a prompt token is
    matched by a document when it lies in an n-gram of the prompt that occurs in the document; the score of (prompt,
    document) is matched tokens / prompt tokens; a training row's score is its largest over documents and prompts,
    and it is flagged when the score is above the threshold (`score > match_threshold`). As there, a prompt's
    n-grams are a mapping from n-gram to its tokens, so an n-gram repeated in a prompt counts at its last place
    only, and a prompt shorter than n tokens has no n-gram (it is caught by the embedding check only). Unlike there,
    the search is exhaustive (Elasticsearch returned at most `search_size` documents per n-gram) and the prompt is
    tokenized as the documents are (`tokens`; spaCy there)."""

    def __init__(self, prompts: list[Prompt], n: int):
        self.n = n
        self.vocab: dict[str, int] = {}
        self.table: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # n-gram -> (prompt, start) of each
        self.lengths = np.zeros(len(prompts), dtype=np.int64)
        for p, prompt in enumerate(prompts):
            ids = [self.vocab.setdefault(t, len(self.vocab)) for t in tokens(prompt.text)]
            self.lengths[p] = len(ids)
            # each n-gram at its last place in the prompt
            last = {tuple(ids[i : i + n]): i for i in range(len(ids) - n + 1)}
            for gram, start in last.items():
                self.table.setdefault(gram, []).append((p, start))
        grams = np.array(list(self.table), dtype=np.int64).reshape(-1, n).astype(np.uint64) + np.uint64(1)
        hashes = np.zeros(len(grams), dtype=np.uint64)
        for j in range(n):  # window_hashes, one n-gram per row
            hashes = hashes * _MULT + grams[:, j]
        self.hashes = np.unique(hashes)

    def scores(self, docs: list[list[str]]) -> dict[tuple[int, int], float]:
        """(document, prompt) -> share of the prompt's tokens matched, for the pairs that share an n-gram."""
        n = self.n
        get = self.vocab.get
        ids = np.fromiter((get(t, -1) for d in docs for t in d), dtype=np.int64)
        if len(ids) < n or not len(self.hashes):
            return {}
        doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
        h = window_hashes(ids, n)
        m = len(h)
        unknown = np.concatenate([[0], np.cumsum(ids < 0)])  # a token no prompt has: no n-gram holds it
        valid = (doc_of[:m] == doc_of[n - 1 :]) & (unknown[n:] == unknown[:m])
        where = np.flatnonzero(valid)
        k = np.minimum(np.searchsorted(self.hashes, h[where]), len(self.hashes) - 1)
        covered: dict[tuple[int, int], set[int]] = {}
        for i in where[self.hashes[k] == h[where]].tolist():
            for p, start in self.table.get(tuple(ids[i : i + n].tolist()), ()):
                covered.setdefault((int(doc_of[i]), p), set()).update(range(start, start + n))
        return {key: len(c) / self.lengths[key[1]] for key, c in covered.items()}


class Embedder:
    """Normalized sentence embeddings of the benchmark prompts in a FAISS inner-product index per benchmark; a
    training turn's nearest prompt is its largest cosine."""

    def __init__(self, cfg: DecontaminateConfig, prompts: list[Prompt]):
        import faiss

        self.cfg = cfg
        self.model = encoder(cfg.embedder)
        if cfg.embed_max_tokens:
            self.model.max_seq_length = cfg.embed_max_tokens
        emb = self.encode([p.text for p in prompts])
        self.index: dict[str, tuple[Any, np.ndarray]] = {}
        for bench in cfg.benchmarks:
            mine = np.array([i for i, p in enumerate(prompts) if p.bench == bench], dtype=np.int64)
            index = faiss.IndexFlatIP(emb.shape[1])
            index.add(emb[mine])
            self.index[bench] = (index, mine)

    def encode(self, texts: list[str]) -> np.ndarray:
        return encode(self.model, texts, self.cfg.embed_batch_size, self.cfg.embed_dtype)

    def nearest(self, texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """bench -> (cosine with the nearest prompt, that prompt's number) of every text."""
        emb = self.encode(texts)
        out = {}
        for bench, (index, mine) in self.index.items():
            sims, ids = index.search(emb, 1)
            out[bench] = (sims[:, 0], mine[ids[:, 0]])
        return out


def load_prompts(cfg: DecontaminateConfig) -> tuple[list[Prompt], dict[str, dict[str, Any]]]:
    """Every turn of every question of each benchmark, read by eval.generate's loader; and what was read."""
    prompts, read = [], {}
    for bench in cfg.benchmarks:
        source = cfg.questions.get(bench)
        try:
            questions = load_questions(bench, source)
        except ConfigError as e:
            raise ConfigError(f"{f'questions.{bench}' if source else bench}: {e}") from None
        for q in questions:
            several = len(q["turns"]) > 1
            prompts += [
                Prompt(bench, f"{q['id']}#{t + 1}" if several else q["id"], q["id"], text)
                for t, text in enumerate(q["turns"])
            ]
        read[bench] = {
            "source": source or HUB_QUESTIONS[bench],
            "questions": len(questions),
            "prompts": sum(len(q["turns"]) for q in questions),
        }
    return prompts, read


TYPES = {"flag": pa.bool_(), "ngram": pa.float64(), "embed": pa.float64(), "match": pa.string()}


def columns_of(bench: str) -> dict[str, str]:
    return {
        "flag": f"{FLAG}{bench}",
        "ngram": f"contamination_ngram_{bench}",
        "embed": f"contamination_embed_{bench}",
        "match": f"contamination_match_{bench}",
    }


def user_turns(
    rows: list[dict[str, Any]], first: int, where: str, only_first: bool
) -> tuple[list[str], list[int]]:
    """The user turns of `rows` (the first only, or all) and the row of each; a row with no conversation fails,
    naming it."""
    texts, row_of = [], []
    for r, row in enumerate(rows):
        users = [m["content"] for m in to_messages(row, f"{where}: row {first + r}") if m["role"] == "user"]
        users = users[:1] if only_first else users
        if not all(isinstance(u, str) for u in users):
            raise ConfigError(f"{where}: row {first + r}: a user turn's content is not text")
        texts += users
        row_of += [r] * len(users)
    return texts, row_of


def score_rows(
    rows: list[dict[str, Any]],
    first: int,
    cfg: DecontaminateConfig,
    prompts: list[Prompt],
    ngrams: NgramIndex,
    embedder: Embedder | None,
) -> dict[str, list]:
    """The contamination columns of a batch of rows (`first`: the first one's number in the input)."""
    texts, row_of = user_turns(rows, first, cfg.input, cfg.turns == "first")
    n = len(rows)
    bench_no = {b: i for i, b in enumerate(cfg.benchmarks)}
    best = np.zeros((len(cfg.benchmarks), n))
    best_prompt = np.full((len(cfg.benchmarks), n), -1, dtype=np.int64)
    for (doc, p), score in sorted(ngrams.scores([tokens(t) for t in texts]).items()):
        b, r = bench_no[prompts[p].bench], row_of[doc]
        if score > best[b, r]:  # ties: the earlier turn, then the earlier prompt
            best[b, r], best_prompt[b, r] = score, p
    near = embedder.nearest(texts) if embedder is not None and texts else {}
    rows_of = np.asarray(row_of, dtype=np.int64)
    out: dict[str, list] = {}
    for bench, b in bench_no.items():
        col = columns_of(bench)
        by_ngram = best[b] > cfg.ngram_threshold
        flagged, match = by_ngram.copy(), [prompts[p].name if p >= 0 else None for p in best_prompt[b]]
        if embedder is not None:
            cosine = np.full(n, -np.inf)
            nearest = np.full(n, -1, dtype=np.int64)
            if bench in near:
                sims, ids = near[bench]
                np.maximum.at(cosine, rows_of, sims)
                top = np.flatnonzero(sims >= cosine[rows_of])[::-1]  # the earliest turn at its row's maximum
                nearest[rows_of[top]] = ids[top]
            by_embed = cosine > cfg.embed_threshold
            for r in np.flatnonzero(by_embed & ~by_ngram):
                match[r] = prompts[nearest[r]].name
            flagged |= by_embed
            out[col["embed"]] = [float(c) if np.isfinite(c) else None for c in cosine]
        out[col["flag"]] = flagged.tolist()
        out[col["ngram"]] = best[b].tolist()
        out[col["match"]] = [m if f else None for m, f in zip(match, flagged, strict=True)]
    return out


def rule(cfg: DecontaminateConfig, bench: str) -> str:
    text = (
        f"{cfg.ngram_size}-grams shared with a prompt of {bench} cover > {cfg.ngram_threshold:g} of its tokens "
        "(Tulu 3 / open-instruct decontamination)"
    )
    if cfg.embedder:
        under = " (bfloat16 autocast)" if cfg.embed_dtype == "bfloat16" else ""
        text += f", or {cfg.embedder}{under} cosine with it > {cfg.embed_threshold:g}"
    return text


# Settings that do not change the columns (the benchmark prompts enter the key by content, not by file name)
SETTINGS_NOT_IN_KEY = (
    "input",
    "output_dir",
    "questions",
    "overwrite",
    "batch_size",
    "embed_batch_size",
    "rows_per_shard",
)


def shard_key(block: pa.Table, conversation: list[str], settings: str) -> str:
    """What a shard's columns are computed from: the settings and benchmark prompts, and its rows' conversations."""
    h = hashlib.sha1(settings.encode())
    for batch in block.select(conversation).to_batches(max_chunksize=10_000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        h.update(sink.getvalue())
    return h.hexdigest()[:16]


def run(cfg: DecontaminateConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.decontaminate",
        inputs=(cfg.input, *cfg.questions.values(), cfg.embedder),
        overwrite=cfg.overwrite,
    )
    start_time = time.time()
    ds = open_dataset(cfg.input)  # Arrow, memory-mapped: never the whole set as Python objects
    conversation = [c for c in CONVERSATION_COLUMNS if c in ds.column_names]
    if not conversation:
        raise ConfigError(
            f"{cfg.input}: no conversation column (expected one of {', '.join(CONVERSATION_COLUMNS)}; "
            f"columns: {', '.join(ds.column_names)})"
        )
    prompts, read = load_prompts(cfg)
    ngrams = NgramIndex(prompts, cfg.ngram_size)
    settings = json.dumps(
        [
            "decontaminate/1",
            {k: v for k, v in resolved(cfg).items() if k not in SETTINGS_NOT_IN_KEY},
            digest(f"{p.bench}\x00{p.name}\x00{p.text}" for p in prompts),
        ],
        sort_keys=True,
    )
    embedder: Embedder | None = None
    bounds = shard_bounds(ds, cfg.input, cfg.rows_per_shard)
    bar = tqdm(total=len(ds), desc="decontaminate", unit="row")
    for k, (start, length) in enumerate(bounds):
        block = table_block(ds, start, length)
        key = shard_key(block, conversation, settings)
        # done by an earlier run, from the same rows and settings
        if (chunk_meta(out, k) or {}).get("key") == key:
            bar.update(length)
            continue
        if cfg.embedder and embedder is None:
            embedder = Embedder(cfg, prompts)
        parts: dict[str, list] = {}
        for first in range(0, length, cfg.batch_size):
            rows = block.slice(first, cfg.batch_size).select(conversation).to_pylist()
            for name, values in score_rows(rows, start + first, cfg, prompts, ngrams, embedder).items():
                parts.setdefault(name, []).extend(values)
            bar.update(len(rows))
        for bench in cfg.benchmarks:
            for kind, name in columns_of(bench).items():
                if name not in parts:
                    continue
                if name in block.column_names:  # a re-run over its own output: the new column replaces it
                    block = block.drop_columns([name])
                column = pa.array(parts[name], TYPES[kind])
                block = block.append_column(
                    pa.field(name, column.type, metadata={"source": rule(cfg, bench)}), column
                )
        # the input's schema metadata kept (as data_synth.tag's merge keeps it), with what `chunk_meta` reads
        meta = {**(block.schema.metadata or {}), b"chunk": json.dumps({"key": key, "start": start}).encode()}
        write_parquet(out / f"train-{k:05d}.parquet", block.replace_schema_metadata(meta))
    bar.close()
    written = {int(f.stem.rsplit("-", 1)[1]) for f in out.glob("train-*.parquet")}
    for k in sorted(written - set(range(len(bounds)))):  # shards of an earlier, longer input
        drop_chunk(out, k)
    summary = {
        "rows": len(ds),
        **tally(out, cfg, len(bounds), read, len(ds), prompts),
        "rule": {b: rule(cfg, b) for b in cfg.benchmarks},
        "wall_seconds": round(time.time() - start_time, 2),
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


def tally(
    out: Path, cfg: DecontaminateConfig, shards: int, read: dict[str, dict], rows: int, prompts: list[Prompt]
) -> dict[str, Any]:
    """The contamination rate per benchmark, read back from the shards written (so a resumed run counts them all)."""
    question_of = {(p.bench, p.name): p.question for p in prompts}
    flagged = 0  # by any benchmark
    stats = {b: {**read[b], "flagged_rows": 0, "by_ngram": 0, "by_embedding": 0, "hit": set()} for b in read}
    for k in range(shards):
        names = [n for b in cfg.benchmarks for n in columns_of(b).values()]
        shard = out / f"train-{k:05d}.parquet"
        table = read_parquet(shard, columns=[n for n in names if n in parquet_schema(shard).names])
        flags = np.zeros(table.num_rows, dtype=bool)
        for bench in cfg.benchmarks:
            col, s = columns_of(bench), stats[bench]
            flag = table.column(col["flag"]).to_numpy(zero_copy_only=False)
            flags |= flag
            s["flagged_rows"] += int(flag.sum())
            s["by_ngram"] += int(
                pc.sum(pc.greater(table.column(col["ngram"]), cfg.ngram_threshold)).as_py() or 0
            )
            if cfg.embedder:
                s["by_embedding"] += int(
                    pc.sum(pc.greater(table.column(col["embed"]), cfg.embed_threshold)).as_py() or 0
                )
            s["hit"].update(
                question_of.get((bench, m), m) for m in table.column(col["match"]).drop_null().to_pylist()
            )
        flagged += int(flags.sum())
    per_bench = {}
    for bench, s in stats.items():
        hit = s.pop("hit")
        per_bench[bench] = {
            **s,
            "contamination_rate": round(s["flagged_rows"] / rows, 6),
            "questions_hit": len(hit),
            "questions_hit_share": round(len(hit) / s["questions"], 4) if s["questions"] else 0.0,
        }
        if not cfg.embedder:
            per_bench[bench].pop("by_embedding")
    return {
        "flagged_rows": flagged,
        "contamination_rate": round(flagged / rows, 6),
        "benchmarks": per_bench,
    }


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("decontaminate", argv, DecontaminateConfig)
    summary = run(cfg)
    width = max(len(b) for b in summary["benchmarks"])
    for bench, s in summary["benchmarks"].items():
        print(
            f"{bench:<{width}}  flagged {s['flagged_rows']:>9,} rows ({s['contamination_rate']:.3%})  "
            f"questions hit {s['questions_hit']:>4} of {s['questions']}"
        )
    print(
        json.dumps(
            {
                "rows": summary["rows"],
                "flagged_rows": summary["flagged_rows"],
                "contamination_rate": summary["contamination_rate"],
                "output_dir": cfg.output_dir,
            }
        )
    )


if __name__ == "__main__":
    main()

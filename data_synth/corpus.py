"""Unlabelled text for instruction backtranslation (Humpback): documents -> self-contained passages, deduplicated.

    python -m data_synth.corpus source=pydoc output_dir=runs/corpus               # the embedded demo corpus
    python -m data_synth.corpus source=DIR_OR_FILE_OR_HUB_ID text_column=text output_dir=runs/corpus

`source` is `pydoc` (the English documentation that ships inside Python: the standard library's
`pydoc_data.topics`, 79 topics, ~465 KB), a directory of `.txt` files (one document each), a JSONL/Parquet
file or directory with a text column, or a Hub data set id. Each document is cut at its headings into sections
(the paper segments web pages at their HTML headers), and each section's paragraphs are packed into passages of
`min_chars`..`max_chars`. Passages that are too short or too long, mostly non-letters (tables, code), or an exact
duplicate (after case and whitespace folding) of an earlier one are dropped and counted by reason in
`manifest.json`. Output: `train-NNNNN.parquet` with `text`, `title`, `doc_id`, `doc_index`, `segment_index`.

Documents are processed in chunks, one shard each, in order; a killed run keeps its finished shards and resumes
after them (each chunk's drop counts travel with its shard, so the manifest stays exact). Each chunk also records a
digest of its documents: when the source changed under the same path, the chunks from the first changed one on are
redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from core.config import ConfigError, cli, load_config, resolved
from core.data import iter_rows, open_dataset
from core.io import atomic_write_json, digest, read_parquet
from core.rundir import prepare_output_dir
from core.shards import chunk_meta, write_chunk

EMBEDDED = "pydoc"
SCHEMA = pa.schema(
    [
        ("text", pa.large_string()),
        ("title", pa.string()),
        ("doc_id", pa.string()),
        ("doc_index", pa.int64()),
        ("segment_index", pa.int64()),
    ]
)
REASONS = ("boilerplate_heading", "too_short", "too_long", "low_letters", "duplicate")
# The paper drops segments under headers that are mostly capitals or navigation text (its appendix names these)
NAVIGATION = (
    "advertisement",
    "forum",
    "quick link",
    "free newsletter",
    "navigation",
    "menu",
    "cookie",
    "sign up",
)


@dataclass
class CorpusConfig:
    source: str = EMBEDDED
    text_column: str = "text"
    title_column: str | None = None  # a column naming each document (its URL or title); default: its index
    split: str = "train"
    # The paper's later version (appendix E) keeps segments of 600-3,000 characters; its first gives no numbers
    min_chars: int = 600
    max_chars: int = 3000  # longer paragraphs are dropped, never cut mid-paragraph
    # letters and spaces over all characters: drops tables, code and markup dumps
    min_letter_share: float = 0.6
    dedup: bool = True
    max_passages: int | None = None  # stop after this many passages (in document order)
    docs_per_shard: int = 10_000  # the resumable unit
    output_dir: str = "runs/corpus"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars/max_chars: need min_chars <= max_chars, got {self.min_chars}/{self.max_chars}"
            )


# A heading: a line underlined with = - * ~ ^ (reStructuredText, Markdown setext), or a Markdown "# " line
UNDERLINE = re.compile(r"^\s*([=\-*~^#])\1{2,}\s*$")
ATX = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(heading, paragraphs) for each headed section of a document; text before the first heading has none."""
    lines = text.replace("\r\n", "\n").split("\n")
    heading, paragraphs, current = "", [], []

    def close() -> None:
        if current:
            paragraphs.append("\n".join(current).strip())
            current.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        underlined = i + 1 < len(lines) and line.strip() and UNDERLINE.match(lines[i + 1])
        atx = ATX.match(line)
        if underlined or atx:
            close()
            if paragraphs:
                yield heading, paragraphs
            heading, paragraphs = (line.strip() if underlined else atx.group(1)), []
            i += 2 if underlined else 1
            continue
        if UNDERLINE.match(line):  # an overline, or a rule between paragraphs
            close()
        elif line.strip():
            current.append(line.rstrip())
        else:
            close()
        i += 1
    close()
    if paragraphs:
        yield heading, paragraphs


def passages(paragraphs: list[str], min_chars: int, max_chars: int, drops: Counter) -> Iterator[str]:
    """Consecutive paragraphs packed up to `max_chars`; a pack under `min_chars` and a lone paragraph over
    `max_chars` are counted in `drops`, never cut mid-paragraph."""
    pack: list[str] = []
    size = 0
    for p in paragraphs:
        if len(p) > max_chars:
            drops["too_long"] += 1
            continue
        if pack and size + 2 + len(p) > max_chars:
            if size >= min_chars:
                yield "\n\n".join(pack)
            else:
                drops["too_short"] += 1
            pack, size = [], 0
        pack.append(p)
        size += len(p) + (2 if size else 0)
    if pack:
        if size >= min_chars:
            yield "\n\n".join(pack)
        else:
            drops["too_short"] += 1


def boilerplate(heading: str) -> bool:
    """A heading in capitals (over 60% of its letters) or naming navigation, ads, forums or newsletters."""
    letters = [c for c in heading if c.isalpha()]
    capitals = len(letters) > 3 and sum(c.isupper() for c in letters) / len(letters) > 0.6
    return capitals or any(word in heading.lower() for word in NAVIGATION)


def letter_share(text: str) -> float:
    return sum(c.isalpha() or c.isspace() for c in text) / max(1, len(text))


def fingerprint(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).digest()


def _text_files(files: list[Path]) -> Iterator[tuple[str, str]]:
    for f in files:
        try:
            yield f.name, f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f}: not UTF-8 text (byte {e.start})") from None


def _rows(ds: Any, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    n = 0
    for batch in iter_rows(ds.select_columns([c for c in (cfg.text_column, cfg.title_column) if c])):
        for row in batch:
            text = row[cfg.text_column]
            if not isinstance(text, str):
                raise ConfigError(
                    f"{cfg.source}: row {n}: '{cfg.text_column}' is {type(text).__name__}, expected text"
                )
            yield str(row[cfg.title_column]) if cfg.title_column else str(n), text
            n += 1


def documents(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of the source, streamed; a missing source or column fails here, at once."""
    if cfg.source == EMBEDDED:
        from pydoc_data.topics import topics

        return iter(sorted(topics.items()))
    path = Path(cfg.source)
    if path.is_dir() and not any(path.glob(f"*.{x}") for x in ("txt", "parquet", "jsonl", "json")):
        raise ConfigError(f"{path}: no .txt, .parquet, .jsonl or .json files in this directory")
    if path.is_dir() and sorted(path.glob("*.txt")):
        return _text_files(sorted(path.glob("*.txt")))
    if path.is_file() and path.suffix == ".txt":
        return _text_files([path])
    ds = open_dataset(cfg.source, cfg.split)
    for column in (cfg.text_column, cfg.title_column):
        if column and column not in ds.column_names:
            raise ConfigError(
                f"{cfg.source}: no column '{column}' (columns: {', '.join(ds.column_names)}); "
                "set text_column= (and title_column=)"
            )
    return _rows(ds, cfg)


def segment(
    doc_index: int, doc_id: str, text: str, cfg: CorpusConfig, seen: set[bytes], drops: Counter
) -> list[dict]:
    """The passages of one document that pass every rule, in order."""
    rows = []
    for heading, paragraphs in sections(text):
        if boilerplate(heading):
            drops["boilerplate_heading"] += len(paragraphs)
            continue
        for passage in passages(paragraphs, cfg.min_chars, cfg.max_chars, drops):
            if letter_share(passage) < cfg.min_letter_share:
                drops["low_letters"] += 1
                continue
            key = fingerprint(passage)
            if cfg.dedup and key in seen:
                drops["duplicate"] += 1
                continue
            seen.add(key)
            rows.append(
                {
                    "text": passage,
                    "title": heading,
                    "doc_id": doc_id,
                    "doc_index": doc_index,
                    "segment_index": len(rows),
                }
            )
    return rows


def documents_digest(docs: Iterable[tuple[str, str]]) -> str:
    return digest(f"{doc_id}\x00{text}" for doc_id, text in docs)


def finished_prefix(cfg: CorpusConfig, out: Path) -> int:
    """How many finished chunks (a prefix, written in order) still match the documents they were made from. A chunk
    records a digest of its documents, so one whose documents changed under the same source, and every chunk after
    it (or after a gap), is ours to redo: removed here, never kept."""
    keep, docs = 0, documents(cfg)
    while (meta := chunk_meta(out, keep)) is not None:
        if meta.get("digest") != documents_digest(itertools.islice(docs, meta["documents"])):
            break
        keep += 1
    for later in [*out.glob("train-*.parquet"), *out.glob("_empty-*.json")]:
        if int(later.stem.rsplit("-", 1)[1]) >= keep:
            later.unlink()
    return keep


def run(cfg: CorpusConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.corpus",
        inputs=(cfg.source,),
        may_differ=("docs_per_shard",),
        overwrite=cfg.overwrite,
    )
    seen: set[bytes] = set()
    totals: Counter = Counter()
    start_chunk = finished_prefix(cfg, out)  # resume: finished chunks keep their counts and passages
    for k in range(start_chunk):
        totals.update({key: v for key, v in chunk_meta(out, k).items() if key != "digest"})
        shard = out / f"train-{k:05d}.parquet"
        if shard.is_file():
            seen.update(
                fingerprint(t) for t in read_parquet(shard, columns=["text"]).column("text").to_pylist()
            )
    done_documents = totals["documents"]  # what finished chunks read, whatever docs_per_shard was then
    chunk: list[tuple[int, str, str]] = []
    docs = documents(cfg)
    bar = tqdm(desc="segment", unit="doc")

    def flush(k: int) -> None:
        drops: Counter = Counter()
        rows = [r for i, d, t in chunk for r in segment(i, d, t, cfg, seen, drops)]
        if cfg.max_passages is not None:
            rows = rows[: max(0, cfg.max_passages - totals["passages"])]
        counts = {"documents": len(chunk), "passages": len(rows), **{r: drops[r] for r in REASONS}}
        meta = {**counts, "digest": documents_digest((d, t) for _, d, t in chunk)}
        write_chunk(out, k, pa.Table.from_pylist(rows, schema=SCHEMA), meta)
        totals.update(counts)
        bar.update(len(chunk))
        chunk.clear()

    k = start_chunk
    for doc_index, (doc_id, text) in enumerate(docs):
        if doc_index < done_documents:
            continue
        if cfg.max_passages is not None and totals["passages"] >= cfg.max_passages:
            break
        chunk.append((doc_index, doc_id, text))
        if len(chunk) == cfg.docs_per_shard:
            flush(k)
            k += 1
    if chunk:
        flush(k)
    bar.close()
    if totals["passages"] == 0:
        raise ConfigError(
            f"{cfg.source}: no passage of {cfg.min_chars}-{cfg.max_chars} characters in "
            f"{totals['documents']} documents (drops: {dict((r, totals[r]) for r in REASONS)})"
        )
    summary = {
        "source": cfg.source,
        "documents": totals["documents"],
        "passages": totals["passages"],
        "dropped": {r: totals[r] for r in REASONS},
        "min_chars": cfg.min_chars,
        "max_chars": cfg.max_chars,
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("corpus", argv, CorpusConfig)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()

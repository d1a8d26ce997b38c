"""The one LLM judge: tag labels and scores, pair scoring, AlpacaEval, Arena-Hard and pairwise verdicts.

A persistent cache, retries for unparsable replies, failure accounting, a prefilled reply start and stop strings.

The cache (SQLite, one file) is keyed by the judge's name, the exact prompt and the sampling settings, so
re-running a finished evaluation makes zero judge calls, and a judge that already saw a (question, answer,
baseline) triple in another run is not asked again when runs share the file. A reply the parser cannot read
is asked again (`retries` times) at a small temperature with a new seed; whatever still fails is returned as a
failure with its reason, for the report to count, never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import ConfigError
from core.engines import (
    Completion,
    EngineConfig,
    EngineError,
    Sampling,
    load_tokenizer,
    make_engine,
    prompt_seed,
)

T = TypeVar("T")


@dataclass
class JudgeConfig:
    """The judge of a pairwise benchmark: any engine, with its own sampling and a cache."""

    model: str = "embedded"  # local path, Hub id, `embedded`, or the server's model name (openai backend)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_tokens: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: int | None = 20  # top logprobs of the first token, for weighted (probability) verdicts
    retries: int = 2  # extra attempts for a reply with no verdict (at retry_temperature, new seed each)
    retry_temperature: float = 0.7
    cache: str | None = None  # SQLite file; default <output_dir>/judge_cache.sqlite
    chunk_size: int = (
        1024  # prompts per engine call and cache commit (a resume unit; the engine batches itself)
    )
    # Text that starts the judge's reply (e.g. "My final verdict is [[" for small local judges that wander);
    # parsers see it in front of the reply. Empty = the benchmark's protocol.
    prefill: str = ""

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, logprobs=self.logprobs
        )


class JudgeCache:
    """Completions by sha256(judge, prompt, sampling). SQLite: each write is atomic; readers never see half."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, completion TEXT NOT NULL)"
        )
        self.db.commit()

    @staticmethod
    def key(judge: str, prompt: str | list[dict[str, str]], sampling: Sampling) -> str:
        blob = json.dumps([judge, prompt, dataclasses.asdict(sampling)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        row = self.db.execute("SELECT completion FROM judgments WHERE key = ?", (key,)).fetchone()
        return Completion(**json.loads(row[0])) if row else None

    def put_many(self, items: list[tuple[str, Completion]]) -> None:
        with self.db:  # one transaction per chunk
            self.db.executemany(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?)",
                [(k, json.dumps(dataclasses.asdict(c), ensure_ascii=False)) for k, c in items],
            )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]


def label_probabilities(
    c: Completion, labels: Sequence[str], fold_case: bool = False
) -> dict[str, float] | None:
    """The probability of each label among the reply's first-token top logprobs, renormalized over the labels
    (surrounding spaces ignored, as tokenizers spell " A" and "A" apart; `fold_case` also folds "Yes"/"yes").
    None when no label is among the top logprobs. The one helper behind every weighted verdict and score."""
    mass = dict.fromkeys(labels, 0.0)
    for token, logprob in (c.top_logprobs or {}).items():
        word = token.strip().lower() if fold_case else token.strip()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = sum(mass.values())
    return {label: p / total for label, p in mass.items()} if total > 1e-6 else None


def first_token_share(c: Completion, first: str, second: str) -> float | None:
    """P(first) / (P(first) + P(second)): the weighted verdict of AlpacaEval-style judges."""
    p = label_probabilities(c, (first, second))
    return None if p is None else p[first]


def expected_score(c: Completion, low: int, high: int) -> float | None:
    """The probability-weighted integer score in [low, high] (G-Eval style): a continuous value with few ties,
    read even from judges too small to finish a JSON reply."""
    p = label_probabilities(c, [str(v) for v in range(low, high + 1)])
    return None if p is None else sum(int(v) * q for v, q in p.items())


@dataclass
class Verdict(Generic[T]):
    value: T | None  # the parsed verdict; None = failed
    completion: Completion | None  # the reply the verdict came from (the last one tried when it failed)
    attempts: int
    error: str | None = None  # why it failed: "no verdict in the reply" or the engine's error


@dataclass
class JudgeStats:
    calls: int = 0  # completions requested from the engine (cache misses)
    cached: int = 0  # completions served from the cache
    failed: int = 0  # requests with no verdict after every retry

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Judge:
    """Ask one judge many questions: `judge.ask(conversations, parse) -> [Verdict]`; the engine loads lazily."""

    def __init__(self, cfg: JudgeConfig, cache_path: str | Path):
        self.cfg = cfg
        self.cache = JudgeCache(cfg.cache or cache_path)
        self.stats = JudgeStats()
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = make_engine(self.cfg.model, self.cfg.engine)
        return self._engine

    def close(self) -> None:
        self._engine = None
        gc.collect()

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The judge's tokenizer alone: a fully cached run renders prompts without loading any weights."""
        return load_tokenizer(self.cfg.model, self.cfg.engine)

    def prompt(
        self, messages: list[dict[str, str]], prefill: str | None = None
    ) -> str | list[dict[str, str]]:
        """What the engine is sent: rendered text ending in the reply's prefilled start (default: the config's),
        or the messages themselves for a chat API (engine.chat)."""
        prefill = self.cfg.prefill if prefill is None else prefill
        if self.cfg.engine.chat:
            if prefill:
                raise ConfigError(
                    "a prefilled reply (judge.prefill, or a tag's JSON prefill) needs a raw-text engine; a chat "
                    "API writes the reply's start itself"
                )
            return messages
        return render_prompt(self.tokenizer, messages) + prefill

    def ask(
        self,
        conversations: list[list[dict[str, str]]],
        parse: Callable[[Completion], T | None],
        desc: str = "judging",
        *,
        prefill: str | None = None,
        sampling: Sampling | None = None,
        retries: int | None = None,
    ) -> list[Verdict[T]]:
        """One verdict per conversation (chat messages); cached replies are reused, the rest are generated.
        A protocol that fixes its own reply start, sampling or retries (a tag's JSON prefill and stop, a score
        read from one token's probabilities) passes them here; otherwise the config's apply."""
        verdicts: list[Verdict[T] | None] = [None] * len(conversations)
        prefill = self.cfg.prefill if prefill is None else prefill
        # The cache key is the rendered text (or the messages), so a changed chat template is a different prompt.
        prompts = [self.prompt(m, prefill) for m in conversations]
        pending = list(range(len(conversations)))
        base = sampling or self.cfg.sampling()

        def verdict(c: Completion, attempt: int) -> Verdict:
            c = dataclasses.replace(c, text=prefill + c.text) if prefill else c  # parsers see the whole reply
            value = parse(c)
            return Verdict(value, c, attempt + 1, None if value is not None else "no verdict in the reply")

        bar = tqdm(total=len(conversations), desc=desc, unit="q")
        for attempt in range((self.cfg.retries if retries is None else retries) + 1):
            keys, misses, samplings = {}, [], {}
            for i in pending:
                samplings[i] = self._sampling(base, prompts[i], attempt)
                keys[i] = JudgeCache.key(self.cfg.model, prompts[i], samplings[i])
                cached = self.cache.get(keys[i])
                if cached is None:
                    misses.append(i)
                else:
                    self.stats.cached += 1
                    verdicts[i] = verdict(cached, attempt)
            errors = self._generate(misses, prompts, keys, samplings, verdict, verdicts, attempt)
            pending = [i for i in pending if verdicts[i] is None or verdicts[i].value is None]
            for i in pending:
                last = verdicts[i].completion if verdicts[i] else None
                verdicts[i] = Verdict(None, last, attempt + 1, errors.get(i, "no verdict in the reply"))
            bar.update(len(conversations) - len(pending) - bar.n)
            if not pending:
                break
        bar.update(len(conversations) - bar.n)
        bar.close()
        self.stats.failed += len(pending)
        return verdicts  # type: ignore[return-value]

    def _sampling(self, base: Sampling, prompt: str | list, attempt: int) -> Sampling:
        """Attempt 0 is the protocol's sampling, a retry samples at retry_temperature. A sampled request gets a
        seed of its own, derived from the prompt and the attempt: a seed shared by all retries would make a
        serving engine repeat the same failure. Greedy requests carry none (so their cache keys stay put)."""
        s = dataclasses.replace(base, temperature=self.cfg.retry_temperature) if attempt else base
        if s.temperature == 0:
            return s
        return dataclasses.replace(s, seed=prompt_seed(prompt, "judge", attempt))

    def _generate(self, misses, prompts, keys, samplings, verdict, verdicts, attempt) -> dict[int, str]:
        errors: dict[int, str] = {}
        # Chunks are units of caching (a killed run keeps what was judged), not batches: the engine batches.
        chunk = max(1, self.cfg.chunk_size)
        for start in range(0, len(misses), chunk):
            batch = misses[start : start + chunk]
            try:
                outs = self.engine.complete([prompts[i] for i in batch], [samplings[i] for i in batch])
            except EngineError as e:  # the engine already retried; count these as failures, keep going
                errors.update({i: f"engine error: {e}" for i in batch})
                continue
            self.stats.calls += len(batch)
            self.cache.put_many([(keys[i], c) for i, c in zip(batch, outs, strict=True)])
            for i, c in zip(batch, outs, strict=True):
                verdicts[i] = verdict(c, attempt)
        return errors

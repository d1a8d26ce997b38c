"""The one LLM judge: tag labels and scores, pair scoring, AlpacaEval, Arena-Hard and pairwise verdicts.

A persistent cache, retries for unparsable replies, failure accounting, a prefilled reply start and stop strings.

The cache (SQLite, one file) is keyed by the judge's name, the exact prompt and the sampling settings, so
re-running a finished evaluation makes zero judge calls, and a judge that already saw a (question, answer,
baseline) triple in another run is not asked again when runs share the file. A reply the parser cannot read
is asked again (`retries` times) at a small temperature with a new seed; whatever still fails is returned as a
failure with its reason, for the report to count, never dropped: an unreadable reply is a result.

A request the engine never answered (an outage: connection refused, timeout, HTTP 5xx or 429 after the engine's
retries, a wrong key) is not: its verdict is `missing`, callers write nothing for it, and a re-run asks again.
A stage then calls `raise_for_outages`, which fails when more than `max_engine_errors` of its results are missing.
A judge that is down stops the run at once: with the default `max_engine_errors=0`, at the first chunk in which
every request failed (the stage would fail anyway); with a tolerance, after `DOWN_AFTER` failed requests in a row.
"""

from __future__ import annotations

import dataclasses
import functools
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
    Sampling,
    free_memory,
    load_tokenizer,
    make_engine,
    prompt_seed,
)
from core.errors import OutageError

T = TypeVar("T")
# Requests in a row without one answer after which the judge counts as down, whatever max_engine_errors tolerates
DOWN_AFTER = 64


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
    # prompts per engine call and cache commit (a resume unit; the engine batches itself)
    chunk_size: int = 1024
    # Text that starts the judge's reply (e.g. "My final verdict is [[" for small local judges that wander);
    # parsers see it in front of the reply. Empty = the benchmark's protocol.
    prefill: str = ""
    # The share of requests that may go unanswered (engine errors) before the stage fails (exit 3). They are never
    # results either way: a tolerated share is reported as missing, and a re-run asks for it again.
    max_engine_errors: float = 0.0

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
    error: str | None = None  # why it failed: "no verdict in the reply" or "engine error: ..."
    missing: bool = False  # the engine never answered: no result at all (a re-run asks again)


@dataclass
class JudgeStats:
    calls: int = 0  # completions the engine returned (cache misses)
    cached: int = 0  # completions served from the cache
    unparsed: int = 0  # requests whose replies held no verdict after every retry: results, counted as failed
    engine_errors: int = 0  # requests the engine never answered: missing, never results

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Judge:
    """Ask one judge many questions: `judge.ask(conversations, parse) -> [Verdict]`; the engine loads lazily."""

    def __init__(self, cfg: JudgeConfig, cache_path: str | Path):
        self.cfg = cfg
        self.cache = JudgeCache(cfg.cache or cache_path)
        self.stats = JudgeStats()
        self.outage: str | None = None  # the first engine error, for the message that names the cause
        self._failed_in_a_row = 0
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = make_engine(self.cfg.model, self.cfg.engine)
        return self._engine

    def close(self) -> None:
        """Release the judge's engine (a later call loads it again), so another model can load beside it."""
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        free_memory()

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
            self._generate(misses, prompts, keys, samplings, verdict, verdicts, attempt)
            # Only an unreadable reply is asked again; a request the engine never answered stays missing (a retry
            # would change its sampling, and the engine has already retried it).
            pending = [i for i in pending if not verdicts[i].missing and verdicts[i].value is None]
            bar.update(len(conversations) - len(pending) - bar.n)
            if not pending:
                break
        bar.update(len(conversations) - bar.n)
        bar.close()
        self.stats.unparsed += len(pending)
        self.stats.engine_errors += sum(v.missing for v in verdicts)
        return verdicts  # type: ignore[return-value]

    def raise_for_outages(self, missing: int, total: int, what: str) -> None:
        """Fail (OutageError: exit 3, naming the cause) when more than `max_engine_errors` of a stage's `total`
        results (`what`) are `missing` because the engine never answered. Nothing was written for them, so
        re-running the command redoes exactly those."""
        if missing > self.cfg.max_engine_errors * total:
            raise OutageError(
                f"judge {self.cfg.model}: {missing} of {total} {what} have no verdict because the engine failed "
                f"(judge.max_engine_errors={self.cfg.max_engine_errors:g} tolerates a share): {self.outage}"
            )

    def _sampling(self, base: Sampling, prompt: str | list, attempt: int) -> Sampling:
        """Attempt 0 is the protocol's sampling, a retry samples at retry_temperature. A sampled request gets a
        seed of its own, derived from the prompt and the attempt: a seed shared by all retries would make a
        serving engine repeat the same failure. Greedy requests carry none (so their cache keys stay put)."""
        s = dataclasses.replace(base, temperature=self.cfg.retry_temperature) if attempt else base
        if s.temperature == 0:
            return s
        return dataclasses.replace(s, seed=prompt_seed(prompt, "judge", attempt))

    def _generate(self, misses, prompts, keys, samplings, verdict, verdicts, attempt) -> None:
        if not misses:
            return
        # Built here, outside the per-chunk handling: a judge that cannot start (a missing model, an unset API key
        # variable) is the user's error to fix, never a verdict.
        engine = self.engine
        # Chunks are units of caching (a killed run keeps what was judged), not batches: the engine batches.
        for start in range(0, len(misses), self.cfg.chunk_size):
            batch = misses[start : start + self.cfg.chunk_size]
            cause = None
            try:
                outs = engine.complete([prompts[i] for i in batch], [samplings[i] for i in batch])
            except OutageError as e:  # the engine already retried each request; keep what did come back
                outs, cause = e.completions or [None] * len(batch), str(e)
                self.outage = self.outage or cause
            answered = [(i, c) for i, c in zip(batch, outs, strict=True) if c is not None]
            self._failed_in_a_row = 0 if answered else self._failed_in_a_row + len(batch)
            if self._failed_in_a_row and (
                self.cfg.max_engine_errors == 0 or self._failed_in_a_row >= DOWN_AFTER
            ):
                raise OutageError(  # the judge is down: stop now (what was judged is cached)
                    f"judge {self.cfg.model}: the last {self._failed_in_a_row} requests all failed: {cause}"
                )
            self.stats.calls += len(answered)
            self.cache.put_many([(keys[i], c) for i, c in answered])
            for i, c in zip(batch, outs, strict=True):
                verdicts[i] = (
                    verdict(c, attempt)
                    if c is not None
                    else Verdict(None, None, attempt + 1, f"engine error: {cause}", missing=True)
                )

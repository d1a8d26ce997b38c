"""Magpie: sample user instructions from an aligned model's pre-query template, then answer them.

    python -m data_synth.magpie recipe=magpie_demo n_conversations=100 output_dir=runs/magpie_demo

Writes Parquet shards (`messages` plus metadata) into `output_dir`; re-running the same command resumes.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import ConfigError, cli, load_config, resolved
from core.engines import (
    CONTEXT_FULL,
    Completion,
    EngineConfig,
    Sampling,
    load_tokenizer,
    make_engine,
    prefix_session,
    request_seed,
)
from core.io import atomic_write_json
from core.rundir import prepare_output_dir
from core.shards import ShardWriter
from data_synth.templates import PreQuery, pre_query


@dataclass
class GridPoint:
    temperature: float = 1.0
    top_p: float = 1.0
    share: float = 1.0


@dataclass
class InstructionSampling:
    grid: list[GridPoint] = field(default_factory=lambda: [GridPoint()])
    max_tokens: int = 2048
    stop_at_newline: bool = True  # single-line instructions (the paper's default; off for Llama-3.1, Gemma-2)


@dataclass
class ResponseSampling:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 4096
    repetition_penalty: float = 1.0


# Domain steering: a system prompt rendered before the pre-query template (the paper's math prompt verbatim).
SYSTEM_PROMPTS = {
    "math": (
        "You are an AI assistant designed to provide helpful, step-by-step guidance on solving math problems. "
        "The user will ask you a wide range of complex mathematical questions. Your purpose is to assist users in "
        "understanding mathematical concepts, working through equations, and arriving at the correct solutions."
    ),
    "code": (
        "You are an AI assistant specialized in programming. The user will ask you a wide range of coding "
        "questions: writing, explaining, reviewing and debugging code in many languages, algorithms and data "
        "structures, and software design. Your purpose is to give correct, runnable code with clear explanations."
    ),
    "translation": (
        "You are an AI assistant specialized in translation. The user will ask you to translate texts of many "
        "kinds between languages, or to explain the meaning and nuance of words and phrases in other languages. "
        "Your purpose is to give accurate, fluent and natural translations."
    ),
}

MAX_BARREN_ROUNDS = 10

# Magpie-MT: later user turns are sampled after the history rendered with this system prompt.
MT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. The user will engage in a multi-round conversation with you, asking initial "
    "questions and following up with additional related questions. Your goal is to provide thorough, relevant "
    "and insightful responses to help the user with their queries."
)


@dataclass
class MagpieConfig:
    model: str = "embedded"
    engine: EngineConfig = field(default_factory=EngineConfig)
    n_conversations: int = 100
    output_dir: str = "runs/magpie"
    seed: int = 0
    # Steering: a key (math, code, translation, or one of `system_prompts`) or literal text; or a weighted
    # mix of keys in `system_prompt_mix` (shares sum to 1). The key is stored on every row.
    system_prompt: str | None = None
    system_prompt_mix: dict[str, float] = field(default_factory=dict)
    system_prompts: dict[str, str] = field(default_factory=dict)  # your own named prompts
    n_turns: int = 1
    mt_system_prompt: str = MT_SYSTEM_PROMPT
    instruction: InstructionSampling = field(default_factory=InstructionSampling)
    response: ResponseSampling = field(default_factory=ResponseSampling)
    # Conversations per round of engine calls: the unit of progress and of resumption, not a batch size (the
    # engine batches on its own). Thousands on vLLM; keep it when resuming, or later chunks draw other seeds.
    chunk_size: int = 64
    rows_per_shard: int = 1000
    overwrite: bool = False

    def __post_init__(self) -> None:
        shares = sum(p.share for p in self.instruction.grid)
        if not self.instruction.grid or abs(shares - 1.0) > 1e-6:
            raise ValueError(f"instruction.grid shares must sum to 1, got {shares:g}")
        self.steering()  # unknown keys fail here, before any model loads

    def steering(self) -> list[tuple[str, str | None, float]]:
        """(key, system prompt text, share) for each steering choice."""
        known = {**SYSTEM_PROMPTS, **self.system_prompts}

        def lookup(key: str, field_name: str) -> str:
            if key not in known:
                raise ValueError(
                    f"{field_name}: unknown system-prompt key '{key}'; known keys: {', '.join(sorted(known))}"
                )
            return known[key]

        if self.system_prompt_mix:
            total = sum(self.system_prompt_mix.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"system_prompt_mix shares must sum to 1, got {total:g}")
            return [(k, lookup(k, "system_prompt_mix"), w) for k, w in self.system_prompt_mix.items()]
        if self.system_prompt is None:
            return [("none", None, 1.0)]
        if any(c.isspace() for c in self.system_prompt):  # literal text, not a key
            return [("custom", self.system_prompt, 1.0)]
        return [(self.system_prompt, lookup(self.system_prompt, "system_prompt"), 1.0)]


_PREFIXES = re.compile(
    r"^\s*(?:#+\s*)?(?:question|query|instruction|user|input|prompt)\s*[:：]\s*", re.IGNORECASE
)
_ANSWER = re.compile(r"\b(?:answer|response|assistant)\s*:", re.IGNORECASE)


def clean_instruction(c: Completion) -> tuple[str | None, str]:
    """The reference post-processing; returns (instruction or None, reason it was dropped)."""
    if c.finish_reason == "length":
        return None, "truncated"
    text = _PREFIXES.sub("", c.text.strip())
    match = _ANSWER.search(text)
    if match:
        text = text[: match.start()]
    text = text.strip()
    if not text:
        return None, "empty"
    if text.endswith(":"):
        return None, "ends_with_colon"
    return text, ""


def assign(position: float, shares: list[float]) -> int:
    """The bucket whose cumulative share covers `position` in [0, 1)."""
    total = 0.0
    for i, share in enumerate(shares):
        total += share
        if position < total:
            return i
    return len(shares) - 1


def grid_point(index: int, n: int, grid: list[GridPoint]) -> GridPoint:
    """Deterministic assignment of conversation `index` of `n` so each point gets its share exactly."""
    return grid[assign((index + 0.5) / n, [p.share for p in grid])]


def steering_choice(
    index: int, choices: list[tuple[str, str | None, float]]
) -> tuple[str, str | None, float]:
    # A golden-ratio sequence: shares hold closely at any n, and choices are not correlated with grid points.
    return choices[assign((index * 0.6180339887498949) % 1.0, [c[2] for c in choices])]


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


class _Stats:
    def __init__(self) -> None:
        self.duplicates = 0
        self.dropped: dict[str, int] = {}
        self.user_tokens = 0
        self.assistant_tokens = 0
        self.sampled = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def run(cfg: MagpieConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    on_disk = ShardWriter.count(out) if out.is_dir() else 0
    if on_disk > cfg.n_conversations:  # checked before config.yaml is rewritten, so it stays true
        raise ConfigError(
            f"output_dir {out} already holds {on_disk} conversations, more than n_conversations="
            f"{cfg.n_conversations}; pass n_conversations={on_disk} or more to extend it, or read the first "
            f"{cfg.n_conversations} rows of it"
        )
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.magpie",
        inputs=(cfg.model,),
        may_differ=("n_conversations",),
        overwrite=cfg.overwrite,
    )
    tokenizer = load_tokenizer(cfg.model, cfg.engine)
    choices = cfg.steering()
    # Every template is built before any model loads: a model without a usable chat template fails here.
    templates: dict[str, PreQuery] = {key: pre_query(tokenizer, text) for key, text, _ in choices}
    engine = make_engine(cfg.model, cfg.engine)

    writer = ShardWriter(out, rows_per_shard=cfg.rows_per_shard)
    recorded = (
        json.loads((out / "manifest.json").read_text()).get("rows")
        if (out / "manifest.json").is_file()
        else None
    )
    if recorded is not None and recorded != writer.n_rows:  # a shard deleted or added by hand
        print(
            f"note: {out}/manifest.json records {recorded} rows but the shards hold {writer.n_rows}; counting "
            "from the shards, and the manifest is rebuilt from them at the end",
            file=sys.stderr,
        )
    seen = {_normalize(row["messages"][0]["content"]) for row in writer.rows()}  # dedup survives resumes
    stats = _Stats()
    synth = _Synthesizer(cfg, engine, tokenizer, templates, choices, seen, stats)
    start, done_at_start = time.time(), writer.n_rows
    bar = tqdm(total=cfg.n_conversations, initial=writer.n_rows, desc="magpie", unit="conv")
    while writer.n_rows < cfg.n_conversations:
        # A chunk is a run of conversation slots; it always ends with one row per slot, so a resumed run starts
        # at a chunk boundary and continues the same sequence of seeds.
        first = writer.n_rows
        slots = list(range(first, min(first + cfg.chunk_size, cfg.n_conversations)))
        try:
            with prefix_session(engine):  # a chunk's response prompts extend its instruction prompts
                rows = synth.chunk(slots)
        except BaseException:
            writer.flush()  # keep the finished chunks of this run
            raise
        for row in rows:
            stats.user_tokens += row["instruction_tokens"]
            stats.assistant_tokens += row["response_tokens"]
        writer.add(rows)
        bar.update(len(rows))
        elapsed = max(time.time() - start, 1e-9)
        bar.set_postfix(
            conv_s=f"{(writer.n_rows - done_at_start) / elapsed:.2f}",
            tok_s=f"{(stats.user_tokens + stats.assistant_tokens) / elapsed:.1f}",
            dup=stats.duplicates,
        )
    writer.flush()
    bar.close()
    # Counters add up over resumed runs (a killed run's counters since its last finish are not known).
    before = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    dropped = dict(before.get("invalid_dropped", {}))
    for reason, count in stats.dropped.items():
        dropped[reason] = dropped.get(reason, 0) + count
    summary = {
        "rows": writer.n_rows,
        "new_rows_this_run": writer.n_rows - done_at_start,
        "instructions_sampled": before.get("instructions_sampled", 0) + stats.sampled,
        "duplicates_dropped": before.get("duplicates_dropped", 0) + stats.duplicates,
        "invalid_dropped": dropped,
        "instruction_tokens": before.get("instruction_tokens", 0) + stats.user_tokens,
        "response_tokens": before.get("response_tokens", 0) + stats.assistant_tokens,
        "wall_seconds": round(before.get("wall_seconds", 0) + time.time() - start, 2),
        "shards": [s.name for s in writer.shards],
        "generator": cfg.model,
        "pre_query_templates": {k: t.pre_query_template for k, t in templates.items()},
        "stop": list(next(iter(templates.values())).stop),
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


class _Spares:
    """The engine's `Demand` for one round of instruction candidates. A round draws more candidates than its
    groups need (a margin for the ones dropped as invalid or duplicate); the candidates past the expected need
    wait while those before them, still running, may fill their group, and are never run once those certainly
    do. The candidates kept are those an engine that runs every candidate keeps (vLLM, servers), given the same
    texts: a candidate is dropped only when the valid, new, distinct instructions among the finished candidates
    before it fill its group even if every unfinished candidate of another group before it took one of them
    (the same text there would be kept there, not here). The texts themselves can differ from such a run only
    as any change of batch composition changes them: by float rounding in batched matmuls."""

    def __init__(self, groups: list[Any], need: dict[Any, int], keep_rate: float, seen: set[str]):
        self.groups, self.need, self.rate, self.seen = groups, need, keep_rate, seen
        # finished candidate -> its normalized instruction, None if it would be dropped
        self.text: dict[int, str | None] = {}
        self.dropped: set[int] = set()

    def finished(self, index: int, completion: Completion) -> None:
        instruction, _ = clean_instruction(completion)
        text = None if instruction is None else _normalize(instruction)
        self.text[index] = None if text in self.seen else text

    def triage(self, queued: list[int]) -> tuple[list[int], list[int]]:
        waiting = set(queued)
        homes: dict[str, set] = {}  # a text -> the groups of the finished candidates that have it
        for i, text in self.text.items():
            if text is not None:
                homes.setdefault(text, set()).add(self.groups[i])
        # per group, among the finished candidates so far: the distinct texts no other group has
        sure = dict.fromkeys(self.need, 0)
        texts: dict[Any, set[str]] = {g: set() for g in self.need}
        open_ = dict.fromkeys(self.need, 0)  # candidates so far, per group, neither finished nor dropped
        open_all = 0
        start, drop = [], []
        for i, g in enumerate(self.groups):  # candidate order
            if i in waiting:
                kept = sure[g] - (open_all - open_[g])  # at least this many of its group's rows come before i
                if kept >= self.need[g]:
                    drop.append(i)
                    self.dropped.add(i)
                    continue
                if not open_[g] or kept + self.rate * open_[g] < self.need[g]:
                    start.append(i)
            if i in self.text:
                text = self.text[i]
                if text is not None and homes[text] == {g} and text not in texts[g]:
                    texts[g].add(text)
                    sure[g] += 1
            elif i not in self.dropped:
                open_[g] += 1
                open_all += 1
        return start, drop


class _Synthesizer:
    """Fills a chunk of conversation slots with valid, unique conversations. Every request carries its own seed,
    `request_seed(seed, stage, slot, turn, attempt)`, so no two requests share one and the rows depend on the
    command alone, not on the engine, its batching or the number of servers."""

    def __init__(self, cfg, engine, tokenizer, templates, choices, seen: set[str], stats: _Stats):
        self.cfg, self.engine, self.tok, self.templates, self.choices = (
            cfg,
            engine,
            tokenizer,
            templates,
            choices,
        )
        self.seen, self.stats = seen, stats
        t = next(iter(templates.values()))
        self.stops, self.stop_ids = tuple(t.stop), tuple(t.stop_token_ids)
        self.newline = ("\n",) if cfg.instruction.stop_at_newline else ()

    def chunk(self, slots: list[int]) -> list[dict[str, Any]]:
        """One row per slot. Slots with the same grid point and steering key form a group; a group draws
        candidates #0, #1, ... (candidate #c is attempt c // size of slot c % size: that names its seed) and
        its accepted conversations fill its slots in order. Each round draws with a margin for the drop
        rate, so a chunk usually takes one round of instructions and one of responses."""
        groups: dict[tuple[int, str], list[int]] = {}
        for s in slots:
            groups.setdefault(self._group(s), []).append(s)
        drawn = dict.fromkeys(groups, 0)
        filled: dict[tuple[int, str], list[dict[str, Any]]] = {g: [] for g in groups}
        n_drawn = n_kept = barren = 0
        while any(len(filled[g]) < len(members) for g, members in groups.items()):
            # expected share of candidates that end up as rows
            keep_rate = n_kept / n_drawn if n_kept else 0.8
            requests = []
            for g, members in groups.items():
                need = len(members) - len(filled[g])
                if need:
                    k = min(8 * need, math.ceil(need / max(keep_rate, 0.05) * 1.1))
                    requests += [
                        (g, members[c % len(members)], c // len(members))
                        for c in range(drawn[g], drawn[g] + k)
                    ]
                    drawn[g] += k
            drafts = self._instructions(
                requests, {g: len(m) - len(filled[g]) for g, m in groups.items()}, keep_rate
            )
            rows = self._converse(drafts)
            n_drawn += len(requests)
            n_kept += len(rows)
            for g, row in rows:
                filled[g].append(row)
            barren = 0 if rows else barren + 1
            if barren == MAX_BARREN_ROUNDS:  # a model or setting that never yields a valid row must not spin
                raise ConfigError(
                    f"no valid conversation in the last {MAX_BARREN_ROUNDS} rounds of sampling (dropped so far: "
                    f"{self.stats.dropped}, duplicates: {self.stats.duplicates}); check instruction.max_tokens, "
                    "the stops and the model"
                )
        position = {g: iter(rows) for g, rows in filled.items()}
        return [next(position[self._group(s)]) for s in slots]

    def _group(self, slot: int) -> tuple[int, str]:
        point = grid_point(slot, self.cfg.n_conversations, self.cfg.instruction.grid)
        return self.cfg.instruction.grid.index(point), steering_choice(slot, self.choices)[0]

    def _instructions(self, requests: list[tuple], need: dict, keep_rate: float) -> list[dict[str, Any]]:
        """Sample the requested candidates; keep, per group and in candidate order, up to `need` valid,
        unseen instructions, as drafts of conversations. The engine holds back the margin (`_Spares`)."""
        cfg = self.cfg
        samplings = []
        for g, slot, attempt in requests:
            point = cfg.instruction.grid[g[0]]
            samplings.append(
                Sampling(
                    point.temperature,
                    point.top_p,
                    cfg.instruction.max_tokens,
                    self.stops + self.newline,
                    self.stop_ids,
                    seed=request_seed(cfg.seed, "instruction", slot, 0, attempt),
                )
            )
        prompts = [self.templates[g[1]].prompt_prefix for g, _, _ in requests]
        spares = _Spares([g for g, _, _ in requests], need, keep_rate, self.seen)
        outs = self.engine.complete(prompts, samplings, demand=spares)
        self.stats.sampled += sum(c is not None for c in outs)
        drafts: list[dict[str, Any]] = []
        taken = dict.fromkeys(need, 0)
        text_of = {key: text for key, text, _ in self.choices}
        for (g, slot, attempt), c, sp in zip(requests, outs, samplings, strict=True):
            if taken[g] == need[g]:
                continue  # the group is full: the rest of its candidates are surplus, neither counted nor seen
            if c is None:  # _Spares drops a candidate only once the ones before it fill its group
                raise RuntimeError(f"candidate {slot}/{attempt} was dropped but its group {g} is not full")
            instruction, reason = clean_instruction(c)
            if instruction is None:
                self.stats.drop(reason)
            elif _normalize(instruction) in self.seen:
                self.stats.duplicates += 1
            else:
                self.seen.add(_normalize(instruction))
                taken[g] += 1
                drafts.append(
                    {
                        "group": g,
                        "slot": slot,
                        "attempt": attempt,
                        "seed": sp.seed,
                        "messages": [{"role": "user", "content": instruction}],
                        "point": cfg.instruction.grid[g[0]],
                        "key": g[1],
                        "text": text_of[g[1]],
                        "user_tokens": c.n_tokens,
                        "assistant_tokens": 0,
                    }
                )
        return drafts

    def _converse(self, drafts: list[dict[str, Any]]) -> list[tuple[tuple[int, str], dict[str, Any]]]:
        """Answer the drafts turn by turn (Magpie-MT samples the next user turn first); a draft that fails is
        dropped and frees its instruction. Every request's seed is named by its candidate (slot, attempt)."""
        cfg, r = self.cfg, self.cfg.response
        live = list(drafts)
        for turn in range(cfg.n_turns):
            if turn > 0:  # the next user turn, sampled after the history with the MT system prompt
                prompts = [
                    pre_query(self.tok, cfg.mt_system_prompt, d["messages"]).prompt_prefix for d in live
                ]
                samplings = [
                    Sampling(
                        1.0,
                        1.0,
                        cfg.instruction.max_tokens,
                        self.stops + self.newline,
                        self.stop_ids,
                        seed=request_seed(cfg.seed, "follow_up", d["slot"], turn, d["attempt"]),
                    )
                    for d in live
                ]
                kept = []
                for d, c in zip(live, self.engine.complete(prompts, samplings), strict=True):
                    # a conversation that fills the context (vLLM's max_model_len) ends: dropped and counted
                    text, reason = (
                        (None, "context_full") if c.finish_reason == CONTEXT_FULL else clean_instruction(c)
                    )
                    if text is None:
                        self._fail(d, f"follow_up_{reason}")
                        continue
                    d["messages"].append({"role": "user", "content": text})
                    d["user_tokens"] += c.n_tokens
                    kept.append(d)
                live = kept
            # Assistant turns are answered with the normal template and no steering/MT system prompt.
            samplings = [
                Sampling(
                    r.temperature,
                    r.top_p,
                    r.max_tokens,
                    self.stops,
                    self.stop_ids,
                    r.repetition_penalty,
                    seed=request_seed(cfg.seed, "response", d["slot"], turn, d["attempt"]),
                    # only a next turn extends a reply: the last one's KV would push instructions out of the cache
                    keep_kv=turn < cfg.n_turns - 1,
                )
                for d in live
            ]
            prompts = [render_prompt(self.tok, d["messages"]) for d in live]
            kept = []
            for d, c in zip(live, self.engine.complete(prompts, samplings), strict=True):
                if c.finish_reason == CONTEXT_FULL or not c.text.strip():
                    self._fail(d, "context_full" if c.finish_reason == CONTEXT_FULL else "empty_response")
                    continue
                d["messages"].append({"role": "assistant", "content": c.text.strip()})
                d["assistant_tokens"] += c.n_tokens
                d["finish_reason"] = c.finish_reason
                kept.append(d)
            live = kept
        return [(d["group"], self._row(d)) for d in live]

    def _fail(self, draft: dict[str, Any], reason: str) -> None:
        self.stats.drop(reason)
        self.seen.discard(_normalize(draft["messages"][0]["content"]))

    def _row(self, d: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "messages": d["messages"],
            "generator": cfg.model,
            "pre_query_template": self.templates[d["key"]].pre_query_template,
            "system_prompt_key": d["key"],
            "system_prompt": d["text"] or "",
            "instruction_temperature": d["point"].temperature,
            "instruction_top_p": d["point"].top_p,
            "response_temperature": cfg.response.temperature,
            "seed": d["seed"],  # the instruction request's own seed
            "n_turns": cfg.n_turns,
            "instruction_tokens": d["user_tokens"],
            "response_tokens": d["assistant_tokens"],
            "response_finish_reason": d["finish_reason"],
        }


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("magpie", argv, MagpieConfig)
    summary = run(cfg)
    print(
        f"{summary['rows']} conversations in {cfg.output_dir} "
        f"({summary['new_rows_this_run']} new, {summary['duplicates_dropped']} duplicates and "
        f"{sum(summary['invalid_dropped'].values())} invalid dropped, "
        f"{summary['instruction_tokens'] + summary['response_tokens']} tokens, {summary['wall_seconds']} s)"
    )


if __name__ == "__main__":
    main()

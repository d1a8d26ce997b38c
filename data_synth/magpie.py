"""Magpie: sample user instructions from an aligned model's pre-query template, then answer them.

    python -m data_synth.magpie recipe=magpie_demo n_conversations=100 output_dir=runs/magpie_demo

Writes Parquet shards (`messages` plus metadata) into `output_dir`; re-running the same command resumes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import ConfigError, cli, load_config, prepare_output_dir, resolved
from core.engines import Completion, EngineConfig, Sampling, make_engine
from core.io import ShardWriter, atomic_write_json
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

MAX_BARREN_CHUNKS = 10

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
    chunk_size: int = 64  # conversations per engine call: the unit of progress and of resumption
    rows_per_shard: int = 1000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.n_conversations <= 0:
            raise ValueError(f"n_conversations must be > 0, got {self.n_conversations}")
        if self.n_turns < 1:
            raise ValueError(f"n_turns must be >= 1, got {self.n_turns}")
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

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def run(cfg: MagpieConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from core.models import resolve_model

    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        may_differ=("n_conversations", "chunk_size", "output_dir"),
        overwrite=cfg.overwrite,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(cfg.engine.tokenizer or cfg.model), trust_remote_code=cfg.engine.trust_remote_code
    )
    choices = cfg.steering()
    # Every template is built before any model loads: a model without a usable chat template fails here.
    templates: dict[str, PreQuery] = {key: pre_query(tokenizer, text) for key, text, _ in choices}
    stops = tuple(next(iter(templates.values())).stop)
    stop_ids = tuple(next(iter(templates.values())).stop_token_ids)
    newline = ("\n",) if cfg.instruction.stop_at_newline else ()
    engine = make_engine(cfg.model, cfg.engine)

    writer = ShardWriter(out, rows_per_shard=cfg.rows_per_shard)
    seen = {_normalize(row["messages"][0]["content"]) for row in writer.rows()}  # dedup survives resumes
    stats = _Stats()
    r = cfg.response
    start, done_at_start, calls, barren = time.time(), writer.n_rows, 0, 0
    bar = tqdm(total=cfg.n_conversations, initial=writer.n_rows, desc="magpie", unit="conv")
    while writer.n_rows < cfg.n_conversations:
        first = writer.n_rows
        n = min(cfg.chunk_size, cfg.n_conversations - first)
        # Sample ~12% more instructions than needed: some are dropped, and a second round for the last
        # few rows of a chunk would run at a tiny batch size. Only `n` are answered.
        n_sample = n + max(1, n // 8)
        # A fresh seed per call, so a resumed run samples new instructions instead of repeating old ones.
        seed = cfg.seed * 1_000_003 + first * 7919 + calls
        calls += 1
        points = [grid_point(first + j, cfg.n_conversations, cfg.instruction.grid) for j in range(n_sample)]
        steer = [steering_choice(first + j, choices) for j in range(n_sample)]
        samplings = [
            Sampling(p.temperature, p.top_p, cfg.instruction.max_tokens, stops + newline, stop_ids, seed=seed)
            for p in points
        ]
        instructions = engine.complete([templates[k].prompt_prefix for k, _, _ in steer], samplings)
        convs, meta = [], []
        for c, p, (key, text, _) in zip(instructions, points, steer, strict=True):
            if len(convs) == n:  # enough for this chunk; the surplus is neither counted nor marked seen
                break
            instruction, reason = clean_instruction(c)
            if instruction is None:
                stats.drop(reason)
            elif _normalize(instruction) in seen:
                stats.duplicates += 1
            else:
                seen.add(_normalize(instruction))
                convs.append([{"role": "user", "content": instruction}])
                meta.append(
                    {"point": p, "key": key, "text": text, "user_tokens": c.n_tokens, "assistant_tokens": 0}
                )

        answer = Sampling(
            r.temperature, r.top_p, r.max_tokens, stops, stop_ids, r.repetition_penalty, seed=seed
        )
        follow_up = Sampling(1.0, 1.0, cfg.instruction.max_tokens, stops + newline, stop_ids, seed=seed + 1)
        for turn in range(cfg.n_turns):
            if turn > 0:  # Magpie-MT: the next user turn, sampled after the history with the MT system prompt
                prompts = [pre_query(tokenizer, cfg.mt_system_prompt, conv).prompt_prefix for conv in convs]
                users = engine.complete(prompts, follow_up)
                keep = []
                for i, c in enumerate(users):
                    text, reason = clean_instruction(c)
                    if text is None:
                        stats.drop(f"follow_up_{reason}")
                        continue
                    convs[i].append({"role": "user", "content": text})
                    meta[i]["user_tokens"] += c.n_tokens
                    keep.append(i)
                convs, meta = [convs[i] for i in keep], [meta[i] for i in keep]
            # Assistant turns are answered with the normal template and no steering/MT system prompt.
            replies = engine.complete([render_prompt(tokenizer, conv) for conv in convs], answer)
            keep = []
            for i, c in enumerate(replies):
                if not c.text.strip():
                    stats.drop("empty_response")
                    continue
                convs[i].append({"role": "assistant", "content": c.text.strip()})
                meta[i]["assistant_tokens"] += c.n_tokens
                meta[i]["finish_reason"] = c.finish_reason
                keep.append(i)
            convs, meta = [convs[i] for i in keep], [meta[i] for i in keep]

        rows = [
            {
                "messages": conv,
                "generator": cfg.model,
                "pre_query_template": templates[m["key"]].pre_query_template,
                "system_prompt_key": m["key"],
                "system_prompt": m["text"] or "",
                "instruction_temperature": m["point"].temperature,
                "instruction_top_p": m["point"].top_p,
                "response_temperature": r.temperature,
                "seed": seed,
                "n_turns": cfg.n_turns,
                "instruction_tokens": m["user_tokens"],
                "response_tokens": m["assistant_tokens"],
                "response_finish_reason": m["finish_reason"],
            }
            for conv, m in zip(convs, meta, strict=True)
        ][: cfg.n_conversations - writer.n_rows]
        for row in rows:
            stats.user_tokens += row["instruction_tokens"]
            stats.assistant_tokens += row["response_tokens"]
        writer.add(rows)
        bar.update(len(rows))
        barren = 0 if rows else barren + 1
        if (
            barren == MAX_BARREN_CHUNKS
        ):  # a model or setting that never yields a valid row must not spin forever
            writer.flush()
            raise ConfigError(
                f"no valid conversation in the last {MAX_BARREN_CHUNKS} chunks (dropped so far: {stats.dropped}, "
                f"duplicates: {stats.duplicates}); check instruction.max_tokens, the stops and the model"
            )
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
        "duplicates_dropped": before.get("duplicates_dropped", 0) + stats.duplicates,
        "invalid_dropped": dropped,
        "instruction_tokens": before.get("instruction_tokens", 0) + stats.user_tokens,
        "response_tokens": before.get("response_tokens", 0) + stats.assistant_tokens,
        "wall_seconds": round(before.get("wall_seconds", 0) + time.time() - start, 2),
        "shards": [s.name for s in writer.shards],
        "generator": cfg.model,
        "pre_query_templates": {k: t.pre_query_template for k, t in templates.items()},
        "stop": list(stops),
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("synth", argv, MagpieConfig)
    summary = run(cfg)
    print(
        f"{summary['rows']} conversations in {cfg.output_dir} "
        f"({summary['new_rows_this_run']} new, {summary['duplicates_dropped']} duplicates and "
        f"{sum(summary['invalid_dropped'].values())} invalid dropped, "
        f"{summary['instruction_tokens'] + summary['response_tokens']} tokens, {summary['wall_seconds']} s)"
    )


if __name__ == "__main__":
    main()

"""Magpie: sample user instructions from an aligned model's pre-query template, then answer them.

    python -m data_synth.magpie recipe=magpie_demo n_conversations=100 output_dir=runs/magpie_demo

Writes Parquet shards (`messages` plus metadata) into `output_dir`; re-running the same command resumes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import cli, load_config, prepare_output_dir, resolved
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


@dataclass
class MagpieConfig:
    model: str = "embedded"
    engine: EngineConfig = field(default_factory=EngineConfig)
    n_conversations: int = 100
    output_dir: str = "runs/magpie"
    seed: int = 0
    system_prompt: str | None = None  # steering text rendered before the pre-query template
    instruction: InstructionSampling = field(default_factory=InstructionSampling)
    response: ResponseSampling = field(default_factory=ResponseSampling)
    chunk_size: int = 64  # conversations per engine call: the unit of progress and of resumption
    rows_per_shard: int = 1000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.n_conversations <= 0:
            raise ValueError(f"n_conversations must be > 0, got {self.n_conversations}")
        shares = sum(p.share for p in self.instruction.grid)
        if not self.instruction.grid or abs(shares - 1.0) > 1e-6:
            raise ValueError(f"instruction.grid shares must sum to 1, got {shares:g}")


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


def grid_point(index: int, n: int, grid: list[GridPoint]) -> GridPoint:
    """Deterministic assignment of conversation `index` of `n` so each point gets its share."""
    position = (index + 0.5) / n
    total = 0.0
    for point in grid:
        total += point.share
        if position < total:
            return point
    return grid[-1]


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


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
    template: PreQuery = pre_query(tokenizer, cfg.system_prompt)  # fails here, before loading any model
    engine = make_engine(cfg.model, cfg.engine)

    writer = ShardWriter(out, rows_per_shard=cfg.rows_per_shard)
    seen = {
        _normalize(row["messages"][0]["content"]) for row in writer.rows()
    }  # exact-duplicate filter survives resumes
    stats = {"duplicates": 0, "dropped": {}, "instruction_tokens": 0, "response_tokens": 0}
    stop = tuple(template.stop) + (("\n",) if cfg.instruction.stop_at_newline else ())
    start, done_at_start, calls = time.time(), writer.n_rows, 0
    bar = tqdm(total=cfg.n_conversations, initial=writer.n_rows, desc="magpie", unit="conv")
    while writer.n_rows < cfg.n_conversations:
        first = writer.n_rows
        n = min(cfg.chunk_size, cfg.n_conversations - first)
        points = [grid_point(first + j, cfg.n_conversations, cfg.instruction.grid) for j in range(n)]
        # A fresh seed per call, so a resumed run samples new instructions instead of repeating old ones.
        seed = cfg.seed * 1_000_003 + first * 7919 + calls
        calls += 1
        samplings = [
            Sampling(
                p.temperature,
                p.top_p,
                cfg.instruction.max_tokens,
                stop,
                tuple(template.stop_token_ids),
                seed=seed,
            )
            for p in points
        ]
        instructions = engine.complete([template.prompt_prefix] * n, samplings)
        kept: list[tuple[str, GridPoint, Completion]] = []
        for c, p in zip(instructions, points, strict=True):
            text, reason = clean_instruction(c)
            if text is None:
                stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
            elif _normalize(text) in seen:
                stats["duplicates"] += 1
            else:
                seen.add(_normalize(text))
                kept.append((text, p, c))
        if not kept:
            continue
        r = cfg.response
        response_sampling = Sampling(
            r.temperature,
            r.top_p,
            r.max_tokens,
            tuple(template.stop),
            tuple(template.stop_token_ids),
            r.repetition_penalty,
            seed=seed,
        )
        prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t, _, _ in kept]
        responses = engine.complete(prompts, response_sampling)
        rows = []
        for (text, p, ic), rc in zip(kept, responses, strict=True):
            if not rc.text.strip():
                stats["dropped"]["empty_response"] = stats["dropped"].get("empty_response", 0) + 1
                continue
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": rc.text.strip()},
                    ],
                    "generator": cfg.model,
                    "pre_query_template": template.pre_query_template,
                    "system_prompt": cfg.system_prompt or "",
                    "instruction_temperature": p.temperature,
                    "instruction_top_p": p.top_p,
                    "response_temperature": r.temperature,
                    "seed": seed,
                    "n_turns": 1,
                    "instruction_tokens": ic.n_tokens,
                    "response_tokens": rc.n_tokens,
                    "response_finish_reason": rc.finish_reason,
                }
            )
            stats["instruction_tokens"] += ic.n_tokens
            stats["response_tokens"] += rc.n_tokens
        rows = rows[: cfg.n_conversations - writer.n_rows]
        writer.add(rows)
        bar.update(len(rows))
        elapsed = max(time.time() - start, 1e-9)
        bar.set_postfix(
            conv_s=f"{(writer.n_rows - done_at_start) / elapsed:.2f}",
            tok_s=f"{(stats['instruction_tokens'] + stats['response_tokens']) / elapsed:.1f}",
            dup=stats["duplicates"],
        )
    writer.flush()
    bar.close()
    summary = {
        "rows": writer.n_rows,
        "new_rows_this_run": writer.n_rows - done_at_start,
        "duplicates_dropped": stats["duplicates"],
        "invalid_dropped": stats["dropped"],
        "instruction_tokens": stats["instruction_tokens"],
        "response_tokens": stats["response_tokens"],
        "wall_seconds": round(time.time() - start, 2),
        "shards": [s.name for s in writer.shards],
        "generator": cfg.model,
        "pre_query_template": template.pre_query_template,
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

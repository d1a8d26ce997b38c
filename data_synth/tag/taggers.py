"""The taggers, by kind: counted (no model), labelled by the judge, scored (reward model or judge), and the
neighbour search (neighbors.py). Each takes the shared Context, a chunk of (instruction, response) pairs and their
row indices, and returns one dict of columns per pair, None where it failed. Adding a tagger is one entry in
TAGGERS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from core.chat import render_prompt, with_bos
from core.engines import Completion, Sampling, make_engine
from core.judge import label_probabilities
from core.models import resolve_model
from data_synth import prompts
from data_synth.scoring import reward_source
from data_synth.tag.context import Context
from data_synth.tag.neighbors import tag_neighbors
from data_synth.tag.parse import (
    CURATION_PREFILL,
    parse_category,
    parse_curation,
    parse_difficulty,
    parse_quality,
    parsed,
    read_curation_probabilities,
)

MAGPIE_TAGGERS = (
    "lengths",
    "language",
    "neighbors",
    "quality",
    "difficulty",
    "task_category",
    "reward",
    "reward_difference",
    "safety",
)


FAST_CHUNK = 20_000  # rows per shard for the taggers that need no model call per row (lengths, language)


# ------------------------------------------------------------------------------------------------- counted


def tag_lengths(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict]:
    from transformers import AutoTokenizer

    tok = ctx.get("tokenizer", lambda: AutoTokenizer.from_pretrained(resolve_model(ctx.cfg.tokenizer)))

    def n_tokens(texts: list[str]) -> list[int]:  # counted in Rust: no Python list of ids per row
        if getattr(tok, "backend_tokenizer", None) is not None:
            return [len(e) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    ins, res = n_tokens([p[0] for p in pairs]), n_tokens([p[1] for p in pairs])
    return [
        {
            "instruction_length": len(p[0]),
            "response_length": len(p[1]),
            "instruction_n_tokens": i,
            "response_n_tokens": r,
        }
        for p, i, r in zip(pairs, ins, res, strict=True)
    ]


def tag_language(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict]:
    import py3langid

    return [{"language": py3langid.classify(q)[0]} for q, _ in pairs]


# ---------------------------------------------------------------------------------------- judged: labels


def judge_labels(name: str, prompt: str, parse: Callable[[dict], dict]) -> Callable:
    """A JSON-label tagger: the paper's prompt, the reply prefilled with "{" and stopped at "}", strict parsing."""

    def tag(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
        cfg = ctx.cfg.judge
        sampling = Sampling(temperature=cfg.temperature, max_tokens=cfg.max_tokens, stop=("}",))
        prompts_ = [prompts.fill(prompt, q, a) for q, a in pairs]
        return ctx.ask(prompts_, parsed(parse), f"tag {name}", prefill="{", sampling=sampling)

    return tag


def judge_score(name: str, prompt: str, column: str, low: int, high: int) -> Callable:
    def tag(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
        scores = ctx.scores([prompts.fill(prompt, q, a) for q, a in pairs], low, high, f"tag {name}")
        return [None if s is None else {column: s} for s in scores]

    return tag


def tag_curation(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
    """Humpback's self-curation: the (generated instruction, passage) pair scored 1-5 with the paper's prompt."""
    cfg = ctx.cfg
    asked = [prompts.fill(prompts.CURATION, q, a) for q, a in pairs]
    if cfg.curation == "probability":
        one_token = Sampling(temperature=0.0, max_tokens=1, logprobs=20)
        return ctx.ask(
            asked,
            read_curation_probabilities,
            "curate (probability)",
            prefill=CURATION_PREFILL,
            sampling=one_token,
            retries=0,
        )
    return ctx.ask(asked, parse_curation, "curate")  # the judge config's own sampling: the paper's is nucleus


def _curation_source(cfg: Any) -> str:
    if cfg.curation == "probability":
        return (
            f"judge {cfg.judge.model}: Humpback's curation prompt, reply prefilled 'Score: ', the probability-"
            "weighted 1-5 of its first token, rounded (probability mode, not the paper's reasoning-then-score reply)"
        )
    return f"judge {cfg.judge.model}: Humpback's curation prompt, reasoning then 'Score: N' (the paper's protocol)"


def tag_safety(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
    cfg = ctx.cfg
    if cfg.safety_model:  # Llama Guard: its own chat template asks for "safe" or "unsafe\n<categories>"
        guard = ctx.get("guard", lambda: make_engine(cfg.safety_model, cfg.safety_engine))
        asked = [
            render_prompt(
                guard.tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            )
            for q, a in pairs
        ]
        results: list[dict | None] = []
        for c in guard.complete(asked, Sampling(temperature=0.0, max_tokens=16)):
            lines = c.text.strip().splitlines()
            verdict = lines[0].strip().lower() if lines else ""
            categories = lines[1].strip() if len(lines) > 1 else ""
            results.append(
                {"safety": verdict, "safety_categories": categories, "p_safe": None}
                if verdict in ("safe", "unsafe")
                else None
            )
        return results

    def p_yes(c: Completion) -> float | None:
        p = label_probabilities(c, ("yes", "no"), fold_case=True)
        return None if p is None else p["yes"]

    probs = ctx.ask(
        [prompts.fill(prompts.SAFETY, q, a) for q, a in pairs],
        p_yes,
        "tag safety",
        prefill="",
        sampling=Sampling(temperature=0.0, max_tokens=1, logprobs=20),
        retries=0,
    )
    return [
        None
        if p is None
        else {"safety": "safe" if p >= 0.5 else "unsafe", "safety_categories": "", "p_safe": p}
        for p in probs
    ]


# ---------------------------------------------------------------------------------------- scored: rewards


def tag_reward(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
    return [None if s is None else {"instruct_reward": s} for s in ctx.rewards(pairs)]


def tag_base_response(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
    """The base model's URIAL response to each instruction: a tagger of its own, so the base model's engine is
    closed before the scorer loads (on one GPU, vLLM holds 90% of its memory while it is alive)."""
    cfg = ctx.cfg
    base = ctx.get("base", lambda: make_engine(cfg.base_model, cfg.base_engine))
    # Raw text, no chat template: URIAL aligns a base model in context.
    sampling = Sampling(temperature=0.0, max_tokens=cfg.base_max_tokens, stop=("```", "# Query"))
    asked = [with_bos(base.tokenizer, prompts.fill(prompts.URIAL, q)) for q, _ in pairs]
    return [{"base_response": o.text.strip()} for o in base.complete(asked, sampling)]


def tag_reward_difference(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict | None]:
    """r(response) - r(URIAL response of the base model); r(response) is the reward tagger's, not recomputed, and
    the base responses are the base_response tagger's."""
    earlier, base = ctx.earlier("reward", idx), ctx.earlier("base_response", idx)
    aligned = earlier.column("instruct_reward").to_pylist()
    base_responses = base.column("base_response").to_pylist()
    # A row the reward tagger has no result for (its judge never answered) has none here either: missing, not failed
    ctx.missing.update(k for k, tagged in enumerate(earlier.column("__tagged__").to_pylist()) if not tagged)
    scored = [k for k, text in enumerate(base_responses) if text is not None]
    rewards = ctx.rewards([(pairs[k][0], base_responses[k]) for k in scored])
    baseline: list[float | None] = [None] * len(pairs)
    for k, r in zip(scored, rewards, strict=True):
        baseline[k] = r
    return [
        None if a is None or b is None else {"base_reward": b, "reward_difference": a - b}
        for a, b in zip(aligned, baseline, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- the registry


def _reward_source(cfg: Any) -> str:
    return reward_source(cfg.reward_model, cfg.judge.model)


def _scorer(cfg: Any) -> set[str]:
    return {"rm"} if cfg.reward_model else {"judge"}


@dataclass(frozen=True)
class Tagger:
    """One tagger: its columns (with Arrow types), what produced them (recorded in the Parquet field metadata and
    the manifest), and its function. Adding a tagger is adding one entry to TAGGERS."""

    columns: dict[str, pa.DataType]
    source: Callable[[Any], str]  # given the TagConfig
    tag: Callable[[Context, list[tuple[str, str]], np.ndarray], list[dict | None]]
    fast: bool = False  # no model call per row: shards of FAST_CHUNK rows instead of chunk_size
    whole_set: bool = False  # needs every row at once (the neighbour search)
    needs: tuple[str, ...] = ()  # taggers whose columns it reads; they run first
    # the models it runs (Context keys: judge, rm, base, guard); the others are closed before it starts
    uses: Callable[[Any], set[str]] = lambda cfg: {"judge"}


def _neighbors_source(cfg: Any) -> str:
    index = {
        "auto": "faiss IndexFlatL2 below 100K rows, else IndexIVFFlat",
        "exact": "faiss IndexFlatL2",
    }.get(cfg.neighbors_index, "faiss IndexIVFFlat")
    if cfg.neighbors_index != "exact":
        index += f" (nprobe={cfg.neighbors_nprobe})"
    model = f"a static embedder distilled from {cfg.embedder}" if cfg.embed_static else cfg.embedder
    return f"{index} over {model} embeddings ({cfg.embed_dtype}, normalized), k={cfg.neighbors_k}"


TAGGERS: dict[str, Tagger] = {
    "lengths": Tagger(
        {
            "instruction_length": pa.int64(),
            "response_length": pa.int64(),
            "instruction_n_tokens": pa.int64(),
            "response_n_tokens": pa.int64(),
        },
        lambda cfg: f"characters and {cfg.tokenizer} tokens",
        tag_lengths,
        fast=True,
        uses=lambda cfg: set(),
    ),
    "language": Tagger(
        {"language": pa.string()}, lambda cfg: "py3langid", tag_language, fast=True, uses=lambda cfg: set()
    ),
    "neighbors": Tagger(
        {"min_neighbor_distance": pa.float64(), "repeat_count": pa.int64(), "cluster_id": pa.int64()},
        _neighbors_source,
        tag_neighbors,
        whole_set=True,
        uses=lambda cfg: set(),
    ),
    "quality": Tagger(
        {"input_quality": pa.string(), "quality_explanation": pa.string()},
        lambda cfg: f"judge {cfg.judge.model}",
        judge_labels("quality", prompts.QUALITY, parse_quality),
    ),
    "difficulty": Tagger(
        {"difficulty": pa.string(), "intent": pa.string(), "knowledge": pa.string()},
        lambda cfg: f"judge {cfg.judge.model}",
        judge_labels("difficulty", prompts.DIFFICULTY, parse_difficulty),
    ),
    "task_category": Tagger(
        {"task_category": pa.string(), "other_task_category": pa.list_(pa.string())},
        lambda cfg: f"judge {cfg.judge.model}",
        judge_labels("task_category", prompts.TASK_CATEGORY, parse_category),
    ),
    "reward": Tagger({"instruct_reward": pa.float64()}, _reward_source, tag_reward, uses=_scorer),
    "base_response": Tagger(
        {"base_response": pa.string()},
        lambda cfg: f"{cfg.base_model}'s URIAL response (greedy)",
        tag_base_response,
        uses=lambda cfg: {"base"},
    ),
    "reward_difference": Tagger(
        {"base_reward": pa.float64(), "reward_difference": pa.float64()},
        lambda cfg: f"{_reward_source(cfg)}, minus the same for {cfg.base_model}'s URIAL response",
        tag_reward_difference,
        needs=("reward", "base_response"),
        uses=_scorer,
    ),
    "safety": Tagger(
        {"safety": pa.string(), "safety_categories": pa.string(), "p_safe": pa.float64()},
        lambda cfg: (
            f"guard model {cfg.safety_model}"
            if cfg.safety_model
            else f"judge {cfg.judge.model}: P(yes) to 'is it safe?' (not a guard model)"
        ),
        tag_safety,
        uses=lambda cfg: {"guard"} if cfg.safety_model else {"judge"},
    ),
    "curation": Tagger(
        {"curation_score": pa.int64(), "curation_expected": pa.float64(), "curation_reply": pa.string()},
        _curation_source,
        tag_curation,
    ),
    "alpagasus": Tagger(
        {"alpagasus_score": pa.float64()},
        lambda cfg: f"judge {cfg.judge.model}: probability-weighted 0-5 score (not a reward model)",
        judge_score("alpagasus", prompts.ALPAGASUS, "alpagasus_score", 0, 5),
    ),
}


def in_order(names: list[str]) -> list[str]:
    """The taggers asked for, each after the ones it needs (added when not asked for)."""
    out: list[str] = []
    for name in names:
        for need in (*TAGGERS[name].needs, name):
            if need not in out:
                out.append(need)
    return out

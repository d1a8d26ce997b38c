"""Magpie-DPO preference pairs: k sampled responses per instruction, scored, best vs worst.

    python -m data_synth.pairs recipe=demo_pairs input=runs/demo/selected output_dir=runs/demo/pairs

For each instruction (the first user turn), `n_samples` responses are sampled at `temperature` (0.8 in the
paper) and scored by a reward model (ArmoRM/FsfairX on GPU) or, on CPU, by the judge's probability-weighted
1-10 score (labelled so in the manifest). chosen = the best, rejected = the worst; ties (and instructions with fewer than two scored
responses) are dropped and counted. Rows are trl's conversational preference format (`prompt`, `chosen`,
`rejected`, each a list of messages) plus scores, split into `train-*.parquet` and `test-*.parquet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.chat import instruction_of, render_prompt
from core.config import ConfigError, cli, load_config, resolved
from core.data import load_rows
from core.engines import EngineConfig, Sampling, free_memory, make_engine, request_seed
from core.io import atomic_write_json, digest, write_parquet
from core.judge import JudgeConfig
from core.rundir import prepare_output_dir
from core.shards import ShardWriter
from data_synth.scoring import Scorer, reward_source


@dataclass
class PairsConfig:
    input: str = "runs/demo/selected"
    output_dir: str = "runs/demo/pairs"
    model: str = "embedded"  # the policy whose responses are compared
    engine: EngineConfig = field(default_factory=EngineConfig)
    n_samples: int = 5
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 2048
    max_prompts: int | None = None
    # scoring: a sequence-classification reward model, or null for the judge's probability-weighted 1-10 score
    reward_model: str | None = None
    reward_batch_size: int = 8
    # ArmoRM ships its own model code: set true to run it (you trust it)
    reward_trust_remote_code: bool = False
    # scores (no reward model): one token, its logprobs
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    test_size: float = 0.02
    seed: int = 42
    chunk_size: int = 64  # prompts per resumable unit (x n_samples requests), not a batch size
    overwrite: bool = False


def best_and_worst(scores: list[float | None]) -> tuple[int, int] | None:
    """Indices of the highest and lowest score, the first of equals (as the Magpie authors' notebook, with
    np.argmax/argmin); None for a tie or fewer than two scored responses."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda x: (x[0], -x[1]))
    worst = min(scored, key=lambda x: (x[0], x[1]))
    return None if best[0] == worst[0] else (best[1], worst[1])


def prescored(row: dict[str, Any], where: str) -> tuple[str, list[str], list[float | None]]:
    """(instruction, responses, scores) of a row that already holds scored responses: the Magpie authors' DPO
    layout (`instruction`, `responses`, `rewards_armorm: [{score}]`) or a plain `responses` + `scores`."""
    responses = row["responses"]
    raw = row.get("rewards_armorm", row.get("scores"))
    if raw is None:
        raise ConfigError(f"{where}: 'responses' without 'scores' or 'rewards_armorm'")
    scores = [r.get("score") if isinstance(r, dict) else r for r in raw]
    if not isinstance(responses, list) or len(responses) != len(scores):
        raise ConfigError(
            f"{where}: {len(scores)} scores for {len(responses) if isinstance(responses, list) else 0} responses"
        )
    instruction = instruction_of(row, where)
    return instruction, [str(r) for r in responses], [None if x is None else float(x) for x in scores]


def pair_row(
    index: int, instruction: str, responses: list[str], scores: list[float | None]
) -> dict[str, Any]:
    """trl's conversational preference row; empty replies never win; status says pair or tie."""
    pick = best_and_worst([sc if responses[n] else None for n, sc in enumerate(scores)])
    row = {
        "source_index": index,
        "status": "pair" if pick else "tie",
        "prompt": [{"role": "user", "content": instruction}],
        "chosen": None,
        "rejected": None,
        "score_chosen": None,
        "score_rejected": None,
        "all_scores": scores,
    }
    if pick:
        b, w = pick
        row.update(
            chosen=[{"role": "assistant", "content": responses[b]}],
            rejected=[{"role": "assistant", "content": responses[w]}],
            score_chosen=scores[b],
            score_rejected=scores[w],
        )
    return row


def run(cfg: PairsConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="data_synth.pairs",
        overwrite=cfg.overwrite,
        inputs=(cfg.input, cfg.model, cfg.reward_model, cfg.judge.model),
    )
    rows = load_rows(cfg.input)
    if "responses" in rows[0]:  # responses already sampled and scored: pick the pairs, as the authors did
        results = [pair_row(i, *prescored(r, f"{cfg.input}: row {i}")) for i, r in enumerate(rows)]
        return write_pairs(
            cfg, out, results, "scores given in the input (responses + scores / rewards_armorm)"
        )
    rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
    # Progress is keyed by the instruction itself: a reordered or edited input never pairs responses with another
    # row, and an instruction that appears twice is sampled once (its seeds are named by its text, not its row).
    # an instruction alone (the authors' DPO instruction sets, a `prompt` column) or any conversation's first turn
    questions = [instruction_of(row, f"{cfg.input}: row {i}") for i, row in enumerate(rows)]
    keys = [prompt_key(q) for q in questions]
    first: dict[str, int] = {}  # each distinct instruction's first row, in input order
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    sampled = sample_responses(cfg, out, questions, keys, first)
    work = ShardWriter(out / "work", rows_per_shard=cfg.chunk_size, split="part")
    done = {prompt_key(r["prompt"][0]["content"]) for r in work.rows()}
    todo = [i for k, i in first.items() if k not in done]
    scorer = Scorer(
        cfg.judge,
        out / "judge_cache.sqlite",
        cfg.reward_model,
        cfg.reward_batch_size,
        cfg.reward_trust_remote_code,
    )
    bar = tqdm(total=len(first), initial=len(first) - len(todo), desc="score pairs", unit="prompt")
    missing = 0
    for start in range(0, len(todo), cfg.chunk_size):
        idx = todo[start : start + cfg.chunk_size]
        asked, responses = [questions[i] for i in idx], [sampled[keys[i]] for i in idx]
        flat = [(q, r) for q, rs in zip(asked, responses, strict=True) for r in rs]
        scorer.missing.clear()
        flat_scores = scorer.rewards(flat)  # the reward model, or the judge's labelled score
        unanswered = {position // cfg.n_samples for position in scorer.missing}
        missing += len(unanswered)
        for k, (i, q, rs) in enumerate(zip(idx, asked, responses, strict=True)):
            # A score the judge never gave is missing, not a tie: nothing is written, and a re-run scores it again
            if k not in unanswered:
                work.add([pair_row(i, q, rs, flat_scores[k * cfg.n_samples : (k + 1) * cfg.n_samples])])
        work.flush()
        bar.update(len(idx))
    bar.close()
    if missing:
        scorer.judge.raise_for_outages(missing, len(first), "prompts")
    by_key = {prompt_key(r["prompt"][0]["content"]): r for r in work.rows()}
    # This input's prompts, in its order; one the judge never scored (within judge.max_engine_errors) has no row
    results = [{**by_key[k], "source_index": i} for k, i in first.items() if k in by_key]
    extra = {"duplicate_prompts": len(rows) - len(first), "unscored_prompts": len(first) - len(results)}
    return write_pairs(
        cfg,
        out,
        results,
        reward_source(cfg.reward_model, cfg.judge.model),
        {k: v for k, v in extra.items() if v},
    )


def sample_responses(
    cfg: PairsConfig, out: Path, questions: list[str], keys: list[str], first: dict[str, int]
) -> dict[str, list[str]]:
    """Phase 1: `n_samples` responses for every distinct instruction, written chunk by chunk to `out/responses`
    before anything is scored, so a scoring failure (an outage, an out-of-memory reward model) never costs the
    generations; then the policy engine is released, so that the scorer (a reward model on the same GPU) can load.
    Returns {instruction key: responses}."""
    store = ShardWriter(out / "responses", rows_per_shard=cfg.chunk_size, split="part")
    sampled = {r["key"]: r["responses"] for r in store.rows()}
    todo = [i for k, i in first.items() if k not in sampled]
    if todo:
        engine = make_engine(cfg.model, cfg.engine)
        bar = tqdm(total=len(first), initial=len(first) - len(todo), desc="sample responses", unit="prompt")
        for start in range(0, len(todo), cfg.chunk_size):
            idx = todo[start : start + cfg.chunk_size]
            prompts = [
                render_prompt(engine.tokenizer, [{"role": "user", "content": questions[i]}]) for i in idx
            ]
            # n_samples of one prompt must differ: each request its own seed, named by (instruction, sample).
            samplings = [
                Sampling(
                    cfg.temperature,
                    cfg.top_p,
                    cfg.max_tokens,
                    seed=request_seed(cfg.seed, "pairs", keys[i], 0, k),
                )
                for i in idx
                for k in range(cfg.n_samples)
            ]
            outs = engine.complete([p for p in prompts for _ in range(cfg.n_samples)], samplings)
            rows = [
                {
                    "key": keys[i],
                    "instruction": questions[i],
                    "responses": [c.text.strip() for c in outs[k * cfg.n_samples : (k + 1) * cfg.n_samples]],
                }
                for k, i in enumerate(idx)
            ]
            store.add(rows)
            store.flush()
            sampled.update((r["key"], r["responses"]) for r in rows)
            bar.update(len(idx))
        bar.close()
        engine.close()
        del engine
        free_memory()
    return sampled


def prompt_key(instruction: str) -> str:
    return digest([instruction])


def write_pairs(
    cfg: PairsConfig,
    out: Path,
    results: list[dict[str, Any]],
    scorer: str,
    extra: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Split the pairs (ties are dropped and counted) into train/test Parquet files and a manifest."""
    import pyarrow as pa

    pairs = [r for r in results if r["status"] == "pair"]
    # Our own split, not Dataset.train_test_split: that one refuses test_size=0, rounds the test share up (2% of
    # 3 pairs is one test pair) and shuffles both splits; here a seeded draw picks the test rows and both splits
    # keep the input's order, so reruns and the authors' files diff cleanly.
    order = np.random.default_rng(cfg.seed).permutation(len(pairs))
    n_test = int(round(len(pairs) * cfg.test_size))
    splits = {
        "test": [pairs[j] for j in sorted(order[:n_test])],
        "train": [pairs[j] for j in sorted(order[n_test:])],
    }
    # A split with no pairs gets no file (an empty, schema-less Parquet breaks load_dataset and trl).
    for split, split_rows in splits.items():
        path = out / f"{split}-00000.parquet"
        if not split_rows:
            path.unlink(missing_ok=True)
            continue
        write_parquet(
            path, pa.Table.from_pylist([{k: v for k, v in r.items() if k != "status"} for r in split_rows])
        )
    summary = {
        "prompts": len(results),
        "pairs": len(pairs),
        "ties_dropped": len(results) - len(pairs),
        "train": len(splits["train"]),
        "test": len(splits["test"]),
        "scorer": scorer,
        **(extra or {}),
    }
    atomic_write_json(out / "manifest.json", summary)
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("pairs", argv, PairsConfig)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()

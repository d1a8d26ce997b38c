"""Pairwise evaluation: answer an instruction set with each model, judge every pair in both orders, rank.

    python -m eval.pairwise recipe=demo_eval models.tuned=runs/demo/sft/merged output_dir=runs/demo/eval

Writes `answers/<model>.jsonl`, `judgments.jsonl`, and `leaderboard.csv` / `leaderboard.md` (win rate against
the other models with a 95% bootstrap interval over instructions). Re-running resumes: answers and
judgments already on disk are reused.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, cli, load_config, resolved
from core.engines import Completion, EngineConfig
from core.io import read_jsonl, write_jsonl
from core.judge import Judge, JudgeConfig, first_token_share
from core.models import resolve_model
from core.rundir import prepare_output_dir
from eval.bootstrap import bootstrap, interval
from eval.generate import GenerateConfig, generate
from eval.scores import markdown_table, score_row, write_scores, write_table

DEMO_INSTRUCTIONS = str(Path(__file__).parent / "data" / "demo_instructions.jsonl")

JUDGE_PROMPT = """Compare two responses to the same instruction and decide which one is better: more helpful, \
accurate and relevant. The order of the responses and their length must not affect your decision.

[Instruction]
{instruction}

[Response A]
{a}

[Response B]
{b}

Which response is better? Answer with a single letter: A or B."""


@dataclass
class PairwiseConfig:
    models: dict[str, str] = field(default_factory=lambda: {"base": "embedded"})  # name -> path / Hub id
    # model name -> the system prompt it answers with (Humpback's models answer with their training tags)
    system_prompts: dict[str, str] = field(default_factory=dict)
    instructions: str = DEMO_INSTRUCTIONS  # JSONL with `id` and `instruction`
    max_instructions: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)  # answers
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=8, logprobs=20))
    n_bootstrap: int = 1000
    seed: int = 0
    output_dir: str = "runs/demo/eval"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"models needs at least two entries to compare, got {list(self.models)}")
        unknown = sorted(set(self.system_prompts) - set(self.models))
        if unknown:
            raise ValueError(
                f"system_prompts: {unknown} are not models of this run; models: {list(self.models)}"
            )


def load_instructions(path: str, limit: int | None = None) -> list[dict[str, str]]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        if "instruction" not in row:
            raise ConfigError(f"{path}:{i}: missing 'instruction' field")
        row.setdefault("id", f"{i:05d}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"{path}: duplicate ids {dup[:5]}")
    return rows[:limit] if limit else rows


def generate_answers(
    name: str, model: str, questions: list[dict], cfg: PairwiseConfig, out: Path
) -> list[dict]:
    """Answers of one model through eval.generate (greedy, resumable per chunk in `answers/<name>.jsonl`)."""
    gen = GenerateConfig(
        model=model,
        name=name,
        engine=cfg.engine,
        max_tokens=cfg.max_tokens,
        repetition_penalty=cfg.repetition_penalty,
        system_prompt=cfg.system_prompts.get(name),
    )
    single_turn = [{"id": q["id"], "turns": [q["instruction"]]} for q in questions]
    answered = generate(gen, single_turn, out / "answers" / f"{name}.jsonl")
    return [
        {
            "id": q["id"],
            "instruction": q["instruction"],
            "output": a["answers"][0],
            "generator": name,
            "model": model,
            "n_tokens": a["n_tokens"][0],
        }
        for q, a in zip(questions, answered, strict=True)
    ]


def preference_a(c: Completion) -> float | None:
    """P(A is better) from the first token's logprobs (weighted, AlpacaEval-style); else the parsed letter."""
    share = first_token_share(c, "A", "B")
    if share is not None:
        return share
    match = re.search(r"\b([AB])\b", c.text)
    if match:
        return 1.0 if match.group(1) == "A" else 0.0
    return None


def judge_pairs(answers: dict[str, list[dict]], cfg: PairwiseConfig, out: Path) -> list[dict]:
    """Every pair of models on every instruction, in both orders (`judgments.jsonl`); the judge's cache
    makes a re-run free."""
    pairs = [(a, b, i) for a, b in itertools.permutations(answers, 2) for i in range(len(answers[a]))]
    conversations = [
        [
            {
                "role": "user",
                "content": JUDGE_PROMPT.format(
                    instruction=answers[a][i]["instruction"],
                    a=answers[a][i]["output"],
                    b=answers[b][i]["output"],
                ),
            }
        ]
        for a, b, i in pairs
    ]
    judge = Judge(cfg.judge, out / "judge_cache.sqlite")
    verdicts = judge.ask(conversations, preference_a, desc="judging")
    judge.close()
    # A verdict the judge never gave is no result: past the tolerated share nothing is written; a re-run asks for it
    judge.raise_for_outages(sum(v.missing for v in verdicts), len(verdicts), "judgments")
    rows = [
        {
            "id": answers[a][i]["id"],
            "model_a": a,
            "model_b": b,
            "judge": cfg.judge.model,
            "preference_a": v.value,
            "raw": v.completion.text if v.completion else None,
            "failed": v.value is None,
            "missing": v.missing,
            "error": v.error,
        }
        for (a, b, i), v in zip(pairs, verdicts, strict=True)
    ]
    write_jsonl(out / "judgments.jsonl", rows)
    return rows


def win_matrix(judgments: list[dict], models: list[str], ids: list[str]) -> np.ndarray:
    """wins[m, q]: model m's mean preference over its opponents on question q (NaN where nothing parsed)."""
    col = {q: j for j, q in enumerate(ids)}
    total = np.zeros((len(models), len(ids)))
    count = np.zeros((len(models), len(ids)))
    for r in judgments:
        if r["failed"] or r["model_a"] not in models or r["model_b"] not in models or r["id"] not in col:
            continue
        a, b, q, p = models.index(r["model_a"]), models.index(r["model_b"]), col[r["id"]], r["preference_a"]
        total[a, q] += p
        count[a, q] += 1
        total[b, q] += 1 - p
        count[b, q] += 1
    with np.errstate(invalid="ignore"):
        return total / count


def leaderboard(
    judgments: list[dict], answers: dict[str, list[dict]], n_bootstrap: int, seed: int
) -> list[dict[str, Any]]:
    """Win rate (%) of each model against the others, 95% percentile bootstrap over instructions."""
    models = list(answers)
    ids = [a["id"] for a in next(iter(answers.values()))]
    wins = win_matrix(judgments, models, ids)
    boots = np.array(
        bootstrap(
            len(ids), n_bootstrap, lambda idx: np.nanmean(wins[:, idx], axis=1), np.random.default_rng(seed)
        )
    )
    lows, highs = interval(boots, axis=0)
    rows = []
    for m, name in enumerate(models):
        rows.append(
            {
                "model": name,
                "win_rate": round(100 * float(np.nanmean(wins[m])), 2),
                "ci_low": round(100 * float(lows[m]), 2),
                "ci_high": round(100 * float(highs[m]), 2),
                "n_questions": int(np.sum(~np.isnan(wins[m]))),
                "n_judgments": sum(1 for r in judgments if name in (r["model_a"], r["model_b"])),
                "n_failed": sum(1 for r in judgments if r["failed"] and name in (r["model_a"], r["model_b"])),
                "avg_tokens": round(float(np.mean([a["n_tokens"] for a in answers[name]])), 1),
            }
        )
    return sorted(rows, key=lambda r: -r["win_rate"])


def run(cfg: PairwiseConfig) -> list[dict[str, Any]]:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.pairwise",
        may_differ=("models", "n_bootstrap"),
        inputs=(cfg.instructions, *cfg.models.values(), cfg.judge.model),
        overwrite=cfg.overwrite,
    )
    questions = load_instructions(cfg.instructions, cfg.max_instructions)
    answers = {name: generate_answers(name, model, questions, cfg, out) for name, model in cfg.models.items()}
    judgments = judge_pairs(answers, cfg, out)
    for name in answers:  # before any table is written: a leaderboard of NaNs is no leaderboard
        own = [r for r in judgments if name in (r["model_a"], r["model_b"])]
        if all(r["failed"] for r in own):
            raise ConfigError(
                f"pairwise: no judgment of {name} could be read ({len(own)} of {len(own)} replies of judge "
                f"{cfg.judge.model} held no verdict; see {out / 'judgments.jsonl'})"
            )
    rows = leaderboard(judgments, answers, cfg.n_bootstrap, cfg.seed)
    write_table(out / "leaderboard.csv", rows, list(rows[0]))
    write_table(out / "leaderboard.md", rows, list(rows[0]))
    write_scores(
        out,
        [
            score_row(r["model"], "pairwise", "win_rate", r["win_rate"], r["ci_low"], r["ci_high"])
            for r in rows
        ],
    )
    return rows


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("pairwise", argv, PairwiseConfig)
    for name, model in cfg.models.items():  # a server's own model name (openai backend) can be anything
        if (
            cfg.engine.backend != "openai"
            and not Path(model).exists()
            and resolve_model(model) == model
            and "/" not in model
        ):
            raise ConfigError(f"models.{name}: '{model}' is neither a local path, 'embedded', nor a Hub id")
    rows = run(cfg)
    print(
        f"\nLeaderboard ({len(rows)} models, judge: {cfg.judge.model}) -> {cfg.output_dir}/leaderboard.md\n"
    )
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()

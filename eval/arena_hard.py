"""Arena-Hard scoring (MAGPIE_REFERENCE.md section 5), compatible with arena-hard-auto's judgment files.

    python -m eval.arena_hard judgments=DIR [baseline=gpt-4-0314] [n_bootstrap=100] [output_dir=DIR]

Reads `DIR/*.jsonl` in arena-hard-auto's layout (one file per model; each row a question with two `games`: game 1
has the baseline as A, game 2 has it as B), turns verdicts into battles (">>" counts as 3), fits a Bradley-Terry
model with the baseline anchored at 1000, and reports each model's score (its expected win rate against the
baseline, in %) with a 95% bootstrap interval, in arena-hard-auto's leaderboard columns.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, cli, load_config
from core.io import atomic_write_text, read_jsonl

LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
_DOUBLE = re.compile(r"\[\[([AB<>=]+)\]\]")
_SINGLE = re.compile(r"\[([AB<>=]+)\]")
STRONG_WEIGHT = 3  # a decisive verdict counts as three battles, as in arena-hard-auto


def parse_verdict(text: str) -> str | None:
    """The judge's verdict: the last [[...]] label in the reply, else the last [...] label; None if there is none."""
    for pattern in (_DOUBLE, _SINGLE):
        found = [m.strip() for m in pattern.findall(text) if m.strip() in LABELS]
        if found:
            return found[-1]
    return None


def battles_from_judgments(rows: list[dict[str, Any]], baseline: str) -> list[tuple[str, str, str]]:
    """(model_a, model_b, winner) battles, winner in {model_a, model_b, tie}; game 2 has the positions swapped."""
    out = []
    for row in rows:
        model = row["model"]
        for game_index, game in enumerate(row["games"][:2]):
            label = game.get("score")
            if label not in LABELS:
                continue  # an unparsed verdict is not a battle (reported separately)
            weight = STRONG_WEIGHT if ">>" in label else 1
            a_won = label.startswith("A>")
            if label == "A=B":
                winner = "tie"
            elif game_index == 0:  # A is the baseline
                winner = "model_a" if a_won else "model_b"
            else:  # A is the model
                winner = "model_b" if a_won else "model_a"
            out += [(baseline, model, winner)] * weight
    return out


def bradley_terry(
    battles: list[tuple[str, str, str]],
    baseline: str,
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
) -> dict[str, float]:
    """Ratings by maximum likelihood (logistic regression on win counts, ties as half a win each way), as
    arena-hard-auto's compute_mle_elo; the baseline is anchored at `init`."""
    from sklearn.linear_model import LogisticRegression

    models = sorted({m for a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for a, b, winner in battles:
        i, j = index[a], index[b]
        if winner == "model_a":
            wins[i, j] += 2
        elif winner == "model_b":
            wins[j, i] += 2
        else:
            wins[i, j] += 1
            wins[j, i] += 1
    rows, labels, weights = [], [], []
    for i in range(len(models)):
        for j in range(len(models)):
            if i == j or wins[i, j] + wins[j, i] == 0:
                continue
            x = np.zeros(len(models))
            x[i], x[j] = math.log(base), -math.log(base)
            rows += [x, x]
            labels += [1.0, 0.0]
            weights += [wins[i, j], wins[j, i]]
    lr = LogisticRegression(
        fit_intercept=False, C=np.inf, tol=1e-6
    )  # no regularization (sklearn >= 1.8 spelling)
    lr.fit(np.array(rows), np.array(labels), sample_weight=np.array(weights))
    ratings = scale * lr.coef_[0] + init
    ratings += init - ratings[index[baseline]]
    return dict(zip(models, ratings.tolist(), strict=True))


def score(rating: float, baseline_rating: float = 1000.0) -> float:
    """Expected win rate (%) against the baseline."""
    return 100.0 / (1.0 + 10 ** ((baseline_rating - rating) / 400.0))


def leaderboard(
    battles: list[tuple[str, str, str]], baseline: str, n_bootstrap: int = 100, seed: int = 0
) -> list[dict]:
    ratings = bradley_terry(battles, baseline)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):  # resample battles with replacement, as arena-hard-auto does
        picked = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
        samples.append(bradley_terry(picked, baseline))
    rows = []
    for model, rating in ratings.items():
        boot = [s[model] for s in samples if model in s]
        low, high = (np.percentile(boot, 2.5), np.percentile(boot, 97.5)) if boot else (rating, rating)
        rows.append({"model": model, "score": round(score(rating), 1), "rating": round(rating, 1),
                     "rating_q025": round(low, 1), "rating_q975": round(high, 1),
                     "CI": f"({round(score(low) - score(rating), 1)}, +{round(score(high) - score(rating), 1)})"})  # fmt: skip
    return sorted(rows, key=lambda r: -r["score"])


@dataclass
class ArenaHardConfig:
    judgments: str = ""  # a directory of arena-hard-auto judgment files (model_judgment/<judge>/)
    baseline: str = "gpt-4-0314"
    n_bootstrap: int = 100
    seed: int = 0
    output_dir: str | None = None


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("eval", argv, ArenaHardConfig)
    files = sorted(Path(cfg.judgments).glob("*.jsonl"))
    if not files:
        raise ConfigError(f"judgments: no .jsonl files in '{cfg.judgments}'")
    rows = [r for f in files for r in read_jsonl(f)]
    battles = battles_from_judgments(rows, cfg.baseline)
    unparsed = sum(1 for r in rows for g in r["games"][:2] if g.get("score") not in LABELS)
    table = leaderboard(battles, cfg.baseline, cfg.n_bootstrap, cfg.seed)
    if cfg.output_dir:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
        atomic_write_text(Path(cfg.output_dir) / "leaderboard.csv", buf.getvalue())
    print(json.dumps({"leaderboard": table, "unparsed_games": unparsed}, indent=2))


if __name__ == "__main__":
    main()

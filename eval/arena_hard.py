"""Arena-Hard v0.1 (MAGPIE_REFERENCE.md section 5) with any judge, in arena-hard-auto's file formats.

    python -m eval.arena_hard answers=DIR[,DIR...] [baseline=gpt-4-0314] [judge.model=...] [style_control=true]
    python -m eval.arena_hard judgments=DIR/model_judgment/JUDGE [answers=...] [n_bootstrap=100] [output_dir=DIR]

`answers` are model_answer directories holding one arena-hard-auto answer file per model (eval.generate
bench=arena_hard writes them), the baseline's included. Every question is judged twice with arena-hard-auto's judge prompt: game 1 shows the
baseline as A, game 2 as B. Verdicts become battles (">>" counts as 3), a Bradley-Terry model anchors the
baseline at 1000, and each model's score is its expected win rate against the baseline (%) with a 95%
bootstrap interval; `style_control=true` adds arena-hard-auto's length and markdown-density features to the
fit, so the score is what remains at equal style. Writes `model_judgment/<judge>/<model>.jsonl` and
`arena_hard/leaderboard.csv` (model, score, rating_q025, rating_q975, CI, avg_tokens).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, cli, load_config, prepare_output_dir, resolved
from core.io import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from eval.generate import check_same_questions, load_questions, style_metadata
from eval.judging import Judge, JudgeConfig
from eval.scores import score_row, write_scores

# arena-hard-auto's v0.1 judge prompt (config/judge_config.yaml), verbatim: scores are only comparable with it.
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job "
    "is to evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to "
    "the prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' "
    "answers, compare both assistants' answers with your answer. You must identify and correct any mistakes or "
    "inaccurate information.\n\nThen consider if the assistant's answers are helpful, relevant, and concise. "
    "Helpful means the answer correctly responds to the prompt or follows the instructions. Note when user prompt "
    "has any ambiguity or more than one interpretation, it is more helpful and appropriate to ask for "
    "clarifications or more information from the user than providing an answer based on assumptions. Relevant "
    "means all parts of the response closely connect or are appropriate to what is being asked. Concise means the "
    "response is clear and not verbose or excessive.\n\nThen consider the creativity and novelty of the "
    "assistant's answers when needed. Finally, identify any missing important information in the assistants' "
    "answers that would be beneficial to include when responding to the user prompt.\n\nAfter providing your "
    "explanation, you must output only one of the following choices as your final verdict with a label:\n\n"
    "1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n"
    '5. Assistant B is significantly better: [[B>>A]]\n\nExample output: "My final verdict is tie: [[A=B]]".'
)
JUDGE_TEMPLATE = (
    "<|User Prompt|>\n{question_1}\n\n<|The Start of Assistant A's Answer|>\n{answer_1}\n"
    "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_2}\n"
    "<|The End of Assistant B's Answer|>"
)
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


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """arena-hard-auto `model_judgment/<judge>/<model>.jsonl`: each row a question_id, a model and two games."""
    try:
        rows = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    for i, row in enumerate(rows, 1):
        games = row.get("games")
        if "question_id" not in row or "model" not in row or not isinstance(games, list) or not games:
            raise ConfigError(
                f"{path}:{i}: expected 'question_id', 'model' and a non-empty 'games' list (arena-hard-auto's "
                f"judgment layout); got keys {sorted(row)}"
            )
        if not all(isinstance(g, dict) for g in games):
            raise ConfigError(f"{path}:{i}: every game must be an object with a 'score'")
    return rows


def battles_from_judgments(
    rows: list[dict[str, Any]], baseline: str, with_question: bool = False
) -> list[tuple]:
    """(model_a, model_b, winner) battles, winner in {model_a, model_b, tie}; game 2 has the positions swapped.
    `with_question` appends the question_id (style control needs each battle's two answers)."""
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
            battle = (
                (baseline, model, winner, str(row["question_id"]))
                if with_question
                else (baseline, model, winner)
            )
            out += [battle] * weight
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


def _row(model: str, rating: float, low: float, high: float) -> dict[str, Any]:
    """One leaderboard row: ratings (baseline = 1000) and the score (% vs the baseline) with its interval."""
    sc, lo, hi = score(rating), score(low), score(high)
    return {"model": model, "score": round(sc, 1), "rating": round(rating, 1), "rating_q025": round(low, 1),
            "rating_q975": round(high, 1), "score_q025": round(lo, 1), "score_q975": round(hi, 1),
            "CI": f"(-{round(sc - lo, 1)}, +{round(hi - sc, 1)})"}  # fmt: skip


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
        boot = [x[model] for x in samples if model in x]
        low, high = (np.percentile(boot, 2.5), np.percentile(boot, 97.5)) if boot else (rating, rating)
        rows.append(_row(model, rating, low, high))
    return sorted(rows, key=lambda r: -r["score"])


def _style_vector(meta: dict[str, Any]) -> np.ndarray:
    counts = [sum(meta[k].values()) for k in ("header_count", "list_count", "bold_count")]
    return np.array([meta["token_len"], *counts], dtype=float)


def style_features(model_meta: dict[str, Any], baseline_meta: dict[str, Any]) -> np.ndarray:
    """arena-hard-auto's style features: relative length difference and markdown-density differences."""
    m, b = _style_vector(model_meta), _style_vector(baseline_meta)
    md, bd = m[1:] / max(m[0], 1.0), b[1:] / max(b[0], 1.0)
    return np.array([(m[0] - b[0]) / max(m[0] + b[0], 1.0), *((md - bd) / (md + bd + 1))])


def style_controlled_leaderboard(
    rows: list[dict], answers: dict[str, dict], baseline: str, n_bootstrap: int = 100, seed: int = 0
) -> list[dict]:
    """Bradley-Terry with style covariates: one coefficient per model (baseline = 0) plus four style ones;
    a model's score is its win rate against the baseline at equal length and markdown density."""
    from sklearn.linear_model import LogisticRegression

    battles = battles_from_judgments(rows, baseline, with_question=True)
    models = sorted({b[1] for b in battles})
    x = np.zeros((len(battles), len(models) + 4))
    y = np.array([{"model_b": 1.0, "model_a": 0.0, "tie": 0.5}[w] for _, _, w, _ in battles])
    for k, (_, model, _, qid) in enumerate(battles):
        try:
            x[k, len(models) :] = style_features(answers[model][qid]["meta"], answers[baseline][qid]["meta"])
        except (KeyError, TypeError):
            raise ConfigError(
                f"style_control: no token_len/markdown counts for {model} or {baseline} on {qid}"
            ) from None
        x[k, models.index(model)] = 1.0
    style = x[:, len(models) :]
    std = style.std(axis=0)
    x[:, len(models) :] = np.where(std > 0, (style - style.mean(axis=0)) / np.where(std > 0, std, 1), 0.0)

    def fit(idx: np.ndarray) -> np.ndarray:  # a tie is half a win and half a loss
        xs = np.concatenate([x[idx], x[idx]])
        ys = np.concatenate([np.ones(len(idx)), np.zeros(len(idx))])
        weights = np.concatenate([y[idx], 1 - y[idx]])
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)
        lr.fit(xs, ys, sample_weight=weights)
        return lr.coef_[0][: len(models)]

    to_rating = lambda coef: 1000.0 + 400.0 * coef / math.log(10)  # noqa: E731
    ratings = to_rating(fit(np.arange(len(battles))))
    rng = np.random.default_rng(seed)
    boots = np.array(
        [to_rating(fit(rng.integers(0, len(battles), len(battles)))) for _ in range(n_bootstrap)]
    )
    table = [_row(baseline, 1000.0, 1000.0, 1000.0)]
    for j, model in enumerate(models):
        low, high = np.percentile(boots[:, j], [2.5, 97.5]) if n_bootstrap else (ratings[j], ratings[j])
        table.append(_row(model, float(ratings[j]), float(low), float(high)))
    return sorted(table, key=lambda r: -r["score"])


@dataclass
class ArenaHardConfig:
    # model_answer dirs (one <model>.jsonl per model, the baseline's included); several dirs may share the job
    answers: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # answer files to judge; default: all but the baseline
    questions: str | None = None  # default: lmarena-ai/arena-hard-auto-v0.1 (500 questions)
    max_questions: int | None = None
    baseline: str = "gpt-4-0314"
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=4096, logprobs=None))
    judgments: str | None = None  # only score these arena-hard-auto judgment files (no judging)
    style_control: bool = False  # add length and markdown-density features to the Bradley-Terry fit
    n_bootstrap: int = 100
    seed: int = 0
    output_dir: str | None = (
        None  # default with one answers dir: its parent (arena-hard-auto's data/<bench>/)
    )


def read_answers(path: Path) -> dict[str, dict[str, Any]]:
    """One arena-hard-auto v0.1 answer file -> {question_id: {"text", "token_len", "meta"}}."""
    answers = {}
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            turn = row["choices"][0]["turns"][0]
            qid = str(row["question_id"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"{path}:{i}: expected question_id and choices[0].turns[0] (arena-hard-auto)"
            ) from None
        if qid in answers:
            raise ConfigError(f"{path}:{i}: question_id {qid!r} answered twice")
        text = turn["content"] if isinstance(turn, dict) else turn
        token_len = turn.get("token_len") if isinstance(turn, dict) else None
        meta = row.get("conv_metadata") or (style_metadata(text, token_len) if token_len else None)
        answers[qid] = {"text": text, "token_len": token_len, "meta": meta}
    return answers


def answer_files(dirs: list[str]) -> dict[str, Path]:
    """{model: its answer file} over every directory; one model answering in two places is ambiguous."""
    files: dict[str, Path] = {}
    for d in dirs:
        found = sorted(Path(d).glob("*.jsonl"))
        if not found:
            raise ConfigError(f"answers: no .jsonl answer files in '{d}'")
        for p in found:
            if p.stem in files:
                raise ConfigError(f"answers: {p.stem} has two answer files, {files[p.stem]} and {p}")
            files[p.stem] = p
    return files


def judge_model(
    cfg: ArenaHardConfig, model: str, questions: list[dict], answers: dict, judge: Judge
) -> list[dict]:
    """Both games of every question: game 1 shows the baseline as A, game 2 shows it as B."""
    base, mine = answers[cfg.baseline], answers[model]
    conversations = []
    for q in questions:
        for a, b in ((base, mine), (mine, base)):
            user = JUDGE_TEMPLATE.format(
                question_1=q["turns"][0], answer_1=a[q["id"]]["text"], answer_2=b[q["id"]]["text"]
            )
            conversations.append(
                [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
            )
    verdicts = judge.ask(conversations, lambda c: parse_verdict(c.text), desc=f"arena_hard judge {model}")
    rows = []
    for k, q in enumerate(questions):
        games = [
            {
                "user_prompt": conversations[2 * k + g][1]["content"],
                "judgment": v.completion.text if v.completion else None,
                "score": v.value,
                **({"error": v.error} if v.error else {}),
            }
            for g, v in enumerate(verdicts[2 * k : 2 * k + 2])
        ]
        rows.append({"question_id": q["id"], "model": model, "judge": cfg.judge.model, "games": games})
    return rows


def run(cfg: ArenaHardConfig) -> dict[str, Any]:
    """Judge every model's answers against the baseline's, then score them."""
    if not cfg.output_dir and len(cfg.answers) > 1:
        raise ConfigError("output_dir is required when answers lists several directories")
    out = Path(cfg.output_dir or Path(cfg.answers[0]).parent)
    prepare_output_dir(
        out / "arena_hard", resolved(cfg), may_differ=("n_bootstrap", "style_control", "models")
    )
    all_questions = load_questions("arena_hard", cfg.questions)
    questions = all_questions[: cfg.max_questions] if cfg.max_questions else all_questions
    files = answer_files(cfg.answers)
    models = cfg.models or [m for m in files if m != cfg.baseline]
    for name in [cfg.baseline, *models]:
        if name not in files:
            raise ConfigError(
                f"answers: no {name}.jsonl in {', '.join(cfg.answers)} (found: {sorted(files)})"
            )
    answers = {name: read_answers(files[name]) for name in [cfg.baseline, *models]}
    wanted, known = {q["id"] for q in questions}, {q["id"] for q in all_questions}
    for name, by_id in answers.items():  # keyed by question_id, so order is free (arena-hard-auto sorts them)
        got = [i for i in by_id if i in wanted or i not in known]
        check_same_questions([q["id"] for q in questions], got, str(files[name]), ordered=False)
    judge = Judge(cfg.judge, out / "arena_hard" / "judge_cache.sqlite")
    judge_dir = out / "model_judgment" / Path(cfg.judge.model.rstrip("/")).name
    rows = []
    for model in models:
        judged = judge_model(cfg, model, questions, answers, judge)
        write_jsonl(judge_dir / f"{model}.jsonl", judged)
        rows += judged
    judge.close()
    result = score_judgments(rows, cfg, answers)
    result["judge_calls"] = judge.stats.as_dict()
    write_outputs(result, out / "arena_hard")
    return result


def score_judgments(
    rows: list[dict], cfg: ArenaHardConfig, answers: dict[str, dict] | None = None
) -> dict[str, Any]:
    """The leaderboard (plain or style-controlled) plus counts of games without a verdict."""
    battles = battles_from_judgments(rows, cfg.baseline)
    if not battles:
        raise ConfigError(
            "no judgment has a verdict: nothing to score (see the `error` fields in the judgments)"
        )
    if cfg.style_control:
        if not answers:
            raise ConfigError(
                "style_control needs the answer files (answers=DIR) for lengths and markdown counts"
            )
        table = style_controlled_leaderboard(rows, answers, cfg.baseline, cfg.n_bootstrap, cfg.seed)
    else:
        table = leaderboard(battles, cfg.baseline, cfg.n_bootstrap, cfg.seed)
    for row in table:
        lens = [
            a["token_len"]
            for a in (answers or {}).get(row["model"], {}).values()
            if a["token_len"] is not None
        ]
        row["avg_tokens"] = round(float(np.mean(lens)), 1) if lens else None
    unparsed = {}
    for r in rows:
        n = sum(1 for g in r["games"][:2] if g.get("score") not in LABELS)
        unparsed[r["model"]] = unparsed.get(r["model"], 0) + n
    return {"leaderboard": table, "unparsed_games": unparsed, "style_control": cfg.style_control}


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """arena-hard-auto's leaderboard CSV columns, results.json, and scores.jsonl for eval.leaderboard."""
    import csv
    import io

    columns = ["model", "score", "rating_q025", "rating_q975", "CI", "avg_tokens"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result["leaderboard"])
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    atomic_write_json(out / "results.json", result)
    metric = "score_style_controlled" if result.get("style_control") else "score"
    write_scores(
        out,
        [
            score_row(r["model"], "arena_hard", metric, r["score"], r["score_q025"], r["score_q975"])
            for r in result["leaderboard"]
        ],
    )


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("eval", argv, ArenaHardConfig)
    if cfg.judgments:
        files = sorted(Path(cfg.judgments).glob("*.jsonl"))
        if not files:
            raise ConfigError(f"judgments: no .jsonl files in '{cfg.judgments}'")
        rows = [r for f in files for r in read_judgments(f)]
        answers = None
        if cfg.answers:
            answers = {name: read_answers(p) for name, p in answer_files(cfg.answers).items()}
        result = score_judgments(rows, cfg, answers)
        if cfg.output_dir:
            write_outputs(result, Path(cfg.output_dir))
    elif cfg.answers:
        result = run(cfg)
    else:
        raise ConfigError("give answers=DIR (judge and score) or judgments=DIR (score existing judgments)")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

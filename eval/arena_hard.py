"""Arena-Hard (v0.1, the paper's, and v2.0) with any judge, in arena-hard-auto's file formats.

    python -m eval.arena_hard answers=DIR[,DIR...] [baseline=gpt-4-0314] [judge.model=...] [style_control=true]
    python -m eval.arena_hard recipe=arena_hard_v2 answers=DIR[,DIR...]
    python -m eval.arena_hard judgments=DIR/model_judgment/JUDGE [answers=...] [n_bootstrap=100] [output_dir=DIR]
                                                                             (results in DIR/arena_hard/)

`answers` are model_answer directories holding one arena-hard-auto answer file per model (eval.generate
bench=arena_hard writes them), the baselines' included; both of arena-hard-auto's layouts are read (v2:
uid/messages, since April 2025; v0.1: question_id/choices). Every question is judged twice with arena-hard-auto's
judge prompt for its category: game 1 shows the baseline as A, game 2 as B. Verdicts become battles (">>" counts
as 3), a Bradley-Terry model anchors the baseline at 1000, and each model's score is its expected win rate against
the baseline (%) with a 95% bootstrap interval; `style_control=true` adds arena-hard-auto's length and
markdown-density features to the fit, so the score is what remains at equal style. Questions of several categories
(v2.0: hard_prompt, creative_writing) are scored per category, each against its own baseline
(`category_baselines`). Writes `arena_hard/model_judgment/<judge>/<model>.jsonl` (`layout=v2`, the default, or `v0.1`) and
`arena_hard/leaderboard.csv` as arena-hard-auto's pre-v2.0 show_result.py --output wrote it (v2.0 writes no CSV).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.config import ConfigError, cli, load_config, resolved
from core.io import atomic_write_json, read_jsonl, write_jsonl
from core.judge import Judge, JudgeConfig
from core.rundir import prepare_output_dir
from eval.bootstrap import bootstrap, interval
from eval.generate import check_same_questions, load_questions, style_metadata
from eval.scores import score_row, write_scores, write_table

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
# Creative writing (Arena-Hard v2.0) is judged without the judge's own answer (utils/judge_utils.py, verbatim).
CREATIVE_SYSTEM = JUDGE_SYSTEM.replace(
    "Begin your evaluation by generating your own answer to the prompt. You must provide your answers before "
    "judging any answers.\n\n",
    "",
).replace("compare both assistants' answers with your answer.", "compare both assistants' answers.")
JUDGE_TEMPLATE = (
    "<|User Prompt|>\n{question_1}\n\n<|The Start of Assistant A's Answer|>\n{answer_1}\n"
    "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_2}\n"
    "<|The End of Assistant B's Answer|>"
)
LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
_DOUBLE = re.compile(r"\[\[([AB<>=]+)\]\]")
_SINGLE = re.compile(r"\[([AB<>=]+)\]")
STRONG_WEIGHT = 3  # a decisive verdict counts as three battles, as in arena-hard-auto


# arena-hard-auto HEAD also scores the mirrored spellings (show_result.py:37-48, label_to_score); read as these
MIRRORED = {"B<<A": "A>>B", "B<A": "A>B", "B=A": "A=B", "A<B": "B>A", "A<<B": "B>>A"}


def parse_verdict(text: str, layout: str = "v2") -> str | None:
    """The judge's verdict as the arena-hard-auto version whose layout is written reads it, or None.

    v2, HEAD gen_judgment.py:21-31 (get_score) with config/arena-hard-v2.0.yaml's regex_patterns: the reply
    upper-cased, the last match of the first pattern that matches ([[...]], then [...]); a mirrored label is its
    plain one, and a match that is no label is no verdict (HEAD would fail on it). v0.1, gen_judgment.py:22-32 at
    3071ef9 with its one pattern (double brackets): the reply as written, and a verdict only when every [[...]]
    match is the same label."""
    if layout == "v0.1":
        found = {m for m in _DOUBLE.findall(text) if m}
        return next(iter(found)) if len(found) == 1 and next(iter(found)) in LABELS else None
    upper = text.upper()
    for pattern in (_DOUBLE, _SINGLE):
        found = [m for m in pattern.findall(upper) if m]
        if found:
            label = found[-1].strip("\n")
            return label if label in LABELS else MIRRORED.get(label)
    return None


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """arena-hard-auto `model_judgment/<judge>/<model>.jsonl` in either layout, as {question_id, model, category,
    baseline, games}: v2 rows carry uid/category/baseline (a failed game is null), v0.1 rows question_id."""
    try:
        rows = read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    out = []
    for i, row in enumerate(rows, 1):
        games = row.get("games")
        qid = row.get("uid", row.get("question_id"))
        if qid is None or "model" not in row or not isinstance(games, list) or not games:
            raise ConfigError(
                f"{path}:{i}: expected 'uid' (or v0.1's 'question_id'), 'model' and a non-empty 'games' list "
                f"(arena-hard-auto's judgment layout); got keys {sorted(row)}"
            )
        if not all(g is None or isinstance(g, dict) for g in games):
            raise ConfigError(f"{path}:{i}: every game must be an object with a 'score' (or null)")
        out.append({**normalized(row), "where": f"{path}:{i}"})
    return out


def check_unique(rows: list[dict[str, Any]]) -> None:
    """One judgment per (model, question, baseline): the same one twice (a copy of a file under another name, a
    re-run appended) would be counted twice, so it is an error naming both places."""
    seen: dict[tuple, str] = {}
    for r in rows:
        key = (r["model"], r["question_id"], r.get("baseline"))
        if key in seen:
            raise ConfigError(
                f"the judgment of {r['model']} on question {r['question_id']!r} appears twice: "
                f"{seen[key]} and {r['where']}; keep one of them"
            )
        seen[key] = r["where"]


def normalized(row: dict[str, Any]) -> dict[str, Any]:
    """One judgment row, either layout, as scoring reads it."""
    v2 = "uid" in row
    games = [g if isinstance(g, dict) else {"score": None} for g in row["games"]]
    return {
        "question_id": str(row.get("uid", row.get("question_id"))),
        "model": row["model"],
        "category": row.get("category"),
        "baseline": row.get("baseline"),
        "layout": "v2" if v2 else "v0.1",
        # HEAD scores mirrored labels (B<A is A>B); pre-v2.0 scores only the five plain ones
        "games": [{**g, "score": MIRRORED.get(g.get("score"), g.get("score"))} if v2 else g for g in games],
    }


def battles_from_judgments(
    rows: list[dict[str, Any]], baseline: str, with_question: bool = False
) -> list[tuple]:
    """(model_a, model_b, winner) battles, winner in {model_a, model_b, tie}; game 2 has the positions swapped.
    A row's own baseline (v2 judgments name it) wins over `baseline`. `with_question` appends the question_id
    (style control needs each battle's two answers)."""
    out = []
    for row in rows:
        model, base = row["model"], row.get("baseline") or baseline
        if row.get("layout") == "v2" and not all(g.get("score") in LABELS for g in row["games"][:2]):
            # HEAD show_result.py:31-34 drops the whole question when either game has no verdict ("null
            # judgments"); pre-v2.0 (show_result.py:25-100 at 3071ef9) drops only that game (weight 0)
            continue
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
                (base, model, winner, str(row["question_id"])) if with_question else (base, model, winner)
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
    # no regularization (sklearn >= 1.8 spelling of penalty=None), and compute_mle_elo's tolerance
    lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-8)
    lr.fit(np.array(rows), np.array(labels), sample_weight=np.array(weights))
    ratings = scale * lr.coef_[0] + init
    ratings += init - ratings[index[baseline]]
    return dict(zip(models, ratings.tolist(), strict=True))


def score(rating: float, baseline_rating: float = 1000.0) -> float:
    """Expected win rate (%) against the baseline."""
    return 100.0 / (1.0 + 10 ** ((baseline_rating - rating) / 400.0))


def _row(model: str, rating: float, low: float, high: float) -> dict[str, Any]:
    """One leaderboard row as arena-hard-auto's pre-v2.0 show_result.py writes it: score and its 95% interval as
    win rates against the baseline (%), 2 decimals, under its names; the Elo ratings (baseline = 1000) apart."""
    sc, lo, hi = score(rating), score(low), score(high)
    return {
        "model": model,
        "score": round(sc, 2),
        "rating_q025": round(lo, 2),
        "rating_q975": round(hi, 2),
        "CI": f"(-{sc - lo:.2f}, +{hi - sc:.2f})",
        "elo": round(rating, 1),
        "elo_q025": round(low, 1),
        "elo_q975": round(high, 1),
    }


def leaderboard(
    battles: list[tuple[str, str, str]], baseline: str, n_bootstrap: int = 100, seed: int = 42
) -> list[dict]:
    ratings = bradley_terry(battles, baseline)
    # The draws of arena-hard-auto before v2.0 (3071ef9): utils_math.py:10 seeds numpy's global generator with 42
    # at import, and utils_math.py:78 resamples with `battles.sample(frac=1.0, replace=True)`, which is
    # RandomState.choice(n, n, replace=True) per round. With the same battles in the same order (judgment files in
    # the order read, game 1 then game 2, a decisive verdict three times), the intervals are its intervals.
    # (HEAD draws unseeded; any seed is as good there.)
    samples = bootstrap(
        len(battles),
        n_bootstrap,
        lambda idx: bradley_terry([battles[i] for i in idx], baseline),
        np.random.RandomState(seed),
    )
    rows = []
    for model, rating in ratings.items():
        boot = [x[model] for x in samples if model in x]
        low, high = interval(boot) if boot else (rating, rating)
        rows.append(_row(model, rating, low, high))
    return sorted(rows, key=lambda r: -r["score"])


def _style_vector(meta: dict[str, Any]) -> np.ndarray:
    counts = [sum(meta[k].values()) for k in ("header_count", "list_count", "bold_count")]
    return np.array([meta["token_len"], *counts], dtype=float)


def style_features(model_meta: dict[str, Any], baseline_meta: dict[str, Any]) -> np.ndarray:
    """arena-hard-auto's style features: relative length difference and markdown-density differences."""
    m, b = _style_vector(model_meta), _style_vector(baseline_meta)
    # HEAD show_result.py:150-163: markdown counts per (token_len + 1), then (m - b) / (m + b + 1)
    md, bd = m[1:] / (m[0] + 1), b[1:] / (b[0] + 1)
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
    boots = np.array(
        bootstrap(len(battles), n_bootstrap, lambda idx: to_rating(fit(idx)), np.random.default_rng(seed))
    )
    lows, highs = interval(boots, axis=0)
    table = [_row(baseline, 1000.0, 1000.0, 1000.0)]
    for j, model in enumerate(models):
        table.append(_row(model, float(ratings[j]), float(lows[j]), float(highs[j])))
    return sorted(table, key=lambda r: -r["score"])


@dataclass
class ArenaHardConfig:
    # model_answer dirs (one <model>.jsonl per model, the baselines' included); several dirs may share the job
    answers: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # answer files to judge; default: all but the baselines
    bench: Literal["arena_hard", "arena_hard_v2"] = "arena_hard"  # default questions: v0.1 or v2.0
    questions: str | None = None  # local question.jsonl (either layout) or Hub dataset; default: the bench's
    max_questions: int | None = None
    baseline: str = "gpt-4-0314"
    # A baseline per question category, where it differs from `baseline` (Arena-Hard v2.0: hard_prompt ->
    # o3-mini-2025-01-31, creative_writing -> gemini-2.0-flash-001, arena-hard-auto's utils/judge_utils.py)
    category_baselines: dict[str, str] = field(default_factory=dict)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=4096, logprobs=None))
    layout: Literal["v2", "v0.1"] = "v2"  # judgment files: current arena-hard-auto's or pre-v2.0's
    judgments: str | None = None  # only score these arena-hard-auto judgment files (no judging)
    style_control: bool = False  # add length and markdown-density features to the Bradley-Terry fit
    n_bootstrap: int = 100
    seed: int = 42  # arena-hard-auto's before v2.0: with it, v0.1 intervals are show_result.py's own
    # default with one answers dir: its parent (arena-hard-auto's data/<bench>/)
    output_dir: str | None = None


def baseline_of(cfg: ArenaHardConfig, category: str | None) -> str:
    return cfg.category_baselines.get(category or "", cfg.baseline)


def read_answers(path: Path) -> dict[str, dict[str, Any]]:
    """One arena-hard-auto answer file, v2 (uid, messages, metadata) or v0.1 (question_id, choices,
    conv_metadata) -> {question_id: {"text", "token_len", "meta"}}."""
    answers = {}
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            if "uid" in row:  # v2: the answer is the last message's content, {"answer": ...} or a string
                qid, content, meta = str(row["uid"]), row["messages"][-1]["content"], row.get("metadata")
                text = content["answer"] if isinstance(content, dict) else content
                token_len = (meta or {}).get("token_len")
            else:
                qid, turn, meta = (
                    str(row["question_id"]),
                    row["choices"][0]["turns"][0],
                    row.get("conv_metadata"),
                )
                text = turn["content"] if isinstance(turn, dict) else turn
                token_len = turn.get("token_len") if isinstance(turn, dict) else None
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"{path}:{i}: expected arena-hard-auto's uid and messages[-1].content (v2), or question_id and "
                "choices[0].turns[0] (v0.1)"
            ) from None
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{i}: the answer must be a string, got {type(text).__name__}")
        if qid in answers:
            raise ConfigError(f"{path}:{i}: question {qid!r} answered twice")
        if token_len is None and meta:
            token_len = meta.get("token_len")
        meta = meta or (style_metadata(text, token_len) if token_len else None)
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
    """Both games of every question, in the `layout` asked for: game 1 shows the baseline as A, game 2 as B."""
    conversations = []
    for q in questions:
        base, mine = answers[baseline_of(cfg, q["category"])], answers[model]
        system = CREATIVE_SYSTEM if q["category"] == "creative_writing" else JUDGE_SYSTEM
        for a, b in ((base, mine), (mine, base)):
            user = JUDGE_TEMPLATE.format(
                question_1=q["turns"][0], answer_1=a[q["id"]]["text"], answer_2=b[q["id"]]["text"]
            )
            conversations.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
    verdicts = judge.ask(
        conversations, lambda c: parse_verdict(c.text, cfg.layout), desc=f"arena_hard judge {model}"
    )
    rows = []
    for k, q in enumerate(questions):
        games = []
        for g, v in enumerate(verdicts[2 * k : 2 * k + 2]):
            text = v.completion.text if v.completion else None
            game = (
                {"score": v.value, "judgment": {"answer": text}, "prompt": conversations[2 * k + g]}
                if cfg.layout == "v2"  # gen_judgment.py since v2.0
                else {
                    "user_prompt": conversations[2 * k + g][1]["content"],
                    "judgment": text,
                    "score": v.value,
                }
            )
            games.append(
                {
                    **game,
                    **({"error": v.error} if v.error else {}),
                    **({"missing": True} if v.missing else {}),
                }
            )
        if cfg.layout == "v2":
            row = {
                "uid": q["id"],
                "category": q["category"],
                "judge": cfg.judge.model,
                "model": model,
                "baseline": baseline_of(cfg, q["category"]),
                "games": games,
            }
        else:
            row = {"question_id": q["id"], "model": model, "judge": cfg.judge.model, "games": games}
        rows.append(row)
    return rows


def run(cfg: ArenaHardConfig) -> dict[str, Any]:
    """Judge every model's answers against the baseline's, then score them."""
    if not cfg.output_dir and len(cfg.answers) > 1:
        raise ConfigError("output_dir is required when answers lists several directories")
    files = answer_files(cfg.answers)  # before anything is written: a wrong path leaves no trace
    out = Path(cfg.output_dir or Path(cfg.answers[0]).parent)
    prepare_output_dir(
        out / "arena_hard",
        resolved(cfg),
        command="eval.arena_hard",
        inputs=(*cfg.answers, cfg.questions, cfg.judge.model),
        recomputed=True,
    )
    all_questions = load_questions(cfg.bench, cfg.questions)
    questions = all_questions[: cfg.max_questions] if cfg.max_questions else all_questions
    baselines = sorted({baseline_of(cfg, q["category"]) for q in questions})
    models = cfg.models or [m for m in files if m not in baselines]
    for name in [*baselines, *models]:
        if name not in files:
            raise ConfigError(
                f"answers: no {name}.jsonl in {', '.join(cfg.answers)} (found: {sorted(files)})"
            )
    answers = {name: read_answers(files[name]) for name in [*baselines, *models]}
    wanted, known = {q["id"] for q in questions}, {q["id"] for q in all_questions}
    for name, by_id in answers.items():  # keyed by question_id, so order is free (arena-hard-auto sorts them)
        got = [i for i in by_id if i in wanted or i not in known]
        check_same_questions([q["id"] for q in questions], got, str(files[name]), ordered=False)
    judge = Judge(cfg.judge, out / "arena_hard" / "judge_cache.sqlite")
    # Inside the directory this run claimed: beside the answers (arena-hard-auto's own data directory, often) it
    # could replace judgment files we did not write
    judge_dir = out / "arena_hard" / "model_judgment" / Path(cfg.judge.model.rstrip("/")).name
    rows = []
    for model in models:
        judged = judge_model(cfg, model, questions, answers, judge)
        # Games the judge never answered are no verdicts: past the tolerated share none is written (a re-run asks)
        missing = sum(bool(g.get("missing")) for r in judged for g in r["games"])
        judge.raise_for_outages(missing, 2 * len(judged), f"games of {model}")
        write_jsonl(judge_dir / f"{model}.jsonl", judged)
        # v0.1's layout has no category or baseline on the row: take them from the question
        rows += [
            {**normalized(r), "category": q["category"], "baseline": baseline_of(cfg, q["category"])}
            for r, q in zip(judged, questions, strict=True)
        ]
    judge.close()
    result = score_judgments(rows, cfg, answers)
    result["judge_calls"] = judge.stats.as_dict()
    write_outputs(result, out / "arena_hard")
    return result


def score_judgments(
    rows: list[dict], cfg: ArenaHardConfig, answers: dict[str, dict] | None = None
) -> dict[str, Any]:
    """A leaderboard (plain or style-controlled) per question category, each against its own baseline, plus
    counts of games without a verdict. `leaderboard` is hard_prompt's where there is one, else the only one."""
    by_category: dict[str, list[dict]] = {}
    for r in rows:
        by_category.setdefault(r.get("category") or "", []).append(r)
    tables, unscored = {}, []
    for category, group in by_category.items():
        named = {r["baseline"] for r in group if r.get("baseline")}
        if len(named) > 1:
            raise ConfigError(f"judgments of category {category!r} name several baselines: {sorted(named)}")
        baseline = named.pop() if named else baseline_of(cfg, category)
        if any(
            g.get("score") in LABELS for r in group for g in r["games"][:2]
        ):  # a verdict to build battles from
            tables[category] = _table(group, baseline, cfg, answers)
        else:
            unscored.append(category)
    if not tables:
        raise ConfigError(
            "no judgment has a verdict: nothing to score (see the `error` fields in the judgments)"
        )
    primary = "hard_prompt" if "hard_prompt" in tables else next(iter(tables))
    unparsed: dict[str, int] = {}
    missing: dict[str, int] = {}  # games the judge never answered (an outage within judge.max_engine_errors)
    dropped: dict[str, int] = {}  # v2: questions left out because a game has no verdict, as HEAD prints them
    for r in rows:
        unparsed.setdefault(r["model"], 0)
        if r.get("layout") == "v2" and not all(g.get("score") in LABELS for g in r["games"][:2]):
            dropped[r["model"]] = dropped.get(r["model"], 0) + 1
        for g in r["games"][:2]:
            if g.get("score") not in LABELS:
                tally = missing if g.get("missing") else unparsed
                tally[r["model"]] = tally.get(r["model"], 0) + 1
    result = {"leaderboard": tables[primary], "unparsed_games": unparsed, "style_control": cfg.style_control}
    if missing:
        result["missing_games"] = missing
    if dropped:
        result["null_judgments"] = dropped
    if len(tables) > 1:
        result["categories"] = tables
    if unscored:
        result["unscored_categories"] = unscored  # no game of theirs has a verdict
    return result


def _table(rows: list[dict], baseline: str, cfg: ArenaHardConfig, answers: dict | None) -> list[dict]:
    if cfg.style_control:
        if not answers:
            raise ConfigError(
                "style_control needs the answer files (answers=DIR) for lengths and markdown counts"
            )
        table = style_controlled_leaderboard(rows, answers, baseline, cfg.n_bootstrap, cfg.seed)
    else:
        table = leaderboard(battles_from_judgments(rows, baseline), baseline, cfg.n_bootstrap, cfg.seed)
    asked = {r["question_id"] for r in rows}
    for row in table:  # show_result.py: the mean token_len over the model's answers, truncated to an integer
        lens = [
            a["token_len"]
            for q, a in (answers or {}).get(row["model"], {}).items()
            if q in asked and a["token_len"] is not None
        ]
        row["avg_tokens"] = float(int(np.mean(lens))) if lens else None
    return table


CSV_COLUMNS = ["model", "score", "rating_q025", "rating_q975", "CI", "avg_tokens", "date"]


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """leaderboard.csv as arena-hard-auto's pre-v2.0 show_result.py --output writes it (one more per category
    where there are several), results.json, and scores.jsonl for eval.leaderboard."""
    tables = result.get("categories") or {"": result["leaderboard"]}
    date = time.strftime("%Y-%m-%d")
    suffix = "_style_controlled" if result.get("style_control") else ""
    scores = []
    for category, table in tables.items():
        name = "leaderboard.csv" if table is result["leaderboard"] else f"leaderboard_{category}.csv"
        write_table(out / name, [{**r, "date": date} for r in table], CSV_COLUMNS)
        metric = (f"{category}_score" if len(tables) > 1 else "score") + suffix
        scores += [
            score_row(r["model"], "arena_hard", metric, r["score"], r["rating_q025"], r["rating_q975"])
            for r in table
        ]
    atomic_write_json(out / "results.json", result)
    write_scores(out, scores)


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("arena_hard", argv, ArenaHardConfig)
    if cfg.judgments:
        files = sorted(Path(cfg.judgments).glob("*.jsonl"))
        if not files:
            raise ConfigError(f"judgments: no .jsonl files in '{cfg.judgments}'")
        rows = [r for f in files for r in read_judgments(f)]
        check_unique(rows)
        answers = None
        if cfg.answers:
            answers = {name: read_answers(p) for name, p in answer_files(cfg.answers).items()}
        result = score_judgments(rows, cfg, answers)
        if cfg.output_dir:  # where the judging mode writes, so both modes' results sit in one place
            out = Path(cfg.output_dir) / "arena_hard"
            prepare_output_dir(
                out,
                resolved(cfg),
                command="eval.arena_hard",
                inputs=(cfg.judgments, *cfg.answers),
                recomputed=True,
            )
            write_outputs(result, out)
    elif cfg.answers:
        result = run(cfg)
    else:
        raise ConfigError("give answers=DIR (judge and score) or judgments=DIR (score existing judgments)")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""MT-Bench judged as FastChat's llm_judge does it (gen_judgment.py + show_result.py, lm-sys/FastChat 0e6d3e4).

    python -m eval.mt_bench answers=DIR_OR_FILE[,...] [models=[a,b]] judge.model=... output_dir=OUT
    python -m eval.mt_bench recipe=mt_bench_gpt4 answers=runs/eval/magpie/mt_bench/model_answer output_dir=OUT
    python -m eval.mt_bench mode=pairwise [baseline=gpt-3.5-turbo | baseline=null] answers=... output_dir=OUT
    python -m eval.mt_bench judgments=PATH/gpt-4_single.jsonl [output_dir=OUT]     (score FastChat's own files)

`answers` are FastChat `model_answer/<model>.jsonl` files (eval.generate bench=mt_bench writes them), or
directories of them. Single mode (FastChat's default) grades every answer 1-10, both turns: turn 1 with
`single-v1`, turn 2 with `single-v1-multi-turn` on the whole two-turn conversation, and math, reasoning and coding
questions with the `single-math-v1*` prompts, which show GPT-4's reference answers. The judge is asked with
FastChat's system prompt and prompt, temperature 0 and 2048 tokens; the rating is the first `[[N]]` (else `[N]`)
of its reply, -1 when there is none (kept in the file, left out of the means, as show_result.py does). The
MT-Bench score is the mean of every rating of both turns; `score_turn1` and `score_turn2` the means per turn,
each with a 95% bootstrap interval over questions.

Pairwise mode judges both orders of every (model, baseline) pair (`baseline=null`: every pair of models) with
`pair-v2`, `pair-v2-multi-turn` and the `pair-math-v1*` prompts, and scores as show_result.py: a question is a win
only when both orders agree, else a tie; `win_rate_adjusted` = (win + tie / 2) / all.

Writes `<output_dir>/mt_bench/model_judgment/<judge>_single.jsonl` (or `_pair.jsonl`) with FastChat's fields, so
its show_result.py reads it (`--input-file`, or by default from `<output_dir>/..` when output_dir is named
`data`), plus `scores.jsonl` for eval.leaderboard, `results.json` and `leaderboard.md` / `.csv`. Judgments are
reused by content: a row whose prompt (question, answers, reference) is unchanged is not asked again, an answer
edited since is.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.config import ConfigError, cli, load_config, resolved
from core.io import atomic_write_json, digest, read_jsonl, write_jsonl
from core.judge import Judge, JudgeConfig
from core.recipes import shipped
from core.rundir import prepare_output_dir
from eval.bootstrap import bootstrap, interval
from eval.scores import markdown_table, score_row, write_scores, write_table

DATA = "eval/data/mt_bench"  # FastChat's llm_judge data, verbatim (eval/data/mt_bench/README.md)
QUESTIONS = f"{DATA}/question.jsonl"
# FastChat looks the reference answers up by the judge's name (reference_answer/<judge>.jsonl), so only a judge
# called gpt-4 finds any. We use GPT-4's references whatever the judge, as people do who judge with other models
# (instructlab, ...); reference_answers=PATH chooses another file.
REFERENCE_ANSWERS = f"{DATA}/reference_answer/gpt-4.jsonl"
JUDGE_PROMPTS = f"{DATA}/judge_prompts.jsonl"
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")  # common.py
# (reference-based, multi-turn) -> FastChat's prompt (gen_judgment.py make_judge_single / make_judge_pairwise)
SINGLE_PROMPTS = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
PAIR_PROMPTS = {
    (False, False): "pair-v2",
    (True, False): "pair-math-v1",
    (False, True): "pair-v2-multi-turn",
    (True, True): "pair-math-v1-multi-turn",
}
# common.py's one_score_pattern and its backup: the first match wins, and a bare "[3]" (a citation, a list index)
# counts when no [[N]] is there; no range check (FastChat keeps a 0 or an 11).
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
SINGLE_FIELDS = ("question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp")
PAIR_FIELDS = ("question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
               "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp")  # fmt: skip


@dataclass
class MtBenchConfig:
    # FastChat model_answer files (<model>.jsonl: question_id, choices[0].turns) or directories of them
    answers: list[str] = field(default_factory=list)
    models: list[str] = field(
        default_factory=list
    )  # which to judge; default: every answer file (but the baseline)
    mode: Literal["single", "pairwise"] = "single"
    # pairwise: FastChat's pairwise-baseline against this model's answers; null: pairwise-all (every pair)
    baseline: str | None = "gpt-3.5-turbo"
    questions: str | None = None  # FastChat question.jsonl; default: the 80 shipped in eval/data/mt_bench
    reference_answers: str | None = None  # FastChat answer file of references; default: GPT-4's (shipped)
    question_ids: list[str] = field(default_factory=list)  # only these questions (e.g. [81, 111])
    max_questions: int | None = None  # the first N (after question_ids)
    # FastChat's OpenAI judging: temperature 0, 2048 tokens, one attempt (an unreadable reply is -1, not re-asked)
    judge: JudgeConfig = field(
        default_factory=lambda: JudgeConfig(
            model="gpt-4", max_tokens=2048, temperature=0.0, logprobs=None, retries=0
        )
    )
    judgments: str | None = None  # only score this FastChat judgment file (_single or _pair); no judging
    n_bootstrap: int = 1000
    seed: int = 0
    # default with one answers directory (or files in one): the directory above it; results in <output_dir>/mt_bench
    output_dir: str | None = None


# ---------------------------------------------------------------------------------------------------- inputs


def _rows(path: str | Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def load_prompts(path: str = JUDGE_PROMPTS) -> dict[str, dict[str, Any]]:
    """FastChat's judge_prompts.jsonl by name: system_prompt, prompt_template, type, output_format."""
    return {row["name"]: row for row in _rows(shipped(path))}


def read_questions(path: str) -> list[dict[str, Any]]:
    """FastChat's question.jsonl: question_id, category, turns (reference, where present, is not used for judging:
    FastChat's code never reads it)."""
    questions, seen = [], set()
    for i, row in enumerate(_rows(path), 1):
        turns = row.get("turns")
        if (
            "question_id" not in row
            or not isinstance(row.get("category"), str)
            or not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, str) for t in turns)
        ):
            raise ConfigError(
                f"{path}:{i}: expected FastChat's question_id, category and a non-empty 'turns' list of strings"
            )
        if str(row["question_id"]) in seen:
            raise ConfigError(f"{path}:{i}: question_id {row['question_id']!r} appears twice")
        seen.add(str(row["question_id"]))
        questions.append(row)
    if not questions:
        raise ConfigError(f"{path}: no questions")
    return questions


def hub_prompt_id(turns: list[str]) -> str:
    """HuggingFaceH4/mt_bench_prompts' prompt_id (its README: sha256 of the joined turns, mod 1e8): answers made
    from the Hub's questions (eval.generate's default) carry it; equal texts give equal ids."""
    return str(int(hashlib.sha256("".join(turns).encode("utf-8")).hexdigest(), 16) % (10**8))


def _turns(row: dict[str, Any]) -> list[str] | None:
    try:
        turns = row["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(turns, list):
        return None
    texts = [t["content"] if isinstance(t, dict) and "content" in t else t for t in turns]
    return texts if all(isinstance(t, str) for t in texts) else None


def read_answers(path: Path, questions: list[dict[str, Any]]) -> dict[str, list[str]]:
    """One FastChat answer file -> {question_id: the answer's turns}. An id that is no question of `questions`
    (FastChat's, or the Hub's prompt_id of the same text) is an error naming the line."""
    ids = {str(q["question_id"]): q for q in questions}
    hub = {hub_prompt_id(q["turns"]): str(q["question_id"]) for q in questions}
    answers: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    for i, row in enumerate(_rows(path), 1):
        turns = _turns(row)
        if "question_id" not in row or turns is None:
            raise ConfigError(
                f"{path}:{i}: expected FastChat's question_id and choices[0].turns (a list of strings)"
            )
        qid = str(row["question_id"])
        qid = qid if qid in ids else hub.get(qid, qid)
        if qid not in ids:
            raise ConfigError(
                f"{path}:{i}: question_id {row['question_id']!r} is not a question of the questions file "
                "(FastChat's ids 81-160, or the Hub's prompt_id of the same text); answer "
                f"questions={QUESTIONS} with eval.generate, or pass the questions answered as questions=PATH"
            )
        if qid in answers:
            raise ConfigError(f"{path}:{i}: question {qid} is answered twice (also on line {where[qid]})")
        answers[qid], where[qid] = turns, i
    return answers


def read_references(path: str) -> dict[str, list[str]]:
    refs = {}
    for i, row in enumerate(_rows(path), 1):
        turns = _turns(row)
        if "question_id" not in row or turns is None:
            raise ConfigError(f"{path}:{i}: expected FastChat's question_id and choices[0].turns")
        refs[str(row["question_id"])] = turns
    return refs


def answer_files(entries: list[str]) -> dict[str, Path]:
    """{model: its answer file}: a .jsonl file is one model (named by its stem, as FastChat names it), a directory
    holds one per model."""
    files: dict[str, Path] = {}
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise ConfigError(f"answers: no .jsonl answer files in '{entry}'")
        elif p.is_file():
            found = [p]
        else:
            raise ConfigError(f"answers: no such file or directory '{entry}'")
        for f in found:
            if f.stem in files and files[f.stem] != f:
                raise ConfigError(f"answers: {f.stem} has two answer files, {files[f.stem]} and {f}")
            files[f.stem] = f
    return files


def select_questions(cfg: MtBenchConfig, questions: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if cfg.question_ids:
        known = {str(q["question_id"]) for q in questions}
        unknown = [i for i in cfg.question_ids if str(i) not in known]
        if unknown:
            raise ConfigError(f"question_ids: {unknown} are not questions of {where}")
        wanted = {str(i) for i in cfg.question_ids}
        questions = [q for q in questions if str(q["question_id"]) in wanted]
    return questions[: cfg.max_questions] if cfg.max_questions else questions


def check_answered(path: Path, answers: dict[str, list[str]], questions: list[dict[str, Any]]) -> None:
    """FastChat's check_data: every question answered, with as many turns as it has."""
    missing = [str(q["question_id"]) for q in questions if str(q["question_id"]) not in answers]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ConfigError(f"{path}: no answer to question(s) {shown}")
    for q in questions:
        got = answers[str(q["question_id"])]
        if len(got) < len(q["turns"]):
            raise ConfigError(
                f"{path}: question {q['question_id']} has {len(q['turns'])} turns, its answer {len(got)}"
            )


def check_references(path: str, refs: dict[str, list[str]], questions: list[dict[str, Any]]) -> None:
    for q in questions:
        if q["category"] in NEED_REF_CATS and len(refs.get(str(q["question_id"]), [])) < len(q["turns"]):
            raise ConfigError(
                f"{path}: no reference answer (for every turn) to question {q['question_id']} "
                f"({q['category']} questions are judged against one)"
            )


# ---------------------------------------------------------------------------------------------------- prompts


def needs_reference(question: dict[str, Any]) -> bool:
    return question["category"] in NEED_REF_CATS


def single_prompt(
    prompts: dict[str, dict], question: dict, answer: list[str], ref: list[str] | None, turn: int
) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) for one answer's turn, as common.py run_judge_single builds it."""
    uses_ref = needs_reference(question)
    template = prompts[SINGLE_PROMPTS[(uses_ref, turn == 2)]]
    kwargs = _ref_kwargs(ref if uses_ref else None, turn)
    if turn == 2:
        user = template["prompt_template"].format(
            question_1=question["turns"][0],
            question_2=question["turns"][1],
            answer_1=answer[0],
            answer_2=answer[1],
            **kwargs,
        )
    else:
        user = template["prompt_template"].format(question=question["turns"][0], answer=answer[0], **kwargs)
    return template["name"], template["system_prompt"], user


def pair_prompt(
    prompts: dict[str, dict], question: dict, a: list[str], b: list[str], ref: list[str] | None, turn: int
) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) with `a` shown as assistant A, as common.py run_judge_pair."""
    uses_ref = needs_reference(question)
    template = prompts[PAIR_PROMPTS[(uses_ref, turn == 2)]]
    kwargs = _ref_kwargs(ref if uses_ref else None, turn)
    if turn == 2:
        user = template["prompt_template"].format(
            question_1=question["turns"][0],
            question_2=question["turns"][1],
            answer_a_1=a[0],
            answer_b_1=b[0],
            answer_a_2=a[1],
            answer_b_2=b[1],
            **kwargs,
        )
    else:
        user = template["prompt_template"].format(
            question=question["turns"][0], answer_a=a[0], answer_b=b[0], **kwargs
        )
    return template["name"], template["system_prompt"], user


def _ref_kwargs(ref: list[str] | None, turn: int) -> dict[str, str]:
    if ref is None:
        return {}
    return {"ref_answer_1": ref[0], **({"ref_answer_2": ref[1]} if turn == 2 else {})}


def parse_rating(text: str) -> int | float | None:
    """common.py's rating: the first [[N]], else the first [N], as a Python literal (7 -> int, 8.5 -> float); None
    where there is none (FastChat writes -1). "[[08]]", which literal_eval refuses (FastChat would crash), is 8."""
    match = ONE_SCORE.search(text) or ONE_SCORE_BACKUP.search(text)
    if not match:
        return None
    number = match.group(1)
    try:
        return ast.literal_eval(number)
    except (ValueError, SyntaxError):
        value = float(number)
        return int(value) if value.is_integer() and "." not in number else value


def parse_winner(text: str) -> str | None:
    """common.py's pairwise verdict: "[[A]]" anywhere, else "[[B]]", else "[[C]]" (a tie); None: "error"."""
    for label, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if label in text:
            return winner
    return None


def single_matches(
    questions: list[dict], models: list[str], answers: dict, refs: dict, prompts: dict, judge_name: str
) -> list[dict[str, Any]]:
    """Every (question, model, turn) to grade, in gen_judgment.py's order: turn 1 of the general questions, then of
    math/reasoning/coding, then turn 2 of each (turn 2 only for two-turn questions, as make_match_single)."""
    out = []
    for turn in (1, 2):
        for uses_ref in (False, True):
            for q in questions:
                if needs_reference(q) != uses_ref or (turn == 2 and len(q["turns"]) != 2):
                    continue
                qid = str(q["question_id"])
                for model in models:
                    name, system, user = single_prompt(prompts, q, answers[model][qid], refs.get(qid), turn)
                    row = {"question_id": q["question_id"], "model": model, "judge": [judge_name, name],
                           "user_prompt": user, "turn": turn}  # fmt: skip
                    out.append({"row": row, "system": system, "key": row_key(row)})
    return out


def pairs_of(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    if baseline is None:  # pairwise-all: make_match_all_pairs, i < j in model order
        return list(itertools.combinations(models, 2))
    return [(m, baseline) for m in models if m != baseline]  # pairwise-baseline: make_match


def pair_matches(
    questions: list[dict],
    pairs: list[tuple[str, str]],
    answers: dict,
    refs: dict,
    prompts: dict,
    judge_name: str,
) -> list[dict[str, Any]]:
    """Every (question, pair, turn) in gen_judgment.py's order; game 1 shows model_1 as A, game 2 as B."""
    out = []
    for turn in (1, 2):
        for uses_ref in (False, True):
            for q in questions:
                if needs_reference(q) != uses_ref or (turn == 2 and len(q["turns"]) != 2):
                    continue
                qid = str(q["question_id"])
                for m1, m2 in pairs:
                    a1, a2, ref = answers[m1][qid], answers[m2][qid], refs.get(qid)
                    name, system, g1 = pair_prompt(prompts, q, a1, a2, ref, turn)
                    _, _, g2 = pair_prompt(prompts, q, a2, a1, ref, turn)
                    row = {"question_id": q["question_id"], "model_1": m1, "model_2": m2,
                           "judge": [judge_name, name], "g1_user_prompt": g1, "g2_user_prompt": g2, "turn": turn}  # fmt: skip
                    out.append({"row": row, "system": system, "key": row_key(row)})
    return out


def row_key(row: dict[str, Any]) -> str:
    """What a judgment was computed from: the judge and its prompt, the models, the question and turn, and the user
    prompt itself (which holds the question, the answers and the reference): an edited answer is a new judgment."""
    models = [row["model"]] if "model" in row else [row["model_1"], row["model_2"]]
    prompt = row.get("user_prompt", row.get("g1_user_prompt"))
    return digest([json.dumps([list(row["judge"]), models, str(row["question_id"]), row["turn"]]), prompt])


def owner(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["model"],) if "model" in row else (row["model_1"], row["model_2"])


# ---------------------------------------------------------------------------------------------------- judging


def judge_name_of(cfg: MtBenchConfig) -> str:
    """The judge as FastChat names it in the file name and the rows (`gpt-4`); a local path by its last part."""
    return Path(cfg.judge.model.rstrip("/")).name


def read_judgments(path: Path) -> list[dict[str, Any]]:
    """FastChat judgment rows (_single or _pair); a row without FastChat's fields fails naming its line."""
    rows = _rows(path)
    for i, row in enumerate(rows, 1):
        fields = SINGLE_FIELDS if "model" in row else PAIR_FIELDS
        missing = [f for f in fields if f not in row]
        if missing or not isinstance(row.get("judge"), list) or len(row["judge"]) != 2:
            raise ConfigError(
                f"{path}:{i}: not a FastChat judgment row (missing {missing or ['judge as [model, prompt]']}); "
                "expected the fields of model_judgment/<judge>_single.jsonl or _pair.jsonl"
            )
    return rows


def judge_all(
    matches: list[dict[str, Any]], previous: list[dict[str, Any]], judge: Judge, pairwise: bool
) -> tuple[list[dict[str, Any]], int, int]:
    """This run's rows: those already in the file for the same content, and the judge's verdicts on the rest.
    Returns (rows, judged now, missing): a request the judge never answered gets no row (a re-run asks again)."""
    done = {row_key(r): r for r in previous}
    todo = [m for m in matches if m["key"] not in done]
    rows: dict[str, dict[str, Any]] = {m["key"]: done[m["key"]] for m in matches if m["key"] in done}
    missing = 0
    if todo:
        conversations = []
        for m in todo:
            prompts = (
                [m["row"]["g1_user_prompt"], m["row"]["g2_user_prompt"]]
                if pairwise
                else [m["row"]["user_prompt"]]
            )
            conversations += [[{"role": "system", "content": m["system"]}, {"role": "user", "content": p}]
                              for p in prompts]  # fmt: skip
        parse = (lambda c: parse_winner(c.text)) if pairwise else (lambda c: parse_rating(c.text))
        verdicts = judge.ask(
            conversations, parse, desc=f"mt_bench judge ({len(todo)} of {len(matches)} to judge)"
        )
        per = 2 if pairwise else 1
        for k, m in enumerate(todo):
            games = verdicts[per * k : per * k + per]
            if any(v.missing for v in games):
                missing += 1
                continue
            texts = [v.completion.text if v.completion else "" for v in games]
            if pairwise:
                g1 = {"A": "model_1", "B": "model_2"}.get(games[0].value, games[0].value) or "error"
                g2 = {"A": "model_2", "B": "model_1"}.get(games[1].value, games[1].value) or "error"
                r = m["row"]
                rows[m["key"]] = {"question_id": r["question_id"], "model_1": r["model_1"], "model_2": r["model_2"],
                                  "g1_winner": g1, "g2_winner": g2, "judge": r["judge"],
                                  "g1_user_prompt": r["g1_user_prompt"], "g1_judgment": texts[0],
                                  "g2_user_prompt": r["g2_user_prompt"], "g2_judgment": texts[1],
                                  "turn": r["turn"], "tstamp": time.time()}  # fmt: skip
            else:
                score = games[0].value if games[0].value is not None else -1
                r = m["row"]
                rows[m["key"]] = {"question_id": r["question_id"], "model": r["model"], "judge": r["judge"],
                                  "user_prompt": r["user_prompt"], "judgment": texts[0], "score": score,
                                  "turn": r["turn"], "tstamp": time.time()}  # fmt: skip
    ordered = [rows[m["key"]] for m in matches if m["key"] in rows]
    return ordered, len(todo) - missing, missing


# ---------------------------------------------------------------------------------------------------- scoring


def _question_order(rows: list[dict[str, Any]], question_ids: list[str] | None) -> list[str]:
    return question_ids or list(dict.fromkeys(str(r["question_id"]) for r in rows))


def single_table(
    rows: list[dict[str, Any]], question_ids: list[str] | None = None, n_bootstrap: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """show_result.py's single-mode numbers per model: the mean of every rating that is not -1 (both turns:
    "Average", the MT-Bench score), and per turn; with 95% bootstrap intervals over questions."""
    qids = _question_order(rows, question_ids)
    index = {q: i for i, q in enumerate(qids)}
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return []
    sums = np.zeros((len(models), 3, len(qids)))  # [model, (all, turn 1, turn 2), question]
    counts = np.zeros_like(sums)
    failed = dict.fromkeys(models, 0)
    judged = dict.fromkeys(models, 0)
    for r in rows:
        judged[r["model"]] += 1
        if r["score"] == -1:
            failed[r["model"]] += 1
            continue
        m, q = models.index(r["model"]), index[str(r["question_id"])]
        for k in (0, r["turn"]) if r.get("turn") in (1, 2) else (0,):
            sums[m, k, q] += r["score"]
            counts[m, k, q] += 1

    def means(idx: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums[..., idx].sum(-1) / counts[..., idx].sum(-1)

    point = means(np.arange(len(qids)))
    low, high = interval(
        np.array(bootstrap(len(qids), n_bootstrap, means, np.random.default_rng(seed))), axis=0
    )
    table = []
    for m, model in enumerate(models):
        row = {"model": model, "n_judgments": judged[model], "n_failed": failed[model]}
        for k, name in enumerate(("score", "score_turn1", "score_turn2")):
            ok = np.isfinite(point[m, k])
            row[name] = float(point[m, k]) if ok else None
            ci_ok = ok and np.isfinite(low[m, k]) and np.isfinite(high[m, k])
            row[f"{name}_ci"] = [float(low[m, k]), float(high[m, k])] if ci_ok else [None, None]
        table.append(row)
    return sorted(table, key=lambda r: -(r["score"] if r["score"] is not None else -np.inf))


def pair_outcomes(rows: list[dict[str, Any]], baseline: str | None) -> list[tuple[str, str, str, str]]:
    """show_result.py's pairwise rule per row: (question_id, model_1, model_2, outcome) with outcome "model_1",
    "model_2" or "tie"; a row where a game is "error" is dropped, and two games that disagree (or a tie in game 1)
    are a tie. With a baseline, only rows that involve it."""
    out = []
    for r in rows:
        if "error" in (r["g1_winner"], r["g2_winner"]):
            continue
        if baseline is not None and baseline not in (r["model_1"], r["model_2"]):
            continue
        tie = r["g1_winner"] == "tie" or r["g1_winner"] != r["g2_winner"]
        out.append((str(r["question_id"]), r["model_1"], r["model_2"], "tie" if tie else r["g1_winner"]))
    return out


def pair_table(
    rows: list[dict[str, Any]],
    baseline: str | None,
    question_ids: list[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """show_result.py's pairwise table: win, loss, tie, win_rate, loss_rate and win_rate_adjusted per model (the
    baseline's own row removed), sorted by win_rate_adjusted; its 95% interval by bootstrap over questions."""
    outcomes = pair_outcomes(rows, baseline)
    qids = _question_order(rows, question_ids)
    index = {q: i for i, q in enumerate(qids)}
    models = sorted({m for _, a, b, _ in outcomes for m in (a, b)} - ({baseline} if baseline else set()))
    if not models:
        return []
    tally = np.zeros((len(models), 3, len(qids)))  # [model, (win, loss, tie), question]
    for qid, m1, m2, outcome in outcomes:
        for me, side in ((m1, "model_1"), (m2, "model_2")):
            if me not in models:
                continue
            k = 2 if outcome == "tie" else (0 if outcome == side else 1)
            tally[models.index(me), k, index[qid]] += 1

    def adjusted(idx: np.ndarray) -> np.ndarray:
        t = tally[..., idx].sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (t[:, 0] + 0.5 * t[:, 2]) / t.sum(-1)

    low, high = interval(
        np.array(bootstrap(len(qids), n_bootstrap, adjusted, np.random.default_rng(seed))), axis=0
    )
    table = []
    for m, model in enumerate(models):
        win, loss, tie = (int(x) for x in tally[m].sum(-1))
        n = win + loss + tie
        table.append({"model": model, "win": win, "loss": loss, "tie": tie, "win_rate": win / n,
                      "loss_rate": loss / n, "win_rate_adjusted": (win + 0.5 * tie) / n,
                      "win_rate_adjusted_ci": [float(low[m]), float(high[m])]})  # fmt: skip
    return sorted(table, key=lambda r: -r["win_rate_adjusted"])


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    """results.json, leaderboard.md/.csv, and scores.jsonl (benchmark mt_bench) for eval.leaderboard."""
    atomic_write_json(out / "results.json", result)
    table = result["leaderboard"]
    if result["mode"] == "single":
        columns = [
            "model",
            "score",
            "ci_low",
            "ci_high",
            "score_turn1",
            "score_turn2",
            "n_judgments",
            "n_failed",
        ]
        shown = [{**r, "ci_low": r["score_ci"][0], "ci_high": r["score_ci"][1]} for r in table]
        scores = [
            score_row(r["model"], "mt_bench", name, r[name], *r[f"{name}_ci"])
            for r in table
            for name in ("score", "score_turn1", "score_turn2")
            if r[name] is not None
        ]
    else:
        columns = [
            "model",
            "win",
            "loss",
            "tie",
            "win_rate",
            "loss_rate",
            "win_rate_adjusted",
            "ci_low",
            "ci_high",
        ]
        shown = [{**r, "ci_low": r["win_rate_adjusted_ci"][0], "ci_high": r["win_rate_adjusted_ci"][1]}
                 for r in table]  # fmt: skip
        metric = f"win_rate_vs_{result['baseline']}" if result.get("baseline") else "win_rate_all_pairs"
        # in % like every other win rate in scores.jsonl (show_result.py prints the fraction)
        scores = [
            score_row(
                r["model"],
                "mt_bench",
                metric,
                100 * r["win_rate_adjusted"],
                *(100 * x for x in r["win_rate_adjusted_ci"]),
            )  # fmt: skip
            for r in table
        ]
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in shown]
    write_table(out / "leaderboard.csv", rounded, columns)
    write_table(out / "leaderboard.md", rounded, columns)
    if scores:
        write_scores(out, scores)


def score_rows(
    rows: list[dict[str, Any]], cfg: MtBenchConfig, question_ids: list[str] | None, pairwise: bool
) -> dict[str, Any]:
    if pairwise:
        table = pair_table(rows, cfg.baseline, question_ids, cfg.n_bootstrap, cfg.seed)
        if not table:
            among = f" involving the baseline {cfg.baseline}" if cfg.baseline else ""
            raise ConfigError(
                f"no pairwise judgment{among} has a verdict in both games: nothing to score (baseline=null scores "
                "every pair, as show_result.py --mode pairwise-all)"
            )
        return {"mode": "pairwise", "baseline": cfg.baseline, "leaderboard": table}
    table = single_table(rows, question_ids, cfg.n_bootstrap, cfg.seed)
    unscored = [r["model"] for r in table if r["score"] is None]
    if not table:
        raise ConfigError("no judgment to score (models= matches no model of the judgments)")
    if len(unscored) == len(table):
        raise ConfigError(
            f"no judgment has a rating (all {len(rows)} are -1: the judge's replies hold no [[N]]); see the "
            "'judgment' fields"
        )
    result: dict[str, Any] = {"mode": "single", "leaderboard": [r for r in table if r["score"] is not None]}
    if unscored:
        result["unscored_models"] = unscored  # every rating -1
    return result


def default_output_dir(cfg: MtBenchConfig) -> Path:
    parents = {(Path(a) if Path(a).is_dir() else Path(a).parent).resolve() for a in cfg.answers}
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if len(parents) > 1:
        raise ConfigError("output_dir is required when answers are in several directories")
    return next(iter(parents)).parent


def run(cfg: MtBenchConfig) -> dict[str, Any]:
    """Judge every model's answers (single: each turn graded; pairwise: both orders of each pair), then score."""
    pairwise = cfg.mode == "pairwise"
    # every input is read and checked before anything is written: a wrong path or id leaves no trace
    files = answer_files(cfg.answers)
    questions_path = shipped(cfg.questions or QUESTIONS)
    refs_path = shipped(cfg.reference_answers or REFERENCE_ANSWERS)
    all_questions = read_questions(questions_path)
    questions = select_questions(cfg, all_questions, questions_path)
    refs = read_references(refs_path)
    check_references(refs_path, refs, questions)
    base = [cfg.baseline] if pairwise and cfg.baseline else []
    models = cfg.models or [m for m in files if m not in base]
    for name in dict.fromkeys([*models, *base]):
        if name not in files:
            raise ConfigError(
                f"answers: no {name}.jsonl in {', '.join(cfg.answers)} (found: {sorted(files)})"
            )
    answers = {}
    for name in dict.fromkeys([*models, *base]):
        answers[name] = read_answers(files[name], all_questions)
        check_answered(files[name], answers[name], questions)
    if pairwise and len(pairs_of(models, cfg.baseline)) == 0:
        raise ConfigError("pairwise: no pair to judge (give two models, or models and a baseline)")

    out = default_output_dir(cfg) / "mt_bench"
    prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.mt_bench",
        inputs=(*cfg.answers, cfg.questions, cfg.reference_answers, cfg.judge.model),
        # judgments are reused by content (row_key), so only the judge's settings must stay put
        may_differ=(
            "answers",
            "models",
            "mode",
            "baseline",
            "questions",
            "reference_answers",
            "question_ids",
            "max_questions",
            "n_bootstrap",
            "seed",
        ),  # fmt: skip
    )
    prompts = load_prompts()
    name = judge_name_of(cfg)
    path = out / "model_judgment" / f"{name}_{'pair' if pairwise else 'single'}.jsonl"
    if pairwise:
        matches = pair_matches(questions, pairs_of(models, cfg.baseline), answers, refs, prompts, name)
    else:
        matches = single_matches(questions, models, answers, refs, prompts, name)
    previous = read_judgments(path) if path.exists() else []
    judge = Judge(cfg.judge, out / "judge_cache.sqlite")
    mine, judged, missing = judge_all(matches, previous, judge, pairwise)
    judge.close()
    # Other models' judgments in the file stay (FastChat keeps one file per judge); this run's models' rows are
    # exactly this run's judgments, so show_result.py on the file gives the numbers of scores.jsonl
    owners = {owner(m["row"]) for m in matches}
    write_jsonl(path, [r for r in previous if owner(r) not in owners] + mine)
    # What the judge never answered has no row: past the tolerated share nothing is scored (a re-run asks again)
    judge.raise_for_outages(missing, len(matches), "MT-Bench judgments")
    qids = [str(q["question_id"]) for q in questions]
    result = score_rows(mine, cfg, qids, pairwise)
    result.update(judge=[name, cfg.judge.model], judgments_file=str(path), n_questions=len(questions),
                  judged_now=judged, reused=len(mine) - judged, judge_calls=judge.stats.as_dict())  # fmt: skip
    if missing:
        result["missing_judgments"] = missing  # tolerated by judge.max_engine_errors; a re-run asks for them
    write_outputs(out, result)
    return result


def score_file(cfg: MtBenchConfig) -> dict[str, Any]:
    """`judgments=PATH`: score a FastChat judgment file (ours or FastChat's own) as show_result.py does."""
    path = Path(cfg.judgments)
    rows = read_judgments(path)
    if not rows:
        raise ConfigError(f"{path}: no judgments")
    pairwise = "model" not in rows[0]
    if cfg.models:
        rows = [r for r in rows if (r["model"] if not pairwise else r["model_1"]) in cfg.models]
    result = score_rows(rows, cfg, None, pairwise)
    result["judgments_file"] = str(path)
    if cfg.output_dir:
        out = Path(cfg.output_dir) / "mt_bench"
        prepare_output_dir(
            out, resolved(cfg), command="eval.mt_bench", inputs=(cfg.judgments,), recomputed=True
        )
        write_outputs(out, result)
    return result


def show(result: dict[str, Any]) -> str:
    if result["mode"] == "single":
        columns = ["model", "score", "score_turn1", "score_turn2", "n_judgments", "n_failed"]
    else:
        columns = ["model", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"]
    rows = [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in result["leaderboard"]
    ]
    return markdown_table(rows, columns)


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("mt_bench", argv, MtBenchConfig)
    if cfg.judgments:
        result = score_file(cfg)
    elif cfg.answers:
        result = run(cfg)
    else:
        raise ConfigError(
            "give answers=DIR_OR_FILES (judge and score) or judgments=PATH (score a judgment file)"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "leaderboard"}, indent=2))
    print(show(result))


if __name__ == "__main__":
    main()

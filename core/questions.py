"""Benchmark questions: where each benchmark's questions live on the Hub, and reading a questions file in any of the
layouts the benchmarks publish. `eval.generate` answers them; `data_synth.decontaminate` checks training rows
against them."""

from __future__ import annotations

from typing import Any, Literal

from core.data import is_user_hub_error, load_rows
from core.errors import ConfigError
from core.recipes import shipped

Bench = Literal["alpaca_eval", "arena_hard", "arena_hard_v2", "mt_bench"]

# Where each benchmark's questions live: on the Hub (users have internet; tests pass local files), or shipped.
HUB_QUESTIONS = {
    "alpaca_eval": "tatsu-lab/alpaca_eval",  # alpaca_eval.json: 805 instructions
    "arena_hard": "lmarena-ai/arena-hard-auto-v0.1",  # 500 questions
    "arena_hard_v2": "lmarena-ai/arena-hard-auto",  # data/arena-hard-v2.0/question.jsonl: 750 questions
    # FastChat's own 80 two-turn questions, shipped: its judge files and reference answers use their ids (81-160);
    # the Hub's HuggingFaceH4/mt_bench_prompts numbers them by a hash of the text
    "mt_bench": "eval/data/mt_bench/question.jsonl",
}
# Benchmarks whose Hub repo is read as one file (no loadable dataset there)
HUB_FILES = {"alpaca_eval": "alpaca_eval.json", "arena_hard_v2": "data/arena-hard-v2.0/question.jsonl"}


def load_questions(bench: str, source: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Questions as {"id", "turns": [str], "category", "extra"}; `extra` goes back into the answer files."""
    source = shipped(source or HUB_QUESTIONS[bench])
    if bench in HUB_FILES and source == HUB_QUESTIONS[bench]:
        import httpx
        from huggingface_hub import hf_hub_download  # no loadable dataset in these repos; read the file
        from huggingface_hub.errors import EntryNotFoundError

        try:
            source = hf_hub_download(source, HUB_FILES[bench], repo_type="dataset")
        except (
            OSError,
            EntryNotFoundError,
            httpx.HTTPError,
        ) as e:  # offline, a proxy, a rate limit, a moved file
            if not is_user_hub_error(e):  # a full disk is not the user's error
                raise
            raise ConfigError(
                f"{source}: could not download {HUB_FILES[bench]} from the Hub ({type(e).__name__}); "
                "pass questions=PATH to a local copy"
            ) from None
    split = "train"
    rows = load_rows(source, split=split)
    questions = [_question(bench, row, i, source) for i, row in enumerate(rows)]
    ids = [q["id"] for q in questions]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"{source}: duplicate question ids {dup[:5]}")
    return questions[:limit] if limit else questions


def _question(bench: str, row: dict[str, Any], i: int, source: str) -> dict[str, Any]:
    where = f"{source}: row {i + 1}"
    if bench == "alpaca_eval":
        if not isinstance(row.get("instruction"), str):
            raise ConfigError(f"{where}: expected an 'instruction' string (AlpacaEval format)")
        return {
            "id": str(i),
            "turns": [row["instruction"]],
            "category": row.get("dataset"),
            "extra": {"dataset": row.get("dataset", "")},
        }
    qid = row.get("uid", row.get("question_id", row.get("prompt_id", row.get("id"))))
    turns = row.get("turns", row.get("prompt"))
    if isinstance(turns, str):  # arena-hard-auto since v2.0: {uid, category, prompt}
        turns = [turns]
    if turns is None and isinstance(row.get("instruction"), str):  # a plain {id, instruction} file: one turn
        turns = [row["instruction"]]
    if qid is None or not isinstance(turns, list) or not turns:
        raise ConfigError(
            f"{where}: expected 'uid' and 'prompt' (arena-hard-auto), 'question_id' and a non-empty 'turns' "
            "list (arena-hard-auto v0.1 / FastChat), 'prompt_id' and 'prompt' (HuggingFaceH4/mt_bench_prompts), "
            "or 'id' and 'instruction'"
        )
    texts = [t["content"] if isinstance(t, dict) else t for t in turns]
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{where}: every turn must be a string or {{'content': string}}")
    return {
        "id": str(qid),
        "turns": texts,
        "category": row.get("category"),
        "extra": {k: row[k] for k in ("cluster", "subcategory") if k in row},
    }

"""Answer a benchmark's questions with one model, in the benchmark's own file format.

    python -m eval.generate model=runs/sft/merged bench=alpaca_eval output_dir=runs/eval/magpie/alpaca_eval
    python -m eval.generate recipe=magpie_paper model=... bench=arena_hard output_dir=...

alpaca_eval -> `model_outputs.json` (what `alpaca_eval --model_outputs` reads); arena_hard (v0.1, the paper's)
and arena_hard_v2 -> `model_answer/<name>.jsonl` in arena-hard-auto's current layout (`layout=v2`: uid, messages,
metadata) or its pre-April-2025 one (`layout=v0.1`: question_id, choices, conv_metadata); mt_bench ->
`model_answer/<name>.jsonl` (FastChat, both turns). Greedy decoding with the recipe's repetition penalty (the
paper: 1.2), any engine. Progress is kept in `answers.jsonl` after every chunk, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from core.chat import render_prompt
from core.config import ConfigError, cli, load_config, resolved
from core.engines import CONTEXT_FULL, EngineConfig, Sampling, make_engine, request_seed
from core.io import atomic_write_json, digest, read_jsonl, write_jsonl
from core.models import resolve_model
from core.questions import HUB_FILES, HUB_QUESTIONS, Bench, load_questions  # noqa: F401 (also from here)
from core.rundir import prepare_output_dir


@dataclass
class GenerateConfig:
    model: str = "embedded"  # local path, Hub id, `embedded`, or the server's model name (openai backend)
    name: str | None = None  # the model's name in the answer files; default: the model path's last part
    bench: Bench = "alpaca_eval"
    questions: str | None = None  # local .json/.jsonl/.parquet or a Hub dataset id; default: the benchmark's
    max_questions: int | None = None  # the first N (quick looks; a full run answers everything)
    engine: EngineConfig = field(default_factory=EngineConfig)
    system_prompt: str | None = None
    max_tokens: int = 2048
    repetition_penalty: float = 1.0
    temperature: float = 0.0  # greedy, as the benchmarks' protocols; above 0 every answer gets its own seed
    top_p: float = 1.0
    seed: int = 0
    chunk_size: int = 256  # questions per engine call and progress write (a resume unit, not a batch size)
    layout: Literal["v2", "v0.1"] = "v2"  # arena-hard-auto answer files: current (uid/messages) or pre-v2.0
    output_dir: str = "runs/eval/generate"
    overwrite: bool = False


def model_name(cfg: GenerateConfig) -> str:
    return cfg.name or Path(str(resolve_model(cfg.model)).rstrip("/")).name


def check_same_questions(
    expected: list[str], got: list[str], where: str, what: str = "question_id", ordered: bool = True
) -> None:
    """An answer file must cover the benchmark's questions exactly (in order, where pairing is by position);
    the error names the missing, unexpected or misplaced ids."""
    if got == expected or (not ordered and sorted(got) == sorted(expected)):
        return

    def short(ids):
        return ", ".join(repr(i[:60]) for i in ids[:5]) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")

    got_set, expected_set = set(got), set(expected)
    missing = [i for i in expected if i not in got_set]
    extra = [i for i in got if i not in expected_set]
    problems = [f"missing {what}s {short(missing)}"] if missing else []
    problems += [f"unexpected {what}s {short(extra)}"] if extra else []
    duplicated = sorted({i for i in got if got.count(i) > 1})
    problems += [f"duplicated {what}s {short(duplicated)}"] if duplicated else []
    if not problems:
        moved = [g for g, e in zip(got, expected, strict=True) if g != e]
        problems = [f"{what}s out of order, first {short(moved)}"]
    raise ConfigError(f"{where} does not match the benchmark's questions: " + "; ".join(problems))


def generate(cfg: GenerateConfig, questions: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Answer every turn of every question, greedy; resumable through the progress file `path`. Progress is keyed
    by what an answer was computed from (`answer_key`): a reordered or edited questions file, another model or other
    sampling never puts an answer under a question it was not given for."""
    keys = [answer_key(cfg, q) for q in questions]
    rows = read_jsonl(path) if path.exists() else []
    done = {r["key"]: r for r in rows if "key" in r}
    if len(done) < len(rows):
        print(
            f"note: {path} holds {len(rows) - len(done)} answers from an older version, without the content they "
            "were computed from: they are answered again",
            file=sys.stderr,
        )
    # One answer per distinct (model, system prompt, turns, sampling): two questions with the same text share it
    unique = {k: q for q, k in zip(questions, keys, strict=True)}
    todo = [(q, k) for k, q in unique.items() if len(done.get(k, {}).get("answers", [])) < len(q["turns"])]
    if todo:
        engine = make_engine(cfg.model, cfg.engine)
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        total = sum(len(q["turns"]) for q in unique.values())
        bar = tqdm(
            total=total,
            initial=total - sum(len(q["turns"]) for q, _ in todo),
            desc=f"answers {model_name(cfg)}",
            unit="turn",
        )
        for turn in range(max(len(q["turns"]) for q, _ in todo)):  # turn by turn: turn 2 needs answer 1
            need = [
                (q, k)
                for q, k in todo
                if len(q["turns"]) > turn and len(done.get(k, {}).get("answers", [])) == turn
            ]
            for start in range(0, len(need), cfg.chunk_size):
                batch = need[start : start + cfg.chunk_size]
                chats = [system + _history(q, done.get(k), turn) for q, k in batch]
                # A chat API (engine.chat, e.g. a hosted baseline model) takes the messages; the rest get text.
                prompts = chats if cfg.engine.chat else [render_prompt(engine.tokenizer, m) for m in chats]
                samplings = [answer_sampling(cfg, q["id"], turn) for q, _ in batch]
                full = []  # prompts that fill the model's context: no answer, never an empty one
                for (q, k), c in zip(batch, engine.complete(prompts, samplings), strict=True):
                    if c.finish_reason == CONTEXT_FULL:
                        full.append(q["id"])
                        continue
                    row = done.setdefault(
                        k, {"id": q["id"], "key": k, "model": cfg.model, "answers": [], "n_tokens": []}
                    )
                    row["answers"].append(c.text.strip())
                    row["n_tokens"].append(c.n_tokens)
                # This run's questions in order, then answers kept for others (a larger max_questions later)
                order = list(dict.fromkeys([k for k in keys if k in done] + list(done)))
                write_jsonl(path, [done[k] for k in order])
                bar.update(len(batch))
                if full:
                    raise ConfigError(
                        f"questions {full[:5]} (turn {turn + 1}): the prompt fills the model's context, so there is "
                        "no room to answer; raise engine.max_model_len (vLLM) or use a model with a longer "
                        "context. Every other answer is written and kept"
                    )
        bar.close()
        del engine
        gc.collect()
    return [{**q, **done[k], "id": q["id"]} for q, k in zip(questions, keys, strict=True)]


def answer_key(cfg: GenerateConfig, q: dict[str, Any]) -> str:
    """What an answer is computed from: the model, the system prompt, every turn of the question, the sampling
    (with each turn's seed, named by the question's id only when answers are sampled)."""
    samplings = [dataclasses.asdict(answer_sampling(cfg, q["id"], t)) for t in range(len(q["turns"]))]
    return digest([json.dumps([cfg.model, cfg.system_prompt, q["turns"], samplings], sort_keys=True)])


def answer_sampling(cfg: GenerateConfig, question_id: str, turn: int) -> Sampling:
    """Greedy by default; sampled answers get a seed of their own, named by (seed, question, turn)."""
    seed = request_seed(cfg.seed, "answer", question_id, turn) if cfg.temperature > 0 else None
    return Sampling(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        repetition_penalty=cfg.repetition_penalty,
        seed=seed,
    )


def _history(q: dict[str, Any], progress: dict[str, Any] | None, turn: int) -> list[dict[str, str]]:
    """The conversation up to turn `turn`'s question, with the answers already given to the earlier turns."""
    messages = []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": q["turns"][t]})
        if t < turn:
            messages.append({"role": "assistant", "content": progress["answers"][t]})
    return messages


def export(bench: str, name: str, answered: list[dict[str, Any]], out: Path, layout: str = "v2") -> Path:
    """Write the benchmark's own answer file."""
    if bench == "alpaca_eval":
        rows = [
            {
                "instruction": a["turns"][0],
                "output": a["answers"][0],
                "generator": name,
                "dataset": a["extra"].get("dataset", ""),
            }
            for a in answered
        ]
        atomic_write_json(out / "model_outputs.json", rows)
        return out / "model_outputs.json"
    rows = []
    for a in answered:
        answer_id = hashlib.sha1(f"{name}/{a['id']}".encode()).hexdigest()[:22]  # stable across re-exports
        if bench.startswith("arena_hard") and layout == "v2":  # arena-hard-auto's gen_answer.py since v2.0
            messages = []
            for question, answer in zip(a["turns"], a["answers"], strict=True):
                messages += [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": {"answer": answer}},
                ]
            rows.append(
                {
                    "uid": a["id"],
                    "ans_id": answer_id,
                    "model": name,
                    "messages": messages,
                    "tstamp": time.time(),
                    "metadata": style_metadata(a["answers"][-1], a["n_tokens"][-1]),
                }
            )
            continue
        if bench.startswith("arena_hard"):
            turns = [{"content": t, "token_len": n} for t, n in zip(a["answers"], a["n_tokens"], strict=True)]
            extra = {"conv_metadata": style_metadata(a["answers"][-1], a["n_tokens"][-1])}
        else:
            turns, extra = a["answers"], {}
        rows.append(
            {
                "question_id": a["id"],
                "answer_id": answer_id,
                "model_id": name,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time(),
                **extra,
            }
        )
    path = out / "model_answer" / f"{name}.jsonl"
    write_jsonl(path, rows)
    return path


def style_metadata(text: str, token_len: int) -> dict[str, Any]:
    """Length and markdown counts for Arena-Hard style control (arena-hard-auto's conv_metadata; code removed)."""
    import re

    text = re.sub(r"```[^`]*```", "", text)
    count = lambda pattern, flags=re.MULTILINE: len(re.findall(pattern, text, flags))  # noqa: E731
    return {
        "token_len": token_len,
        "header_count": {f"h{i}": count(rf"^#{{{i}}}\s") for i in range(1, 7)},
        "list_count": {"ordered": count(r"^\s*\d+\.\s"), "unordered": count(r"^\s*[-*+]\s")},
        "bold_count": {"**": count(r"\*\*[^*\n]+\*\*", 0), "__": count(r"__[^_\n]+__", 0)},
    }


def run(cfg: GenerateConfig) -> Path:
    out = Path(cfg.output_dir)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.generate",
        inputs=(cfg.questions, cfg.model),
        may_differ=("max_questions",),
        overwrite=cfg.overwrite,
    )
    questions = load_questions(cfg.bench, cfg.questions, cfg.max_questions)
    answered = generate(cfg, questions, out / "answers.jsonl")
    return export(cfg.bench, model_name(cfg), answered, out, cfg.layout)


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("generate", argv, GenerateConfig)
    path = run(cfg)
    print(f"{cfg.bench} answers of {model_name(cfg)} -> {path}")


if __name__ == "__main__":
    main()

"""Judge throughput for AlpacaEval-style verdicts (one token + top logprobs) with the embedded model.

    python benchmarks/judge_throughput.py [--n 32] [--batch-size 8] [--out FILE]

Three runs over the same prompts, each in a fresh cache: one prompt at a time (the baseline), batched as
eval.alpaca_eval runs them, and a re-run of the batched evaluation served from the judgment cache.
Reports judgments/s and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from core.engines import EngineConfig
from core.io import atomic_write_json, read_jsonl
from core.judge import Judge, JudgeConfig
from eval.alpaca_eval import preference
from eval.pairwise import DEMO_INSTRUCTIONS


def conversations(n: int) -> list[list[dict[str, str]]]:
    """AlpacaEval's own prompt, filled with the demo instructions and two stock outputs."""
    import pandas as pd
    from alpaca_eval import utils

    template = (
        Path(utils.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
    )
    rows = read_jsonl(DEMO_INSTRUCTIONS)
    df = pd.DataFrame({
        "instruction": [rows[i % len(rows)]["instruction"] + f" (variant {i})" for i in range(n)],
        "output_1": ["I do not know."] * n,
        "output_2": ["Here is a short, direct answer with one example."] * n,
    })  # fmt: skip
    prompts, _ = utils.make_prompts(df, template.read_text())
    return [utils.prompt_to_chatml(p) for p in prompts]


def timed(cfg: JudgeConfig, convs: list, cache: Path) -> tuple[float, Judge]:
    judge = Judge(cfg, cache)
    judge.tokenizer  # noqa: B018 - load outside the timing, as every run does once
    if judge.stats.calls == 0 and len(judge.cache) == 0:
        judge.engine.complete(["warm-up"], cfg.sampling())  # load weights outside the timing too
    start = time.perf_counter()
    verdicts = judge.ask(convs, preference, desc="judging")
    elapsed = time.perf_counter() - start
    assert all(v.value is not None for v in verdicts), "every verdict should parse (logprobs)"
    return elapsed, judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/judge_throughput.json")
    args = ap.parse_args()
    convs = conversations(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        one = JudgeConfig(max_tokens=1, logprobs=20, retries=0, engine=EngineConfig(batch_size=1))
        batched = JudgeConfig(
            max_tokens=1, logprobs=20, retries=0, engine=EngineConfig(batch_size=args.batch_size)
        )
        t_one, _ = timed(one, convs, Path(tmp) / "one.sqlite")
        t_batched, judge = timed(batched, convs, Path(tmp) / "batched.sqlite")
        judge.close()
        t_cached, again = timed(batched, convs, Path(tmp) / "batched.sqlite")
        assert again.stats.calls == 0
    result = {
        "n_judgments": args.n,
        "batch_size": args.batch_size,
        "one_at_a_time_per_s": round(args.n / t_one, 2),
        "batched_per_s": round(args.n / t_batched, 2),
        "cached_rerun_per_s": round(args.n / t_cached, 1),
        "batched_vs_one_at_a_time": round(t_one / t_batched, 2),
        "cached_vs_batched": round(t_batched / t_cached, 1),
        "cached_rerun_judge_calls": again.stats.calls,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

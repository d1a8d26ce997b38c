"""AlpacaEval 2 with any judge, scored by the alpaca-eval package itself.

    python -m eval.alpaca_eval model_outputs=runs/eval/magpie/alpaca_eval/model_outputs.json \
        judge.model=gpt-4-1106-preview judge.engine.backend=openai ...
    python -m eval.alpaca_eval annotations=PATH/annotations.json [df_gamed=df_gamed.csv]

Judging follows `weighted_alpaca_eval_gpt4_turbo`: the package's own prompt (its `alpaca_eval_clf.txt`), its
seeded random swap of the two outputs, and the preference 2 - P("m") from the judge's top logprobs of the first
token (the parsed identifier when the engine gives no logprobs). Win rate, standard error and the
length-controlled win rate come from `alpaca_eval.metrics`, so an `annotations.json` scores here exactly as in
alpaca_eval. The LC win rate needs the package's `df_gamed.csv` (downloaded from the Hub, or `df_gamed=PATH`
offline); without it the JSON says why LC is missing instead of guessing.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import ConfigError, cli, load_config, resolved
from core.data import is_user_hub_error
from core.engines import Completion
from core.io import atomic_write_json, atomic_write_text
from core.judge import Judge, JudgeConfig, first_token_share
from core.rundir import prepare_output_dir
from eval.generate import check_same_questions
from eval.scores import score_row, write_scores

BASELINE_HUB = ("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json")  # gpt4_1106_preview's outputs
ANNOTATOR = "weighted_alpaca_eval"
# the prompt of every weighted_alpaca_eval_* config
TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"


@dataclass
class AlpacaEvalConfig:
    model_outputs: str | None = None  # model_outputs.json (eval.generate writes one)
    reference_outputs: str | None = None  # the baseline's outputs; default gpt4_1106_preview from the Hub
    annotations: str | None = None  # only score this annotations.json (no judging)
    # As alpaca_eval's max_instances: with full outputs (as many as the reference), both are shuffled with seed 123
    # and the first N compared; with fewer (answers made with max_questions=N), the first N of each.
    max_instances: int | None = None
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=1, logprobs=20))
    df_gamed: str | None = None  # local df_gamed.csv for the LC win rate; default: the Hub's (needs internet)
    length_controlled: bool = True  # false: the win rate alone, no df_gamed.csv (nor its download) needed
    # The `annotator` column: alpaca_eval's config whose judge this is (weighted_alpaca_eval_gpt4_turbo for
    # gpt-4-1106-preview), so `alpaca_eval evaluate` takes our annotations as its cache; else weighted_alpaca_eval/<judge>
    annotator: str | None = None
    output_dir: str | None = None  # default: <model_outputs dir>/weighted_alpaca_eval

    def __post_init__(self) -> None:
        # found out before judging, not after
        if self.df_gamed is not None and not Path(self.df_gamed).is_file():
            raise ValueError(f"df_gamed: no such file {self.df_gamed}")


def load_outputs(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a JSON list of {{instruction, output, generator}} objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: entry {i}: expected an object, got {type(row).__name__}")
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(f"{path}: entry {i}: missing string field(s) {missing}")
    return rows


def first_instances(model: list[dict], reference: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """What alpaca_eval's `evaluate(max_instances=n)` compares: when both lists have the same length it shuffles
    both with `DataFrame.sample(frac=1, random_state=123)` (one permutation, as the lengths match) and takes the
    first n; otherwise it takes the first n of each (our answers made with max_questions=n)."""
    if len(model) == len(reference):
        order = pd.DataFrame(model).sample(frac=1, random_state=123).index.tolist()
        model, reference = [model[i] for i in order], [reference[i] for i in order]
    return model[:n], reference[:n]


def annotator_name(cfg: AlpacaEvalConfig) -> str:
    """alpaca_eval's own name for this judge: the weighted_alpaca_eval_* config that asks `judge.model` with our
    prompt and logprob parser (its cache is keyed by this name), else weighted_alpaca_eval/<judge>."""
    if cfg.annotator:
        return cfg.annotator
    import yaml
    from alpaca_eval import utils

    for path in sorted((Path(utils.__file__).parent / "evaluators_configs").glob("weighted_*/configs.yaml")):
        for name, conf in yaml.safe_load(path.read_text()).items():
            if (
                conf.get("prompt_template") == TEMPLATE
                and conf.get("fn_completion_parser") == "logprob_parser"
                and conf.get("completions_kwargs", {}).get("model_name") == cfg.judge.model
            ):
                return name
    return f"{ANNOTATOR}/{cfg.judge.model}"


def reference_path(cfg: AlpacaEvalConfig) -> str:
    if cfg.reference_outputs:
        return cfg.reference_outputs
    from huggingface_hub import hf_hub_download

    return hf_hub_download(BASELINE_HUB[0], BASELINE_HUB[1], repo_type="dataset")


def preference(c: Completion) -> float | None:
    """In prompt order: 1 = output_1 ("m") is better, 2 = output_2 ("M"); weighted when logprobs exist."""
    share = first_token_share(c, "m", "M")
    if share is not None:
        return 2.0 - share  # alpaca_eval's logprob_parser
    text = c.text.strip()
    if text[:1] in ("m", "M") and (len(text) == 1 or not text[1].isalnum()):
        return 1.0 if text[0] == "m" else 2.0
    return None


def annotate(cfg: AlpacaEvalConfig, model: list[dict], reference: list[dict], judge: Judge) -> pd.DataFrame:
    """Judge model (output_2) against reference (output_1), as alpaca_eval's pairwise annotator does."""
    from alpaca_eval import processors, utils

    template = (Path(utils.__file__).parent / "evaluators_configs" / TEMPLATE).read_text()
    df = pd.DataFrame(
        {
            "instruction": [r["instruction"] for r in reference],
            "output_1": [r["output"] for r in reference],
            "generator_1": [r.get("generator", "baseline") for r in reference],
            "dataset": [r.get("dataset", "") for r in reference],
            "output_2": [r["output"] for r in model],
            "generator_2": [r.get("generator", "model") for r in model],
        }
    )
    # The package's own seeded swap of output_1/output_2 (seeded on the instruction), undone after judging.
    swap = processors.RandomSwitchTwoColumnsProcessor(
        two_columns_to_switch=["output_1", "output_2"],
        fn_replace_if_switch=lambda d: d.assign(preference=3 - d["preference"]) if "preference" in d else d,
        random_seed_columns=["instruction"],
        _switch_column="is_switched_outputs",
    )
    shown = swap.preprocess(df)
    # alpaca_eval's rule: a pair with identical outputs is a draw (1.5), and the judge is never asked.
    same = (shown["output_1"] == shown["output_2"]).tolist()
    asked = [i for i, s in enumerate(same) if not s]
    prompts, _ = utils.make_prompts(shown.iloc[asked], template)
    verdicts: list[Any] = [None] * len(shown)
    for i, v in zip(
        asked,
        judge.ask([utils.prompt_to_chatml(p) for p in prompts], preference, desc="alpaca_eval judge"),
        strict=True,
    ):
        verdicts[i] = v
    judge.close()
    shown["preference"] = [
        1.5 if s else (v.value if v.value is not None else math.nan)
        for s, v in zip(same, verdicts, strict=True)
    ]
    df = swap.postprocess(shown)
    df["annotator"] = annotator_name(cfg)
    df["raw_completion"] = [None if v is None else _raw(v.completion) for v in verdicts]
    df["error"] = [None if v is None else v.error for v in verdicts]
    df.attrs["identical_outputs"] = sum(same)
    df["missing"] = [
        v is not None and v.missing for v in verdicts
    ]  # the judge never answered: no verdict at all
    return df


def _raw(c: Completion | None) -> dict | None:
    return None if c is None else {"text": c.text, "top_logprobs": c.top_logprobs}


@contextlib.contextmanager
def _df_gamed_from(path: str):
    """Let alpaca_eval's GLM read df_gamed.csv from a local file (its code always asks the Hub)."""
    from alpaca_eval.metrics import glm_winrate

    original = glm_winrate.hf_hub_download

    def local(*args: Any, filename: str = "", **kwargs: Any) -> str:
        return str(path) if filename == "df_gamed.csv" else original(*args, filename=filename, **kwargs)

    glm_winrate.hf_hub_download = local
    try:
        yield
    finally:
        glm_winrate.hf_hub_download = original


def fetch_df_gamed(df_gamed: str | None) -> str:
    """df_gamed.csv: the given file, else the Hub's (huggingface_hub caches it)."""
    from alpaca_eval.metrics import glm_winrate

    return df_gamed or glm_winrate.hf_hub_download(
        repo_id=BASELINE_HUB[0], filename="df_gamed.csv", repo_type="dataset"
    )


def length_controlled(annotations: pd.DataFrame, df_gamed: str | None) -> dict[str, float] | str:
    """alpaca_eval's length-controlled win rate and its standard error, or why it cannot be computed here: its
    df_gamed.csv cannot be had (offline, no `df_gamed=PATH`), or it has no difficulty for some instructions."""
    import httpx
    from alpaca_eval import metrics
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = fetch_df_gamed(df_gamed)
    except (OSError, EntryNotFoundError, httpx.HTTPError) as e:
        if not is_user_hub_error(e):
            raise
        return f"df_gamed.csv: {type(e).__name__}: {e}"[:300]
    # alpaca_eval looks each annotation's position up among df_gamed's instructions (a KeyError past them)
    try:
        known = pd.read_csv(path, usecols=["index"]).drop_duplicates("index").index
    except ValueError as e:  # no `index` column, or not CSV
        raise ConfigError(
            f"{path}: not alpaca_eval's df_gamed.csv ({str(e).splitlines()[0][:160]})"
        ) from None
    outside = [i for i in range(len(annotations)) if i not in known]
    if outside:
        return (
            f"df_gamed.csv has no instruction difficulty for {len(outside)} of {len(annotations)} annotations"
        )
    try:
        with _df_gamed_from(path):
            lc = metrics.get_length_controlled_winrate(
                annotations.copy(), save_weights_dir=None, is_add_glm_preference_inplace=False
            )
    except ValueError as e:  # the GLM cannot be fitted to these preferences (one outcome only, say)
        return f"{type(e).__name__}: {e}"[:300]
    return {k: _plain(lc[k]) for k in ("length_controlled_winrate", "lc_standard_error")}


def score(annotations: pd.DataFrame, df_gamed: str | None = None, lc: bool = True) -> dict[str, Any]:
    """alpaca_eval's metrics on one model's annotations; LC where its inputs (df_gamed.csv) can be read."""
    from alpaca_eval import metrics

    result = {k: _plain(v) for k, v in metrics.get_winrate(annotations).items()}
    lc = length_controlled(annotations, df_gamed) if lc else "not asked for (length_controlled=false)"
    if isinstance(lc, dict):
        result.update(lc)
    else:
        result["length_controlled_winrate_unavailable"] = lc
    # Unreadable replies (failed) and, within judge.max_engine_errors, requests the judge never answered (missing)
    missing = int(annotations["missing"].fillna(False).astype(bool).sum()) if "missing" in annotations else 0
    result["n_failed"] = int(annotations["preference"].isna().sum()) - missing
    if missing:
        result["n_missing"] = missing
    judged = 1 - (result["n_failed"] + missing) / max(1, len(annotations))
    result["coverage"] = round(judged, 4)
    if result["n_failed"] + missing == len(annotations):
        raise ConfigError(
            f"no judgment succeeded ({len(annotations)} failed): no win rate to report; see the 'error' field of "
            "the annotations (replies with no verdict)"
        )
    return result


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def read_annotations(path: str) -> pd.DataFrame:
    try:
        df = pd.read_json(path)  # how alpaca_eval itself reads annotations.json (is_recompute_metrics_only)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path}: not a JSON list of annotations ({str(e).splitlines()[0][:160]})"
        ) from None
    missing = [c for c in ("preference", "output_1", "output_2", "generator_1", "generator_2") if c not in df]
    if missing:
        raise ConfigError(f"{path}: not an alpaca_eval annotations.json (missing columns {missing})")
    for i, p in enumerate(df["preference"]):  # 1 (output_1 wins) .. 2 (output_2 wins), or null (failed)
        if p is not None and not (
            isinstance(p, (int, float)) and not isinstance(p, bool) and (p != p or 0 <= p <= 2)
        ):
            raise ConfigError(
                f"{path}: entry {i}: 'preference' is {p!r}; expected a number in [1, 2] or null"
            )
    return df


def run(cfg: AlpacaEvalConfig) -> dict[str, Any]:
    if not cfg.model_outputs:
        raise ConfigError(
            "give model_outputs=PATH to judge, or annotations=PATH to score existing annotations"
        )
    out = Path(cfg.output_dir or Path(cfg.model_outputs).parent / ANNOTATOR)
    prepare_output_dir(
        out,
        resolved(cfg),
        command="eval.alpaca_eval",
        inputs=(cfg.model_outputs, cfg.reference_outputs, cfg.df_gamed, cfg.judge.model),
    )
    model = load_outputs(cfg.model_outputs)
    reference = load_outputs(reference_path(cfg))
    if cfg.max_instances is not None:
        model, reference = first_instances(model, reference, cfg.max_instances)
    check_same_questions(
        [r["instruction"] for r in reference],
        [r["instruction"] for r in model],
        cfg.model_outputs,
        "instruction",
    )
    judge = Judge(cfg.judge, out / "judge_cache.sqlite")
    df = annotate(cfg, model, reference, judge)
    # An outage is no verdict: past the tolerated share nothing is scored, and a re-run asks only what is missing
    judge.raise_for_outages(int(df["missing"].sum()), len(df), "instructions")
    stats = judge.stats.as_dict()
    # alpaca_eval's own layout
    atomic_write_text(out / "annotations.json", df.to_json(orient="records", indent=2))
    # Score the file as written, so this result and `annotations=PATH` (and alpaca_eval) agree to the last digit.
    scored = score(read_annotations(str(out / "annotations.json")), cfg.df_gamed, cfg.length_controlled)
    result = {
        "model": model[0].get("generator", "model"),
        **scored,
        "n_identical_outputs": df.attrs["identical_outputs"],
        "judge_calls": stats,
    }
    atomic_write_json(out / "results.json", result)
    rows = [
        score_row(
            result["model"],
            "alpaca_eval",
            "win_rate",
            result["win_rate"],
            *_interval(result["win_rate"], result["standard_error"]),
        )
    ]
    if "length_controlled_winrate" in result:
        lc, se = result["length_controlled_winrate"], result["lc_standard_error"]
        rows.insert(0, score_row(result["model"], "alpaca_eval", "lc_win_rate", lc, *_interval(lc, se)))
    write_scores(out, rows)
    return result


def _interval(value: float, se: float) -> tuple[float, float]:
    return value - 1.96 * se, value + 1.96 * se


@cli
def main(argv: list[str] | None = None) -> None:
    (cfg,) = load_config("alpaca_eval", argv, AlpacaEvalConfig)
    if cfg.annotations and not cfg.model_outputs:
        result = score(read_annotations(cfg.annotations), cfg.df_gamed)
    else:
        result = run(cfg)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Judge agreement: published leaderboard outputs scored by a judge, compared with the official numbers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import ConfigError, parse_config
from eval.agreement import AgreementConfig, official_scores, over_models, over_prompts, rank_agreement, run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ALPACA = FIXTURES / "alpaca_eval_leaderboard_cd543a1"
ARENA = FIXTURES / "arena_hard_leaderboard_efc012e"
AE_MODELS = ["gpt-4o-2024-05-13", "Llama-3-Instruct-8B-SimPO", "Meta-Llama-3-70B-Instruct", "claude-2",
             "Meta-Llama-3-8B-Instruct", "gpt-3.5-turbo-1106", "Mistral-7B-Instruct-v0.2", "alpaca-7b"]  # fmt: skip


def test_official_leaderboards_read_in_their_published_layouts():
    ae = official_scores(str(ALPACA / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"), "alpaca_eval")
    assert ae.loc["Meta-Llama-3-8B-Instruct", "length_controlled_winrate"] == pytest.approx(22.9188, abs=1e-4)
    assert ae.loc["claude-2", "win_rate"] == pytest.approx(17.1882, abs=1e-4) and len(ae) == 9
    ah = official_scores(str(ARENA / "arena_hard_leaderboard_20240731.csv"), "arena_hard")
    assert ah.loc["llama-3-8b-instruct", "score"] == 20.56 and ah.loc["gpt-4-0314", "score"] == 50.0


def test_rank_statistics_match_hand_computed_values_on_the_official_numbers():
    """Official LC against official raw win rate of the 8 models (the baseline excluded): claude-2 and
    gpt-3.5-turbo-1106 swap places with the 8B models; the values are worked out by hand (Spearman 1 - 6*4/(8*63))."""
    ae = official_scores(str(ALPACA / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"), "alpaca_eval").loc[
        AE_MODELS
    ]
    lc, wr = ae["length_controlled_winrate"].to_numpy(), ae["win_rate"].to_numpy()
    stats = rank_agreement(lc, wr)
    assert stats["spearman"] == pytest.approx(1 - 6 * 4 / (8 * 63)) and stats["kendall"] == pytest.approx(
        24 / 28
    )
    assert (
        stats["mean_abs_diff"] == pytest.approx(np.mean(np.abs(wr - lc))) == pytest.approx(4.826064, abs=1e-6)
    )
    assert stats["mean_diff"] == pytest.approx(np.mean(wr - lc))
    ci = over_models(lc, wr, 500, seed=0)
    assert ci["spearman"][0] < stats["spearman"] <= ci["spearman"][1] <= 1.0  # wide with 8 models
    # a perfectly ranked, evenly shifted judge: rank statistics 1 in every replicate, the shift exactly
    shifted = over_prompts(lc[:3], np.tile([[0.9], [0.5], [0.1]], (1, 10)), 200, seed=0)
    assert shifted["spearman"] == [1.0, 1.0] and shifted["kendall"] == [1.0, 1.0]


@pytest.mark.integration
def test_the_embedded_judge_scores_published_alpaca_eval_outputs_and_reports_agreement(tmp_path):
    """Real published outputs of 3 leaderboard models (those with the shortest answers: on CPU a verdict costs the
    prompt's length) and the baseline, judged by the real embedded model through eval.alpaca_eval; the statistics
    are recomputed here from the files it wrote."""
    MODELS = ["claude-2", "gpt-3.5-turbo-1106", "alpaca-7b"]
    (cfg,) = parse_config(
        "agreement",
        ["recipe=alpaca_eval_demo", f"published={ALPACA / 'results'}",
         f"leaderboard={ALPACA / 'weighted_alpaca_eval_gpt4_turbo_leaderboard.csv'}", "max_questions=2",
         "models=[claude-2,gpt-3.5-turbo-1106,alpaca-7b]", "n_bootstrap=200",
         f"output_dir={tmp_path / 'agree'}"],
        AgreementConfig,
    )  # fmt: skip
    result = run(cfg)
    wr = result["metrics"]["win_rate"]
    assert wr["n_models"] == 3 and "lc_win_rate" not in result["metrics"]  # offline: no df_gamed.csv, no LC
    ours = []
    for m in MODELS:
        annotations = json.loads((tmp_path / "agree" / "alpaca_eval" / m / "annotations.json").read_text())
        assert len(annotations) == 2 and {a["generator_2"] for a in annotations} == {m}
        prefs = [a["preference"] for a in annotations if a["preference"] is not None]
        ours.append(100 * np.mean(np.array(prefs) - 1))
        assert wr["per_model"][m]["ours"] == pytest.approx(ours[-1])
    official = [wr["per_model"][m]["official"] for m in MODELS]
    assert official == pytest.approx([17.1882, 9.1780, 2.5915], abs=1e-4)  # the leaderboard's win rates
    expected = rank_agreement(np.array(official), np.array(ours))
    assert {k: wr[k] for k in expected} == pytest.approx(expected)
    assert set(wr["intervals"]) == {"over_models", "over_prompts"}
    md = (tmp_path / "agree" / "agreement.md").read_text()
    assert "| alpaca_eval/win_rate | spearman |" in md and "95% CI (over prompts)" in md
    calls = json.loads((tmp_path / "agree" / "alpaca_eval" / "claude-2" / "results.json").read_text())[
        "judge_calls"
    ]
    again = run(cfg)  # cached verdicts: the same numbers, no new judge request
    assert again["metrics"]["win_rate"]["spearman"] == wr["spearman"]
    cached = json.loads((tmp_path / "agree" / "alpaca_eval" / "claude-2" / "results.json").read_text())[
        "judge_calls"
    ]
    assert calls["calls"] > 0 and cached["calls"] == 0 and cached["cached"] == calls["calls"]


@pytest.mark.integration
def test_the_embedded_judge_scores_published_arena_hard_answers_and_reports_agreement(
    tmp_path, embedded_path
):
    (cfg,) = parse_config(
        "agreement",
        ["recipe=arena_hard_demo", f"published={ARENA}", f"leaderboard={ARENA / 'arena_hard_leaderboard_20240731.csv'}",
         "models=[gpt-4-0613,llama-3-8b-instruct,gemma-2b-it]", "max_questions=1", f"judge.model={embedded_path}",
         f"output_dir={tmp_path / 'agree'}"],
        AgreementConfig,
    )  # fmt: skip
    result = run(cfg)
    score = result["metrics"]["score"]
    assert score["n_models"] == 3 and set(score["intervals"]) == {"over_models"}
    scores = {json.loads(line)["model"]: json.loads(line)["value"]
              for line in (tmp_path / "agree" / "arena_hard" / "scores.jsonl").read_text().splitlines()}  # fmt: skip
    for m in ["gpt-4-0613", "llama-3-8b-instruct", "gemma-2b-it"]:
        assert score["per_model"][m]["ours"] == pytest.approx(scores[m])
    official = [
        score["per_model"][m]["official"] for m in ["gpt-4-0613", "llama-3-8b-instruct", "gemma-2b-it"]
    ]
    assert official == [37.9, 20.56, 3.0]
    saved = json.loads(
        (tmp_path / "agree" / "agreement.json").read_text()
    )  # strict JSON: an undefined rho is null
    expected = rank_agreement(
        np.array(official),
        np.array([scores[m] for m in ["gpt-4-0613", "llama-3-8b-instruct", "gemma-2b-it"]]),
    )
    assert saved["metrics"]["score"]["spearman"] == (
        None if np.isnan(expected["spearman"]) else pytest.approx(expected["spearman"])
    )
    judged = list((tmp_path / "agree" / "arena_hard" / "model_judgment").rglob("*.jsonl"))
    assert len(judged) == 3 and all(len(p.read_text().splitlines()) == 1 for p in judged)


def test_bad_inputs_are_one_line_errors_naming_what_is_wrong(tmp_path):
    base = [f"published={ALPACA / 'results'}", f"leaderboard={ALPACA / 'weighted_alpaca_eval_gpt4_turbo_leaderboard.csv'}",
            f"output_dir={tmp_path / 'o'}"]  # fmt: skip

    def fails(*extra):
        (cfg,) = parse_config("agreement", [*base, *extra], AgreementConfig)
        with pytest.raises(ConfigError) as e:
            run(cfg)
        return str(e.value)

    assert "leaderboard: no such file" in fails(f"leaderboard={tmp_path / 'none.csv'}")
    assert "published: no such directory" in fails(f"published={tmp_path / 'none'}")
    assert "models: no published outputs of nobody" in fails("models=[nobody,claude-2,alpaca-7b]")
    assert "at least 3 models" in fails("models=[claude-2,alpaca-7b]")
    other = tmp_path / "results"
    shutil.copytree(ALPACA / "results", other, ignore=shutil.ignore_patterns("gpt4_1106_preview"))
    assert "no outputs of the baseline gpt4_1106_preview" in fails(f"published={other}")
    bad = tmp_path / "lb.csv"
    bad.write_text("model,elo\nx,1\n")
    assert "has none of the columns" in fails(f"leaderboard={bad}")
    assert not (tmp_path / "o").exists()  # found out before anything was written

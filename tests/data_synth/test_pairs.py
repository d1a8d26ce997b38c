import json

import datasets
import pytest

from data_synth.pairs import PairsConfig, best_and_worst, run


def test_best_and_worst_drops_ties_and_unscored():
    assert best_and_worst([3.0, 7.0, 5.0, 1.0]) == (1, 3)
    assert best_and_worst([4.0, 4.0, 4.0]) is None  # a tie
    assert best_and_worst([None, 6.0, None]) is None  # one scored response is not a pair
    assert best_and_worst([None, 6.0, 2.0]) == (1, 2)


def test_pairs_on_the_embedded_model_in_trl_format(tmp_path):
    data = tmp_path / "rows.jsonl"
    questions = ["Give me a tip for learning a new language.", "Describe the color blue.", "Why do we sleep?"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]})
            + "\n"
            for q in questions
        )
    )
    cfg = PairsConfig(
        input=str(data),
        output_dir=str(tmp_path / "pairs"),
        n_samples=3,
        max_tokens=24,
        test_size=0.34,
        chunk_size=2,
        judge_max_tokens=48,
    )
    summary = run(cfg)
    assert summary["prompts"] == 3 and summary["pairs"] + summary["ties_dropped"] == 3
    assert summary["train"] + summary["test"] == summary["pairs"]
    assert "not a reward model" in summary["scorer"]
    assert summary["pairs"] >= 1  # probability-weighted judge scores rarely tie
    ds = datasets.load_dataset("parquet", data_dir=cfg.output_dir)
    rows = [r for split in ds.values() for r in split]
    assert len(rows) == summary["pairs"]
    for r in rows:
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"] in questions
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["score_chosen"] > r["score_rejected"]
        assert r["score_chosen"] == max(s for s in r["all_scores"] if s is not None)


def test_bad_settings():
    with pytest.raises(ValueError, match="n_samples must be >= 2"):
        PairsConfig(n_samples=1)

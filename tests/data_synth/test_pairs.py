import json

import datasets
import pytest

from data_synth.pairs import PairsConfig, best_and_worst, run
from tests.conftest import write_questions


def test_best_and_worst_drops_ties_and_unscored():
    assert best_and_worst([3.0, 7.0, 5.0, 1.0]) == (1, 3)
    assert best_and_worst([4.0, 4.0, 4.0]) is None  # a tie
    assert best_and_worst([None, 6.0, None]) is None  # one scored response is not a pair
    assert best_and_worst([None, 6.0, 2.0]) == (1, 2)


@pytest.mark.integration
def test_pairs_on_the_embedded_model_in_trl_format(tmp_path):
    questions = ["Give me a tip for learning a new language.", "Describe the color blue.", "Why do we sleep?"]
    data = write_questions(tmp_path / "rows.jsonl", questions)
    cfg = PairsConfig(
        input=str(data),
        output_dir=str(tmp_path / "pairs"),
        n_samples=3,
        max_tokens=24,
        test_size=0.34,
        chunk_size=2,
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
    from core.config import ConfigError, build

    with pytest.raises(ConfigError, match="key 'n_samples': must be >= 2, got 1"):
        build({"n_samples": 1}, PairsConfig)


def test_ties_for_best_or_worst_go_to_the_first_index():
    # the Magpie authors' notebook: chosen = np.argmax (first highest), rejected = np.argmin (first lowest)
    assert best_and_worst([1.0, 5.0, 5.0, 1.0]) == (1, 0)


def test_pairs_from_responses_the_input_already_scored(tmp_path):
    # The authors' released DPO layout (instruction, 5 responses at T=0.8, rewards_armorm [{score}]) ...
    authors = [
        {"instruction": "Why is the sky blue?", "responses": ["a", "b", "c", "d", "e"],
         "rewards_armorm": [{"score": 0.1}, {"score": 0.9}, {"score": 0.9}, {"score": -0.3}, {"score": -0.3}]},
        {"instruction": "Say hi.", "responses": ["x", "y", "z", "w", "v"],
         "rewards_armorm": [{"score": 0.5}] * 5},  # all equal: dropped and counted
    ]  # fmt: skip
    (tmp_path / "authors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in authors))
    summary = run(
        PairsConfig(input=str(tmp_path / "authors.jsonl"), output_dir=str(tmp_path / "p1"), test_size=0.0)
    )
    assert (
        summary["pairs"] == 1 and summary["ties_dropped"] == 1 and "given in the input" in summary["scorer"]
    )
    (row,) = datasets.load_dataset("parquet", data_dir=str(tmp_path / "p1"), split="train")
    assert row["prompt"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert row["chosen"][0]["content"] == "b" and row["rejected"][0]["content"] == "d"  # first of equals
    assert (row["score_chosen"], row["score_rejected"]) == (0.9, -0.3)
    # ... and a plain responses + scores layout
    plain = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "-"}],
              "responses": ["r0", "r1", "r2"], "scores": [2.0, 3.0, 1.0]}]  # fmt: skip
    (tmp_path / "plain.jsonl").write_text(json.dumps(plain[0]) + "\n")
    run(PairsConfig(input=str(tmp_path / "plain.jsonl"), output_dir=str(tmp_path / "p2"), test_size=0.0))
    (row,) = datasets.load_dataset("parquet", data_dir=str(tmp_path / "p2"), split="train")
    assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ("r1", "r2")


@pytest.mark.integration
def test_rows_that_hold_only_an_instruction_are_sampled_scored_and_paired(
    tmp_path, embedded_path, table_server, monkeypatch
):
    """The Magpie authors' DPO inputs hold an instruction and its tags but no response; a plain `prompt` column
    (text, or trl's messages) is the same thing. Every such row is a prompt: a pair or a counted tie."""
    from tests.core.test_output_dir import main

    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    rows = [{"instruction": "Name a colour.", "input_quality": "good", "difficulty": "easy", "task_category": "x"},
            {"prompt": "Name a fish."}, {"prompt": [{"role": "user", "content": "Name a tree."}]}]  # fmt: skip
    data = tmp_path / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = table_server([["", {"cycle": ["Good answer.", "Poor answer."]}]])
    judge = table_server([["Poor answer.", {"text": "2", "top_logprobs": {"2": -0.01}}],
                          ["", {"text": "9", "top_logprobs": {"9": -0.01}}]])  # fmt: skip
    engine = lambda prefix, url: [f"{prefix}engine.backend=openai", f"{prefix}engine.base_urls=[{url}]",  # noqa: E731
                                  f"{prefix}engine.tokenizer={embedded_path}",
                                  f"{prefix}engine.api_key_env=TEST_SERVER_KEY"]  # fmt: skip
    code, err = main("data_synth.pairs", f"input={data}", f"output_dir={tmp_path / 'pairs'}", "model=policy",
                     "n_samples=2", "test_size=0", f"judge.model={embedded_path}", "judge.max_tokens=1",
                     *engine("", policy), *engine("judge.", judge))  # fmt: skip
    assert code == 0, err
    pairs = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pairs"))["train"]
    assert sorted(r["prompt"][0]["content"] for r in pairs) == [
        "Name a colour.",
        "Name a fish.",
        "Name a tree.",
    ]
    assert all(r["chosen"][0]["content"] == "Good answer." for r in pairs)

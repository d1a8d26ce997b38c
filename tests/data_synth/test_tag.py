import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import core.judge
import data_synth.tag as tag
from core.config import ConfigError
from core.judge import JudgeConfig
from data_synth.tag import taggers


def test_judge_replies_parse_strictly():
    ok = tag.parse_judgment('"explanation": "clear", "input_quality": "Good"}', tag.parse_quality)
    assert ok == {"input_quality": "good", "quality_explanation": "clear"}
    with pytest.raises(ValueError, match="not JSON"):
        tag.parse_judgment('"explanation": "clear", input_quality: good', tag.parse_quality)
    with pytest.raises(ValueError, match="expected one of"):
        tag.parse_judgment('"input_quality": "great"}', tag.parse_quality)
    with pytest.raises(ValueError, match="missing field"):
        tag.parse_judgment('"explanation": "no rating"}', tag.parse_quality)
    cat = tag.parse_judgment('"primary_tag": "Others", "other_tags": ["math", "Others"]}', tag.parse_category)
    assert cat == {"task_category": "Others", "other_task_category": ["Math"]}
    with pytest.raises(ValueError, match="12 task categories"):  # the original notebook's "Other" bug
        tag.parse_judgment('"primary_tag": "Other", "other_tags": []}', tag.parse_category)
    assert len(tag.TASK_CATEGORIES) == 12


def brute_force(emb: np.ndarray, threshold: float):
    d = np.sqrt(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    cluster = [-1] * len(emb)
    for i in range(len(emb)):  # depth-first search; visiting in index order makes the root the smallest index
        if cluster[i] == -1:
            cluster[i], stack = i, [i]
            while stack:
                for v in np.nonzero(d[stack.pop()] < threshold)[0]:
                    if cluster[v] == -1:
                        cluster[v] = i
                        stack.append(v)
    return d.min(1), (d < threshold).sum(1), cluster


def test_faiss_neighbors_match_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[10] = emb[3]  # an exact duplicate
    emb[20] = emb[3] + 0.01  # L2 0.04: a chain of near-duplicates 3 ~ 10 ~ 20 ~ 40 (3 to 40 is 0.08)
    emb[40] = emb[20] + 0.01
    emb[50] = emb[7] + 0.005  # L2 0.02 over 16 dims
    dmin, repeats, cluster = brute_force(emb, 0.05)
    for block in (4096, 7):  # searched whole, and 7 query rows at a time (blocks straddle the duplicates)
        tags = tag.neighbor_tags(emb, k=60, threshold=0.05, block=block)
        np.testing.assert_allclose(tags["min_neighbor_distance"], dmin, atol=1e-3)
        assert tags["repeat_count"].tolist() == repeats.tolist()
        assert tags["cluster_id"].tolist() == cluster
        assert set(tags["cluster_id"][[3, 10, 20, 40]]) == {3} and tags["cluster_id"][50] == 7
        assert tags["min_neighbor_distance"][10] == 0.0


def conversations(path):
    rows = [
        ("What is the boiling point of water at sea level?", "It is 100 degrees Celsius."),
        (
            "Write a haiku about the sea.",
            "Waves fold into foam / the tide keeps its old promise / gulls write on the wind",
        ),
        ("What is the boiling point of water at sea level?", "100 °C, or 212 °F."),
        ("Quelle est la capitale de la France ?", "La capitale de la France est Paris."),
    ]
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in rows
        )
    )
    return path


@pytest.mark.integration
def test_tagging_real_rows_with_the_embedded_judge_and_resuming(tmp_path, monkeypatch):
    import gc
    import weakref

    data = conversations(tmp_path / "rows.jsonl")
    cfg = tag.TagConfig(
        input=str(data),
        output_dir=str(tmp_path / "tagged"),
        judge=JudgeConfig(max_tokens=48, retries=1, logprobs=None),
        chunk_size=2,
    )
    # Each tagger's models are the only ones alive while it runs (on a GPU, vLLM holds 90% of the memory): the
    # URIAL base model is gone before its responses are scored, the judge's engine before the base model loads.
    made, real_make, real_rewards = [], taggers.make_engine, tag.Context.rewards
    alive_when_scoring, judge_alive_when_base_loads = [], []

    def make(*a):
        gc.collect()
        judge = tag_ctx[0].built("judge") if tag_ctx else None
        judge_alive_when_base_loads.append(judge is not None and judge._engine is not None)
        made.append(weakref.ref(e := real_make(*a)))
        return e

    tag_ctx = []
    real_init = tag.Context.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        tag_ctx.append(self)

    def rewards(self, pairs):
        gc.collect()
        alive_when_scoring.append([m() is not None for m in made])
        return real_rewards(self, pairs)

    monkeypatch.setattr(taggers, "make_engine", make)
    monkeypatch.setattr(tag.Context, "__init__", init)
    monkeypatch.setattr(tag.Context, "rewards", rewards)
    summary = tag.run(cfg)
    assert judge_alive_when_base_loads == [
        False
    ]  # one base model, loaded once, after the judge's engine closed
    assert alive_when_scoring == [[]] * 2 + [[False]] * 2  # reward (2 chunks), then reward_difference
    monkeypatch.undo()
    table = pq.read_table(tmp_path / "tagged" / "train-00000.parquet")
    rows = table.to_pylist()
    assert len(rows) == 4 and [r["messages"][0]["content"] for r in rows][0].startswith("What is the boiling")
    for column in (
        "input_quality",
        "difficulty",
        "task_category",
        "instruct_reward",
        "language",
        "min_neighbor_distance",
        "repeat_count",
        "cluster_id",
        "instruction_n_tokens",
        "response_length",
    ):
        assert column in table.column_names
    assert (
        rows[0]["min_neighbor_distance"] == pytest.approx(0.0, abs=1e-3)
        and rows[0]["cluster_id"] == rows[2]["cluster_id"] == 0
    )
    assert rows[3]["language"] == "fr" and rows[0]["language"] == "en"
    for r in rows:  # every judged row has a valid label or is marked failed, never silently missing
        assert (r["input_quality"] in tag.QUALITY) != r["quality_failed"]
        assert (r["task_category"] in tag.TASK_CATEGORIES) != r["task_category_failed"]
    assert summary["failures"]["quality"]["untagged"] == 0
    for r in rows:  # URIAL base responses scored by the same scorer; the judge stands in for Llama Guard
        # r(response) is the reward tagger's own value, reused, not computed a second time
        assert r["base_response"] is not None
        assert r["reward_difference"] == r["instruct_reward"] - r["base_reward"]
        assert r["safety"] in ("safe", "unsafe") and 0.0 <= r["p_safe"] <= 1.0
    assert "not a guard model" in table.schema.field("safety").metadata[b"source"].decode()
    # Scores come from the judge's score-token probabilities: every row gets a value in range.
    assert all(r["instruct_reward"] is not None and 1 <= r["instruct_reward"] <= 10 for r in rows)
    assert len({round(r["instruct_reward"], 6) for r in rows}) > 1
    assert "not a reward model" in table.schema.field("instruct_reward").metadata[b"source"].decode()

    def no_engine(*a, **k):
        raise AssertionError("a finished tagging run must not call the judge again")

    monkeypatch.setattr(taggers, "make_engine", no_engine)
    monkeypatch.setattr(core.judge, "make_engine", no_engine)
    assert tag.run(cfg)["rows"] == 4


def test_bad_input_fails_before_work(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "hi"}) + "\n")
    with pytest.raises(ConfigError, match=r"row 0: no conversation \(expected messages"):
        tag.run(tag.TagConfig(input=str(path), output_dir=str(tmp_path / "o"), taggers=["lengths"]))
    with pytest.raises(ValueError, match=r"taggers: unknown \['qualty'\]"):
        tag.TagConfig(taggers=["qualty"])


def test_reward_model_path_with_a_tiny_sequence_classifier(tmp_path, embedded_path):
    """The GPU path (FsfairX-style AutoModelForSequenceClassification), on a tiny random-weight model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(embedded_path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    data = conversations(tmp_path / "rows.jsonl")
    cfg = tag.TagConfig(
        input=str(data),
        output_dir=str(tmp_path / "tagged"),
        taggers=["reward"],
        reward_model=str(tmp_path / "rm"),
    )
    tag.run(cfg)
    table = pq.read_table(tmp_path / "tagged" / "train-00000.parquet")
    rewards = table.column("instruct_reward").to_pylist()
    assert len(rewards) == 4 and all(isinstance(r, float) for r in rewards) and len(set(rewards)) > 1
    assert rewards[0] != rewards[2]  # same question, different answers, different scores
    assert (
        table.schema.field("instruct_reward").metadata[b"source"].decode()
        == f"reward model {tmp_path / 'rm'}"
    )


def test_json_labels_from_a_judge_that_answers_them_end_to_end(embedded_path, tmp_path, monkeypatch):
    """The label path a capable judge takes, over real HTTP: prompt -> prefilled "{" -> stop at "}" -> strict
    parse -> columns, with a reply that is not JSON retried and then counted as failed, and `select` filtering
    the mixed labels. The server answers from a table (a judge that really returns valid JSON)."""
    from data_synth import select
    from tests.conftest import start_server

    rows = conversations(tmp_path / "rows.jsonl")
    asks = ["boiling point", "haiku about the sea", "capitale de la France"]
    table = [
        [["rate the quality", asks[0]], ' "explanation": "Clear and specific.", "input_quality": "excellent"}'],
        [["rate the quality", asks[1]], " I think this one is fine"],  # not JSON: retried, then failed
        [["rate the quality", asks[2]], ' "explanation": "Short.", "input_quality": "Poor"}'],
        [["difficulty level"], ' "intent": "The user wants a fact", "knowledge": "physics", "difficulty": "easy"}'],
        [["task tags", asks[1]], ' "primary_tag": "Creative writing", "other_tags": ["Creative writing", "brainstorming"]}'],
        [["task tags"], ' "primary_tag": "Information seeking", "other_tags": []}'],
    ]  # fmt: skip
    (tmp_path / "table.json").write_text(json.dumps(table))
    url, proc = start_server(embedded_path, tmp_path / "table.json")
    monkeypatch.setenv("TABLE_KEY", "sk-test-123")
    try:
        judge = JudgeConfig(model=embedded_path, max_tokens=64, retries=1, logprobs=None)
        judge.engine.backend, judge.engine.base_urls, judge.engine.api_key_env = "openai", [url], "TABLE_KEY"
        cfg = tag.TagConfig(input=str(rows), output_dir=str(tmp_path / "tagged"), judge=judge,
                            taggers=["quality", "difficulty", "task_category"])  # fmt: skip
        summary = tag.run(cfg)
    finally:
        proc.kill()
    tagged = pq.read_table(tmp_path / "tagged" / "train-00000.parquet").to_pylist()
    assert [r["input_quality"] for r in tagged] == ["excellent", None, "excellent", "poor"]
    assert [r["quality_failed"] for r in tagged] == [False, True, False, False]
    assert tagged[0]["quality_explanation"] == "Clear and specific."
    assert {r["difficulty"] for r in tagged} == {"easy"} and tagged[0]["intent"] == "The user wants a fact"
    assert tagged[1]["task_category"] == "Creative writing"
    assert tagged[1]["other_task_category"] == ["Brainstorming"]  # the primary tag is not repeated
    assert summary["failures"]["quality"] == {"failed": 1, "untagged": 0}
    # 12 prompts, plus one retry of the reply that was not JSON; a rerun asks nothing (the judge's cache)
    assert summary["judge_calls"] == {"calls": 13, "cached": 0, "unparsed": 1, "engine_errors": 0}

    selected = select.run(select.SelectConfig(input=str(tmp_path / "tagged"), output_dir=str(tmp_path / "sel"),
                                              filters=[select.Filter("input_quality", ">=", "good")]))  # fmt: skip
    assert selected["selected_rows"] == 2  # the failed label never passes a filter


def test_a_reward_model_without_a_trained_head_is_refused_not_scored_at_random(tmp_path, embedded_path):
    """transformers gives a checkpoint without a reward head (a plain language model, or ArmoRM loaded without its
    own code) a random one and only warns: its rewards would be noise."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from core.engines import EngineError

    tok = AutoTokenizer.from_pretrained(embedded_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.eos_token_id)  # fmt: skip
    for name, cls in (("rm", LlamaForSequenceClassification), ("lm", LlamaForCausalLM)):
        cls(config).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    scores = tag.RewardModel(str(tmp_path / "rm"), batch_size=2)([("Hi?", "Hello."), ("2+2?", "4.")])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    with pytest.raises(
        EngineError, match=r"has no trained reward head \(score\.weight.*reward_trust_remote_code=true"
    ):
        tag.RewardModel(str(tmp_path / "lm"), batch_size=2)

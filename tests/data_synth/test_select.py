import pandas as pd
import pytest

from core.config import ConfigError, parse_config
from data_synth.select import SelectConfig, select


def row(i, q, d, mnd, rd, rw, rlen, cluster, instruction=None):
    text = instruction or f"question {i}?"
    return {
        "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x" * rlen}],
        "input_quality": q,
        "difficulty": d,
        "min_neighbor_distance": mnd,
        "reward_difference": rd,
        "instruct_reward": rw,
        "response_length": rlen,
        "cluster_id": cluster,
    }


TABLE = pd.DataFrame([
    row(0, "excellent", "hard", 0.30, 1.5, -3.0, 500, 0),
    row(1, "good", "medium", 0.20, 0.5, -11.0, 900, 1),
    row(2, "average", "very hard", 0.40, 2.0, -5.0, 800, 2),  # quality too low for Air, fine for Pro
    row(3, "good", "easy", 0.50, 3.0, -1.0, 700, 3),  # too easy for Air
    row(4, "excellent", "medium", 0.0, 1.0, -2.0, 950, 4),  # an exact duplicate: min_neighbor_distance 0
    row(5, "good", "hard", 0.25, -0.5, -4.0, 990, 5),  # reward difference <= 0
    row(6, "poor", "medium", 0.35, 1.0, -13.0, 600, 6),
    row(7, None, "medium", 0.30, 1.0, -2.0, 999, 7),  # a failed quality judgment
    row(8, "good", "hard", 0.01, 1.2, -9.0, 400, 1, instruction="List the steps:"),  # same cluster as 1
])  # fmt: skip


def run_recipe(name, *overrides):
    (cfg,) = parse_config("select", [f"recipe={name}", *overrides], SelectConfig)
    chosen, steps = select(TABLE, cfg)
    return list(chosen.index), {s["step"]: s["removed"] for s in steps}


def test_air_300k_filtered():
    rows, removed = run_recipe("air_300k_filtered", "top_k=3")
    assert rows == [1, 0, 8]  # survivors 0, 1, 8 by response length: 900, 500, 400
    assert removed == {
        "input": 0,
        "input_quality >= good": 3,
        "difficulty >= medium": 1,
        "min_neighbor_distance > 0": 1,
        "reward_difference > 0": 1,
        "top_k 3 by response_length": 0,
    }


def test_pro_300k_filtered():
    rows, removed = run_recipe("pro_300k_filtered", "top_k=4")
    # quality >= average drops 6 (poor) and 7 (missing); mnd > 0 drops 4; reward > -12 keeps 1 (-11)
    assert rows == [5, 1, 2, 3]
    assert removed["input_quality >= average"] == 2 and removed["min_neighbor_distance > 0"] == 1
    assert removed["top_k 4 by response_length"] == 2  # 6 survivors (5,1,2,3,0,8) -> 4


def test_code_release_dedups_clusters_and_shuffles_reproducibly():
    rows, removed = run_recipe("code_release")
    # good/excellent: 0,1,3,4,5,8; reward > -10 drops 1; not ending with ':' drops 8; clusters all distinct
    assert sorted(rows) == [0, 3, 4, 5]
    assert removed["instruction not_endswith :"] == 1
    assert rows == run_recipe("code_release")[0]  # seed 42: the same order every time
    rows2, removed2 = run_recipe("code_release", "filters=[]")
    assert removed2["dedup_clusters"] == 1 and 8 not in rows2  # 8 shares cluster 1 and comes later


def test_bad_rules_fail_before_work():
    with pytest.raises(ConfigError, match=r"filters\[0\]: column 'quality' does not exist"):
        select(TABLE, SelectConfig(filters=[_f("quality", ">=", "good")]))
    with pytest.raises(
        ConfigError, match=r"'instruct_reward > 'high'' needs a numeric column and a numeric threshold"
    ):
        select(TABLE, SelectConfig(filters=[_f("instruct_reward", ">", "high")]))
    with pytest.raises(ConfigError, match=r"value 'great' for 'input_quality' must be one of"):
        select(TABLE, SelectConfig(filters=[_f("input_quality", ">=", "great")]))
    with pytest.raises(ConfigError, match="sort_by: column 'length' does not exist"):
        select(TABLE, SelectConfig(sort_by="length"))


def _f(column, op, value):
    from data_synth.select import Filter

    return Filter(column, op, value)


@pytest.mark.integration
def test_code_release_keeps_the_authors_rows_in_the_authors_order(tmp_path):
    """The Magpie authors' data_sft/data_filter.ipynb, run as written (datasets' filter, sort, select, shuffle) on
    rows in their released layout, against `recipe=code_release` on the same file: the same rows in the same order.
    Their `endswith(':')` reads the raw text, so an instruction ending ": " or ":\\n" is kept; their shuffle is
    Dataset.shuffle(seed=42); equal response lengths keep the file's order."""
    import json
    import random

    from datasets import load_dataset

    from tests.core.test_output_dir import main

    rng = random.Random(0)
    endings = ["?", ":", ": ", ":\n", "."]
    rows = []
    for i in range(60):
        cid = f"c{i}"
        rows.append({
            "conversation_id": cid,
            "instruction": f"Question {i}{endings[i % 5]}",
            "response": "x" * rng.choice([40, 40, 55, 70, 70, 90]),  # ties in length
            "input_quality": rng.choice(["excellent", "good", "good", "average", "poor"]),
            "instruct_reward": rng.uniform(-14, 2),
            "min_similar_conversation_id": rng.choice([None, None, cid, "c0"]),
        })  # fmt: skip
    path = tmp_path / "magpie.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # data_sft/data_filter.ipynb, with 300000 -> top
    top = 12
    dataset = load_dataset("json", data_files=str(path))

    def high_quality_filter(example):
        return (
            example["input_quality"] in ["good", "excellent"]
            and example["instruct_reward"] > -10
            and not example["instruction"].endswith(":")
            and (example["min_similar_conversation_id"] is None
                 or example["conversation_id"] == example["min_similar_conversation_id"])
        )  # fmt: skip

    filtered = dataset["train"].filter(high_quality_filter)
    filtered = filtered.map(lambda x: {"response_length": len(x["response"])})
    theirs = filtered.sort("response_length", reverse=True).select(range(top)).shuffle(seed=42)

    code, err = main("data_synth.select", "recipe=code_release", f"input={path}", f"top_k={top}",
                     f"output_dir={tmp_path / 'ours'}")  # fmt: skip
    assert code == 0, err
    ours = load_dataset("parquet", data_files=str(tmp_path / "ours" / "*.parquet"))["train"]
    assert ours["conversation_id"] == theirs["conversation_id"]
    assert any(q.endswith((": ", ":\n")) for q in ours["instruction"])  # kept, as theirs keeps them

"""The Magpie authors' released data flows through: their column vocabulary (the layout of their released data sets,
from their exp/gen_dis.py, exp/unitag.py and data_sft/data_concatenation.ipynb) read by our stages as is."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from core.chat import first_turn, to_messages
from tests.conftest import ROOT


def authors_row(cid, instruction, response, quality, reward, min_similar):
    """One row as the authors release it (Magpie-Pro-1M / Air-3M)."""
    return {
        "conversation_id": cid,
        "instruction": instruction,
        "response": response,
        "conversations": [{"from": "human", "value": instruction}, {"from": "gpt", "value": response}],
        "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "input_generator": "meta-llama/Meta-Llama-3-70B-Instruct",
                              "pre_query_template": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"},
        "intent": "The user wants to know something.", "knowledge": "The models need to know things.",
        "difficulty": "medium", "difficulty_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "input_quality": quality, "quality_explanation": "Clear.", "quality_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "task_category": "Information seeking", "other_task_category": ["Reasoning"],
        "task_category_generator": "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama_guard_2": "safe", "instruct_reward": reward, "reward_model": "sfairXC/FsfairX-LLaMA3-RM-v0.1",
        "language": "EN", "min_neighbor_distance": 0.3, "repeat_count": 0, "min_similar_conversation_id": min_similar,
    }  # fmt: skip


ROWS = [
    authors_row("c0", "What is a prime number?", "x" * 50, "good", 1.0, None),
    authors_row("c1", "How do tides work?", "x" * 80, "excellent", -5.0, "c1"),
    authors_row("c2", "Tell me stuff", "x" * 300, "average", 4.0, None),  # quality
    authors_row("c3", "Why is grass green?", "x" * 300, "good", -11.0, None),  # reward <= -10
    authors_row("c4", "Complete the list:", "x" * 300, "good", 4.0, None),  # trailing ':'
    authors_row("c5", "What's a prime?", "x" * 120, "excellent", 0.0, "c0"),  # a near-duplicate of c0
    authors_row("c6", "Name a river.", "x" * 10, "good", 2.0, None),
    authors_row("c7", "Explain entropy.", "x" * 200, "excellent", 3.0, "c7"),
]


def select(tmp_path, *overrides):
    data = tmp_path / "magpie_pro_1m.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / f"sel{len(list(tmp_path.iterdir()))}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "data_synth.select", "recipe=code_release", f"input={data}",
                           f"output_dir={out}", *overrides], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-1500:]
    return pq.read_table(out / "train-00000.parquet").to_pylist()


@pytest.mark.integration
def test_their_code_release_filter_runs_on_their_columns(tmp_path):
    # good/excellent, reward > -10, no trailing ':', first of each min_similar_conversation_id group
    kept = select(tmp_path)
    assert sorted(r["conversation_id"] for r in kept) == ["c0", "c1", "c6", "c7"]
    assert set(kept[0]) == set(ROWS[0])  # their columns come back as they were, none added
    # then the longest responses (len(response), derived since they never wrote response_length)
    assert sorted(r["conversation_id"] for r in select(tmp_path, "top_k=2")) == ["c1", "c7"]


def test_every_layout_reads_as_a_conversation():
    row = ROWS[0]
    expected = [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]
    assert to_messages(row, "r") == expected  # conversations (from/value)
    assert (
        to_messages({k: v for k, v in row.items() if k != "conversations"}, "r") == expected
    )  # instruction/response
    assert first_turn({"instruction": "Q", "output": "A"}) == ("Q", "A")  # Alpaca


@pytest.mark.integration
def test_tag_reads_their_rows(tmp_path):
    from data_synth.tag import TagConfig, run

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    run(TagConfig(input=str(tmp_path / "rows.jsonl"), output_dir=str(tmp_path / "t"), taggers=["lengths"]))
    tagged = pq.read_table(tmp_path / "t" / "train-00000.parquet").to_pylist()
    assert [r["response_length"] for r in tagged] == [50, 80, 300]

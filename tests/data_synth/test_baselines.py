"""Each baseline's real schema, as small fixtures written here, normalized to `messages`."""

import json

import pyarrow.parquet as pq
import pytest

from data_synth.baselines import SOURCES, BaselineConfig, run

U, A = "What is the tallest mountain?", "Mount Everest, 8,849 m."

FIXTURES = {
    # ShareGPT: conversations with from/value; a system turn; a trailing unanswered turn; a broken speaker
    "sharegpt": [
        {
            "id": "a1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": U},
                {"from": "gpt", "value": A},
            ],
        },
        {
            "id": "a2",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Are you there?"},
            ],
        },
        {"id": "a3", "conversations": [{"from": "narrator", "value": "?"}]},
        {
            "id": "a4",
            "conversations": [{"from": "gpt", "value": "I speak first."}, {"from": "human", "value": "ok"}],
        },
    ],
    # WildChat: conversation with role/content and per-turn metadata, row metadata kept
    "wildchat": [
        {
            "conversation_id": "w1",
            "model": "gpt-4",
            "language": "English",
            "toxic": False,
            "redacted": False,
            "turn": 1,
            "conversation": [
                {"role": "user", "content": U, "language": "English"},
                {"role": "assistant", "content": A, "language": "English"},
            ],
        },
        {
            "conversation_id": "w2",
            "model": "gpt-3.5-turbo",
            "language": "English",
            "toxic": False,
            "redacted": False,
            "turn": 1,
            "conversation": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": ""}],
        },
    ],
    # Evol-Instruct: V2 conversations, or the 70k instruction/output schema
    "evol_instruct": [
        {"idx": "e1", "conversations": [{"from": "human", "value": U}, {"from": "gpt", "value": A}]},
        {"instruction": "Summarize:", "input": "The cat sat on the mat.", "output": "A cat sat."},
        {"instruction": "Only an instruction, no output field"},
    ],
    # UltraChat 200k: messages (role/content), prompt and prompt_id
    "ultrachat": [
        {
            "prompt": U,
            "prompt_id": "u1",
            "messages": [
                {"role": "user", "content": U},
                {"role": "assistant", "content": A},
                {"role": "user", "content": "And the second?"},
                {"role": "assistant", "content": "K2, 8,611 m."},
            ],
        },
        {
            "prompt": U,
            "prompt_id": "u2",
            "messages": [{"role": "user", "content": U}, {"role": "assistant", "content": A}],
        },
    ],
    # Tulu V2 Mix: messages plus dataset and id
    "tulu_v2_mix": [
        {
            "dataset": "flan_v2",
            "id": "t1",
            "messages": [{"role": "user", "content": U}, {"role": "assistant", "content": A}],
        },
    ],
    # OpenHermes 2.5: conversations with system/human/gpt and a source field
    "openhermes": [
        {
            "source": "airoboros2.2",
            "category": "orca",
            "conversations": [
                {"from": "system", "value": "You are a geographer."},
                {"from": "human", "value": U},
                {"from": "gpt", "value": A},
            ],
        },
    ],
}
EXPECTED = {  # (rows kept, dropped)
    "sharegpt": (2, 2), "wildchat": (1, 1), "evol_instruct": (2, 1), "ultrachat": (2, 0), "tulu_v2_mix": (1, 0),
    "openhermes": (1, 0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_schema_normalizes_to_messages(name, tmp_path):
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in FIXTURES[name]))
    summary = run(BaselineConfig(name=name, source=str(source), output_dir=str(tmp_path / "out")))
    rows = pq.read_table(tmp_path / "out" / "train-00000.parquet").to_pylist()
    assert (summary["rows"], sum(summary["dropped"].values())) == EXPECTED[name]
    for r in rows:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[0] == "user" and roles[-1] == "assistant" and r["source"] == name
    assert name in SOURCES and "/" in SOURCES[name][0]  # a real Hub id is the default source


def test_specific_normalizations(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in FIXTURES["sharegpt"]))
    summary = run(BaselineConfig(name="sharegpt", source=str(src), output_dir=str(tmp_path / "o")))
    rows = pq.read_table(tmp_path / "o" / "train-00000.parquet").to_pylist()
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "Hello!"}  # trailing user turn cut
    assert summary["dropped"] == {
        "turn 0 has speaker 'narrator' or a non-text value": 1,
        "roles out of order": 1,
    }
    wild = tmp_path / "w.jsonl"
    wild.write_text("".join(json.dumps(r) + "\n" for r in FIXTURES["wildchat"]))
    run(BaselineConfig(name="wildchat", source=str(wild), output_dir=str(tmp_path / "w")))
    row = pq.read_table(tmp_path / "w" / "train-00000.parquet").to_pylist()[0]
    assert row["model"] == "gpt-4" and row["conversation_id"] == "w1" and row["language"] == "English"


def test_dedup_and_sampling(tmp_path):
    src = tmp_path / "u.jsonl"
    rows = FIXTURES["ultrachat"] * 3 + [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(10)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(
        BaselineConfig(
            name="ultrachat", source=str(src), output_dir=str(tmp_path / "d"), dedup=True, max_samples=5
        )
    )
    assert summary["duplicates_dropped"] == 5 and summary["rows"] == 5  # 16 rows, 11 distinct first turns
    with pytest.raises(ValueError, match="unknown baseline 'sharegtp'"):
        BaselineConfig(name="sharegtp")

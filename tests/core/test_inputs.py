"""Inputs are read whole or refused in one line: a directory mixing formats, a truncated shard, a huge file that is not
JSON, a column of the wrong type. And a failure that is not the input's (a bug, a full disk) keeps its traceback."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError
from core.data import load_rows, open_dataset
from core.shards import ShardWriter
from tests.core.test_output_dir import main


def conversation(q: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "An answer."}]}


def test_a_directory_mixing_formats_is_refused_naming_both(tmp_path):
    pq.write_table(pa.Table.from_pylist([conversation("a")]), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps(conversation("b")) + "\n")
    with pytest.raises(
        ConfigError, match=r"holds both \.jsonl \(b\.jsonl\) and \.parquet \(a\.parquet\) files"
    ):
        open_dataset(tmp_path)
    code, err = main("data_synth.select", f"input={tmp_path}", f"output_dir={tmp_path.parent / 'sel'}")
    assert (
        code == 2 and "holds both .jsonl (b.jsonl) and .parquet (a.parquet)" in err
    )  # not half the rows, exit 0


def test_a_stage_output_directory_reads_as_its_shards_alone(tmp_path):
    for k in range(2):
        pq.write_table(pa.Table.from_pylist([conversation(f"q{k}")]), tmp_path / f"train-0000{k}.parquet")
    (tmp_path / "manifest.json").write_text("{}")  # what every stage writes beside its data
    (tmp_path / "_empty-00002.json").write_text("{}")
    assert [r["messages"][0]["content"] for r in load_rows(tmp_path)] == ["q0", "q1"]


def test_a_truncated_shard_is_named_on_resume(tmp_path):
    ShardWriter(tmp_path, rows_per_shard=1).add([{"x": 1}])
    shard = tmp_path / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:40])  # cut by a copy or a full disk
    with pytest.raises(
        ConfigError, match=r"train-00000\.parquet: not a readable Parquet file .*move it away"
    ):
        ShardWriter(tmp_path)
    with pytest.raises(ConfigError, match=r"train-00000\.parquet: not a readable Parquet file"):
        open_dataset(tmp_path)


def test_a_truncated_tag_shard_is_named(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(conversation(q)) + "\n" for q in ("Why?", "How?")))
    args = [f"input={data}", f"output_dir={tmp_path / 'tagged'}", "taggers=[language]"]
    assert main("data_synth.tag", *args)[0] == 0
    (shard,) = (tmp_path / "tagged" / "tags" / "language").glob("part-*.parquet")
    shard.write_bytes(shard.read_bytes()[:-20])
    code, err = main("data_synth.tag", *args)
    assert code == 2 and f"{shard}: not a readable Parquet file" in err


def test_a_huge_file_that_is_not_json_fails_before_any_scan(tmp_path):
    sparse = tmp_path / "big.jsonl"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)  # 2 GB of zeros, no disk used
    start = time.time()
    with pytest.raises(ConfigError, match=r"big\.jsonl:1: not JSON \(it starts with b'\\x00"):
        open_dataset(sparse)
    assert time.time() - start < 5  # `datasets` spent minutes scanning it before


@pytest.mark.parametrize("value", ["hello", 7, [1, 2], [{"text": "no role"}]])
def test_a_messages_column_of_the_wrong_type_is_one_line(tmp_path, value):
    pq.write_table(pa.Table.from_pylist([{"messages": value}]), tmp_path / "train-00000.parquet")
    code, err = main("data_synth.tag", f"input={tmp_path}", f"output_dir={tmp_path.parent / 'tagged'}",
                     "taggers=[lengths]")  # fmt: skip
    assert code == 2 and f"{tmp_path}: row 0: 'messages'" in err and "{role, content} message" in err, err
    assert "Traceback" not in err


def test_a_failure_that_is_not_the_inputs_keeps_its_traceback(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "ok.jsonl").write_text(json.dumps(conversation("fine")) + "\n")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "load_dataset", full_disk)
    with pytest.raises(OSError, match="No space left"):  # not "bad input, exit 2"
        open_dataset(tmp_path / "ok.jsonl")
    with pytest.raises(OSError, match="No space left"):
        open_dataset("some-org/some-dataset")

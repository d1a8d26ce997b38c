"""Faults and bad input: nothing lost, nothing wrong, one clear line (exit 2) naming what to fix.

One test per defect found by trying the stages as a new user would; each failed before its fix."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, build
from core.data import load_rows
from core.engines import EngineConfig
from core.rundir import prepare_output_dir, release_output_dir
from core.shards import ShardWriter
from tests.conftest import ROOT


@dataclass
class _Holder:
    engine: EngineConfig = field(default_factory=EngineConfig)


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def conversation(q: str, a: str = "An answer.") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_parquet(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# ------------------------------------------------------------------------------------------ silent damage


@pytest.mark.integration
def test_a_second_run_on_one_output_dir_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "m"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from core.rundir import prepare_output_dir; "
         f"prepare_output_dir({str(out)!r}, {{'model': 'embedded'}}, command='data_synth.magpie'); print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.time()
        second = cli("data_synth.magpie", "recipe=magpie_demo", f"output_dir={out}", "n_conversations=2")
        assert second.returncode == 2, second.stderr[-500:]
        assert f"in use by another run (PID {holder.pid})" in second.stderr
        assert time.time() - start < 60  # at once: before any model loads
    finally:
        holder.kill()
        holder.wait()
    assert (
        prepare_output_dir(out, {"model": "embedded"}, command="data_synth.magpie") is False
    )  # the holder's death frees it
    release_output_dir(out)


def test_a_deleted_shard_never_makes_resume_overwrite_another(tmp_path):
    w = ShardWriter(tmp_path, rows_per_shard=2)
    for i in range(0, 6, 2):
        w.add([{"x": i}, {"x": i + 1}])  # shards 00000, 00001, 00002
    (tmp_path / "train-00000.parquet").unlink()
    w = ShardWriter(tmp_path, rows_per_shard=2)
    assert w.n_rows == 4  # counted on disk
    w.add([{"x": 10}, {"x": 11}])
    assert sorted(p.name for p in tmp_path.glob("train-*.parquet")) == [
        "train-00001.parquet", "train-00002.parquet", "train-00003.parquet"]  # fmt: skip
    assert sorted(r["x"] for r in ShardWriter(tmp_path).rows()) == [2, 3, 4, 5, 10, 11]


@pytest.mark.integration
def test_tags_follow_their_rows_when_the_input_changes(tmp_path):
    from data_synth.tag import TagConfig, run

    data = tmp_path / "in.jsonl"
    questions = ["Why is the sky blue?", "Hi", "Write a poem about autumn leaves falling.", "2+2?", "Name a fish.",
                 "Explain quantum tunnelling to a child in detail."]  # fmt: skip
    data.write_text("".join(json.dumps(conversation(q)) + "\n" for q in questions))
    cfg = TagConfig(input=str(data), output_dir=str(tmp_path / "tagged"), taggers=["lengths", "language"])
    run(cfg)
    data.write_text("".join(json.dumps(conversation(q)) + "\n" for q in reversed(questions[1:])))  # changed
    run(cfg)
    rows = pq.read_table(tmp_path / "tagged" / "train-00000.parquet").to_pylist()
    assert len(rows) == 5
    for row in rows:
        assert row["instruction_length"] == len(row["messages"][0]["content"])


@pytest.mark.integration
def test_an_evaluation_with_a_dead_judge_exits_3_and_scores_nothing(tmp_path):
    outputs = [{"instruction": f"Question {i}?", "output": f"Answer {i}.", "generator": g, "dataset": "x"}
               for i in range(3) for g in ("m",)]  # fmt: skip
    ref = [{**o, "generator": "ref", "output": "Other."} for o in outputs]
    (tmp_path / "model.json").write_text(json.dumps(outputs))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = cli("eval.alpaca_eval", f"model_outputs={tmp_path / 'model.json'}", f"reference_outputs={tmp_path / 'ref.json'}",
              "judge.model=gpt-4", "judge.engine.backend=openai", f"judge.engine.base_urls=[{dead}]",
              "judge.engine.max_retries=0", "judge.engine.tokenizer=embedded", "judge.retries=0",
              f"output_dir={tmp_path / 'ae'}")  # fmt: skip
    assert out.returncode == 3, out.stderr[-800:]  # an outage: nothing was judged, nothing is scored
    assert "judge gpt-4: the last 3 requests all failed" in out.stderr and "Connection refused" in out.stderr
    assert (
        not (tmp_path / "ae" / "annotations.json").exists()
        and not (tmp_path / "ae" / "scores.jsonl").exists()
    )
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_the_leaderboard_refuses_nan_naming_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.jsonl").write_text(
        json.dumps(
            {
                "model": "m",
                "benchmark": "alpaca_eval",
                "metric": "win_rate",
                "value": float("nan"),
                "ci_low": None,
                "ci_high": None,
            }
        )
        + "\n"  # fmt: skip
    )
    out = cli("eval.leaderboard", f"runs={tmp_path}", f"output_dir={tmp_path / 'lb'}")
    assert out.returncode == 2 and f"{run / 'scores.jsonl'}:1: 'value' is nan" in out.stderr
    (run / "scores.jsonl").write_text("")
    out = cli("eval.leaderboard", f"runs={tmp_path}", f"output_dir={tmp_path / 'lb2'}")
    assert out.returncode == 2 and "no score rows" in out.stderr


def test_no_test_row_reaches_the_dpo_trainer(tmp_path):
    from train.dpo import PreferenceArgs, load_preferences

    def pair(q):
        return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}  # fmt: skip

    write_parquet(tmp_path / "pairs" / "train-00000.parquet", [pair("train 1"), pair("train 2")])
    write_parquet(tmp_path / "pairs" / "test-00000.parquet", [pair("TEST ROW")])
    ds = load_preferences(PreferenceArgs(dataset=str(tmp_path / "pairs")))
    assert sorted(r["prompt"][0]["content"] for r in ds) == ["train 1", "train 2"]
    assert [r["prompt"][0]["content"] for r in load_rows(tmp_path / "pairs", "test")] == ["TEST ROW"]
    with pytest.raises(ConfigError, match="no 'validation' split \\(found: test, train\\)"):
        load_rows(tmp_path / "pairs", "validation")


# ------------------------------------------------------------------------------------------------ crashes


@pytest.mark.integration
def test_select_keeps_rows_with_failed_labels_and_an_empty_selection_keeps_its_schema(tmp_path):
    rows = [{**conversation(f"q{i}"), "input_quality": q, "quality_failed": q is None}
            for i, q in enumerate(["good", None, "excellent", None, "poor"])]  # fmt: skip
    write_parquet(tmp_path / "tagged" / "train-00000.parquet", rows)

    def select(name: str, op: str, value: str) -> pa.Table:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"filters:\n  - {{column: input_quality, op: '{op}', value: {value}}}\n")
        out = cli("data_synth.select", f"recipe={recipe}", f"input={tmp_path / 'tagged'}",
                  f"output_dir={tmp_path / name}")  # fmt: skip
        assert out.returncode == 0, out.stderr[-800:]
        return pq.read_table(tmp_path / name / "train-00000.parquet")

    kept = select("s", "!=", "poor").to_pylist()
    assert [r["input_quality"] for r in kept] == ["good", "excellent"]  # a failed label never passes
    empty = select("e", "==", "very poor")
    assert empty.num_rows == 0 and "messages" in empty.column_names and "input_quality" in empty.column_names
    down = cli(
        "data_synth.pairs", "recipe=demo_pairs", f"input={tmp_path / 'e'}", f"output_dir={tmp_path / 'p'}"
    )
    assert down.returncode == 2 and f"{tmp_path / 'e'}: 0 rows" in down.stderr


# ------------------------------------------------------------------------------------ bad input, one line


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing", None, "missing: no such file or directory"),
        ("empty", "dir", "empty: no .parquet, .jsonl or .json files"),
        ("zero.jsonl", b"", "zero.jsonl: the file is empty (0 bytes)"),
        ("bad.jsonl", b'{"a": 1}\n{"a": \n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", b'{"a": 1}\n[1, 2]\n', "list.jsonl:2: expected a JSON object"),
        ("latin.jsonl", b'{"a": "x"}\n{"a": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
        ("none", "0 rows", "none: 0 rows"),
    ],
)
def test_bad_inputs_name_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "0 rows":
        write_parquet(path / "train-00000.parquet", [], pa.schema([("messages", pa.string())]))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_rows(path)


def test_a_conversation_without_a_user_turn_is_named_not_a_stop_iteration():
    from core.chat import first_turn

    with pytest.raises(ConfigError, match="no user turn"):
        first_turn({"messages": [{"role": "assistant", "content": "hi"}]})


def test_output_dir_that_is_a_file_or_read_only(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        prepare_output_dir(tmp_path / "f", {"a": 1}, command="test")
    if (
        os.geteuid() == 0
        and subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode == 0
    ):
        try:
            with pytest.raises(ConfigError, match="is not writable"):
                prepare_output_dir(tmp_path / "new", {"a": 1}, command="test")
        finally:
            subprocess.run(["chattr", "-i", str(tmp_path)])


def test_engine_settings_fail_in_one_line_and_never_echo_a_key():
    with pytest.raises(ConfigError, match="base_urls is empty"):
        build({"engine": {"backend": "openai"}}, _Holder)
    with pytest.raises(ConfigError) as err:
        build({"engine": {"api_key_env": "sk-live-abcdef123456"}}, _Holder)
    assert "sk-live-abcdef123456" not in str(err.value) and "NAME of an environment variable" in str(
        err.value
    )
    assert EngineConfig(api_key_env="OPENAI_API_KEY").api_key_env == "OPENAI_API_KEY"


# ------------------------------------------------------------------------------------------ resume rules


def test_a_run_that_wrote_nothing_does_not_block_a_corrected_command(tmp_path):
    assert (
        prepare_output_dir(tmp_path / "r", {"input": "typo.jsonl"}, command="test") is False
    )  # then it failed on the input
    assert prepare_output_dir(tmp_path / "r", {"input": "right.jsonl"}, command="test") is False
    release_output_dir(tmp_path / "r")


def test_execution_settings_may_change_on_resume_and_the_changed_key_is_named(tmp_path):
    out = tmp_path / "r"
    first = {"model": "m", "engine": {"batch_size": 16, "base_urls": ["a", "b"], "temperature": 1.0}}
    prepare_output_dir(out, first, command="test")
    (out / "train-00000.parquet").write_bytes(b"finished work")
    changed = {"model": "m", "engine": {"batch_size": 64, "base_urls": ["b"], "temperature": 1.0}}
    assert (
        prepare_output_dir(out, changed, command="test") is True
    )  # a dead server dropped, a larger batch: resumes
    with pytest.raises(ConfigError, match=r"engine\.temperature: 1\.0 -> 0\.7\)") as err:
        prepare_output_dir(
            out, {**changed, "engine": {**changed["engine"], "temperature": 0.7}}, command="test"
        )
    assert "batch_size" not in str(err.value)
    release_output_dir(out)


def test_a_smaller_n_conversations_than_on_disk_is_refused_and_the_config_stays_true(tmp_path):
    from data_synth.magpie import MagpieConfig, run

    out = tmp_path / "m"
    prepare_output_dir(out, {"n_conversations": 8}, command="data_synth.magpie")
    release_output_dir(out)
    write_parquet(out / "train-00000.parquet", [conversation(f"q{i}") for i in range(8)])
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="already holds 8 conversations, more than n_conversations=4"):
        run(MagpieConfig(output_dir=str(out), n_conversations=4))
    assert (out / "config.yaml").read_text() == before


@pytest.mark.integration
def test_the_memory_planner_works_offline_and_names_an_unknown_model():
    out = cli(
        "train.plan", "recipe=magpie_pro_300k", "accelerate_config=deepspeed_zero3", "gpus=8", "gpu_mem_gb=80"
    )
    assert out.returncode == 0 and "magpie_pro_300k on 8 x 80 GB with ZeRO-3" in out.stdout, out.stderr[-500:]
    out = cli("train.plan", "recipe=magpie_pro_300k", "model=nobody/no-such-model")
    assert (
        out.returncode == 2 and "model 'nobody/no-such-model'" in out.stderr and "Traceback" not in out.stderr
    )


@pytest.mark.integration
def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    args = ["questions=eval/data/demo_instructions.jsonl", "bench=arena_hard", f"output_dir={tmp_path / 'g'}"]
    out = cli(
        "eval.generate", "model=runs/no/such/checkpoint", *args
    )  # an earlier stage's output: the preflight
    assert out.returncode == 2
    assert (
        out.stderr == "error: model=runs/no/such/checkpoint does not exist: it is an earlier stage's output\n"
    )
    out = cli("eval.generate", f"model={tmp_path / 'no_such_checkpoint'}", *args)  # elsewhere: the engine
    assert out.returncode == 2 and "no_such_checkpoint': no such local directory" in out.stderr


def test_malformed_evaluation_files_are_named(tmp_path):
    import eval.alpaca_eval as ae
    from eval.arena_hard import read_judgments

    (tmp_path / "outputs.json").write_text('[{"instruction": "q", "output": "a"},')
    with pytest.raises(ConfigError, match="outputs.json: not valid JSON"):
        ae.load_outputs(str(tmp_path / "outputs.json"))
    rows = [{"instruction": "q", "output_1": "a", "output_2": "b", "generator_1": "x", "generator_2": "y",
             "preference": "m"}]  # fmt: skip
    (tmp_path / "annotations.json").write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match="annotations.json: entry 0: 'preference' is 'm'"):
        ae.read_annotations(str(tmp_path / "annotations.json"))
    (tmp_path / "j.jsonl").write_text(json.dumps({"question_id": "1", "model": "m"}) + "\n")
    with pytest.raises(
        ConfigError,
        match=r"j.jsonl:1: expected 'uid' \(or v0.1's 'question_id'\), 'model' and a non-empty 'games'",
    ):
        read_judgments(tmp_path / "j.jsonl")


@pytest.mark.parametrize("bench", ["alpaca_eval", "arena_hard"])
def test_hub_questions_offline_fail_in_one_line(bench, monkeypatch):
    from eval.generate import load_questions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="from the Hub"):
        load_questions(bench)

"""Outages are never results: a judge request the engine never answered (connection refused, HTTP 5xx, an unset key)
is written nowhere as a tag, a tie or a verdict, the stage exits 3 (or 2 for a key it cannot read) naming the cause,
and the same command re-run against a working judge fills in exactly what was missing.

The judges here are real HTTP servers (tests/openai_server.py answering from a table), some of whose replies are
HTTP errors, and dead ports that refuse connections."""

import json
import socket

import pyarrow.parquet as pq
import pytest

from core.engines import EngineConfig
from core.errors import OutageError
from core.judge import Judge, JudgeConfig
from tests.core.test_output_dir import main

QUALITY = ' "explanation": "Clear.", "input_quality": "good"}'


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def conversations(path, questions):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "An answer."}]}
            for q in questions]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_args(url: str, embedded_path: str, *more: str) -> list[str]:
    return [f"judge.model={embedded_path}", "judge.engine.backend=openai", f"judge.engine.base_urls=[{url}]",
            "judge.engine.max_retries=0", "judge.engine.api_key_env=TEST_SERVER_KEY", "judge.retries=0", *more]  # fmt: skip


def tag_shards(out) -> list[dict]:
    return [
        r
        for p in sorted((out / "tags" / "quality").glob("part-*.parquet"))
        for r in pq.read_table(p).to_pylist()
    ]


def test_a_dead_judge_tags_nothing_and_the_rerun_tags_everything(
    tmp_path, embedded_path, table_server, monkeypatch
):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    data = conversations(tmp_path / "in.jsonl", [f"Question number {i}?" for i in range(8)])
    out = tmp_path / "tagged"
    args = [f"input={data}", f"output_dir={out}", "taggers=[quality]", "judge.max_tokens=32"]
    dead = dead_url()
    code, err = main("data_synth.tag", *args, *judge_args(dead, embedded_path))
    assert (
        code == 3 and "the last 8 requests all failed" in err and dead in err and "Connection refused" in err
    )
    assert tag_shards(out) == [] and not list(out.glob("train-*.parquet"))  # no failed=true written as done
    url = table_server([["rate the quality", QUALITY]])
    code, err = main("data_synth.tag", *args, *judge_args(url, embedded_path))  # base_urls changed: a resume
    assert code == 0, err
    rows = pq.read_table(out / "train-00000.parquet").to_pylist()
    assert [r["input_quality"] for r in rows] == ["good"] * 8 and not any(r["quality_failed"] for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["judge_calls"] == {"calls": 8, "cached": 0, "unparsed": 0, "engine_errors": 0}


def test_an_unset_key_variable_is_exit_2_and_the_corrected_command_resumes(tmp_path, embedded_path, table_server,
                                                                             monkeypatch):  # fmt: skip
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    url = table_server([["rate the quality", QUALITY]])
    data = conversations(tmp_path / "in.jsonl", ["What is a list?", "What is a set?"])
    out = tmp_path / "tagged"
    args = [f"input={data}", f"output_dir={out}", "taggers=[lengths,quality]", "judge.max_tokens=32",
            *judge_args(url, embedded_path)]  # fmt: skip
    code, err = main("data_synth.tag", *args, "judge.engine.api_key_env=NO_SUCH_KEY")
    assert code == 2 and "environment variable NO_SUCH_KEY (engine.api_key_env) is not set" in err
    assert list((out / "tags" / "lengths").glob("part-*.parquet")) and tag_shards(out) == []
    code, err = main("data_synth.tag", *args)  # only api_key_env differs: it changes how the run executes
    assert code == 0, err
    assert [r["input_quality"] for r in pq.read_table(out / "train-00000.parquet").to_pylist()] == [
        "good",
        "good",
    ]


def test_requests_that_fail_stay_missing_until_a_rerun_answers_them(
    tmp_path, embedded_path, table_server, monkeypatch
):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    questions = [f"Question {i}?" for i in range(6)] + ["BROKEN one?", "BROKEN two?"]
    data = conversations(tmp_path / "in.jsonl", questions)
    out = tmp_path / "tagged"
    args = [f"input={data}", f"output_dir={out}", "taggers=[quality]", "judge.max_tokens=32"]
    flaky = table_server([["BROKEN", {"status": 500}], ["rate the quality", QUALITY]])
    code, err = main("data_synth.tag", *args, *judge_args(flaky, embedded_path))
    assert code == 3 and "2 of 8 rows of tagger 'quality' have no verdict because the engine failed" in err
    assert "HTTP 500" in err
    shards = tag_shards(out)
    assert len(shards) == 6 and not any(r["quality_failed"] for r in shards)  # the 6 answered are kept
    # Tolerated, the two are reported missing (untagged, not failed) and the merge is written
    code, err = main(
        "data_synth.tag", *args, *judge_args(flaky, embedded_path, "judge.max_engine_errors=0.25")
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failures"]["quality"] == {"failed": 0, "untagged": 2}
    assert manifest["judge_calls"]["engine_errors"] == 2 and manifest["judge_calls"]["unparsed"] == 0
    healthy = table_server([["rate the quality", QUALITY]])
    code, err = main("data_synth.tag", *args, *judge_args(healthy, embedded_path))
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["judge_calls"]["calls"] == 2  # only the missing two were asked
    assert manifest["failures"]["quality"] == {"failed": 0, "untagged": 0}


def test_the_judge_keeps_outages_apart_from_unreadable_replies(
    tmp_path, embedded_path, table_server, monkeypatch
):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    url = table_server([["DOWN", {"status": 503}], ["GARBLED", "no verdict here"], ["", "VERDICT"]])
    engine = EngineConfig(backend="openai", base_urls=[url], max_retries=0, api_key_env="TEST_SERVER_KEY")
    cfg = JudgeConfig(
        model=embedded_path, engine=engine, max_tokens=4, logprobs=None, retries=2, max_engine_errors=0.5
    )
    judge = Judge(cfg, tmp_path / "cache.sqlite")
    asks = [[{"role": "user", "content": q}] for q in ("fine", "DOWN", "GARBLED", "fine too")]
    verdicts = judge.ask(asks, lambda c: c.text if c.text == "VERDICT" else None)
    assert [v.value for v in verdicts] == ["VERDICT", None, None, "VERDICT"]
    assert [v.missing for v in verdicts] == [False, True, False, False]
    assert (
        verdicts[1].attempts == 1
        and verdicts[1].error.startswith("engine error: ")
        and "HTTP 503" in verdicts[1].error
    )
    assert verdicts[2].attempts == 3 and verdicts[2].error == "no verdict in the reply"  # retried; a result
    assert judge.stats.as_dict() == {"calls": 5, "cached": 0, "unparsed": 1, "engine_errors": 1}
    judge.raise_for_outages(1, 4, "judgments")  # 1 of 4 is within 0.5
    with pytest.raises(OutageError, match=r"3 of 4 judgments have no verdict .*HTTP 503"):
        judge.raise_for_outages(3, 4, "judgments")
    assert len(judge.cache) == 5  # the outage cached nothing: a re-run asks again


def test_pairs_never_count_an_outage_as_a_tie(tmp_path, embedded_path, openai_server, monkeypatch):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    data = conversations(
        tmp_path / "in.jsonl", ["Name a colour.", "Name a fruit.", "Name a tree.", "Name a fish."]
    )
    out = tmp_path / "pairs"
    args = [f"input={data}", f"output_dir={out}", "n_samples=2", "max_tokens=12", "test_size=0", "judge.max_tokens=1",
            "judge.logprobs=20"]  # fmt: skip
    code, err = main("data_synth.pairs", *args, *judge_args(dead_url(), embedded_path))
    assert code == 3 and "requests all failed" in err
    assert not (out / "manifest.json").exists() and not list((out / "work").glob("part-*.parquet"))
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    code, err = main("data_synth.pairs", *args, *judge_args(openai_server, embedded_path))
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["prompts"] == 4
        and manifest["pairs"] + manifest["ties_dropped"] == 4
        and manifest["pairs"] >= 2
    )


def test_pairwise_with_a_dead_or_unreadable_judge_writes_no_leaderboard(tmp_path, embedded_path, table_server,
                                                                        monkeypatch):  # fmt: skip
    """Answers from a server's own model names (any name is valid on the openai backend), judged over HTTP."""
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    answers = table_server([["", "An answer."]])
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "instruction": f"Q{i}?"}) + "\n" for i in range(3))
    )
    out = tmp_path / "eval"
    args = [f"instructions={tmp_path / 'q.jsonl'}", f"output_dir={out}", "models={base: served-a, tuned: served-b}",
            "engine.backend=openai", f"engine.base_urls=[{answers}]", f"engine.tokenizer={embedded_path}",
            "engine.api_key_env=TEST_SERVER_KEY", "max_tokens=8", "judge.logprobs=null"]  # fmt: skip
    code, err = main("eval.pairwise", *args, *judge_args(dead_url(), embedded_path))
    assert code == 3 and "requests all failed" in err and not (out / "leaderboard.md").exists()
    unreadable = table_server([["", "I cannot decide."]])
    code, err = main("eval.pairwise", *args, *judge_args(unreadable, embedded_path))
    assert code == 2 and "no judgment of" in err and "could be read (6 of 6 replies" in err
    assert not (out / "leaderboard.md").exists() and "score is nan" not in err
    # An unreadable reply is a result (cached, so the same command would read it again): a new judge, a new run
    fair = table_server([["", "A"]])
    args = [a.replace(f"output_dir={out}", f"output_dir={tmp_path / 'eval2'}") for a in args]
    code, err = main("eval.pairwise", *args, *judge_args(fair, embedded_path))
    assert code == 0, err
    board = (tmp_path / "eval2" / "leaderboard.md").read_text()
    assert "served-a" not in board and "| base | 50.0 |" in board and "| tuned | 50.0 |" in board


def test_tolerated_outages_in_pairs_and_reward_difference_stay_missing(tmp_path, embedded_path, table_server,
                                                                       monkeypatch):  # fmt: skip
    """Within judge.max_engine_errors the stage finishes, and what the judge never answered is reported missing:
    no pair row (not a KeyError), and no reward_difference of a row whose reward is missing (not a failure). The
    server fails the reward of the BROKEN row's own response only; its base response is scored."""
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    score = {"text": "7", "top_logprobs": {"7": -0.05, "3": -3.0}}
    server = table_server([[["BROKEN", "One answer."], {"status": 500}],
            [["BROKEN", "An answer."], {"status": 500}], ["Assistant Response", score], ["# Query", "A base answer."],
                           ["", {"cycle": ["One answer.", "Another answer."]}]])  # fmt: skip
    data = conversations(
        tmp_path / "in.jsonl", ["Name a colour.", "BROKEN question?", "Name a fish.", "Name a tree."]
    )
    engine = lambda prefix: [f"{prefix}engine.backend=openai", f"{prefix}engine.base_urls=[{server}]",  # noqa: E731
                             f"{prefix}engine.tokenizer={embedded_path}", f"{prefix}engine.api_key_env=TEST_SERVER_KEY",
                             f"{prefix}engine.max_retries=0"]  # fmt: skip
    judge = [
        f"judge.model={embedded_path}",
        "judge.max_tokens=1",
        "judge.max_engine_errors=0.5",
        *engine("judge."),
    ]
    code, err = main("data_synth.pairs", f"input={data}", f"output_dir={tmp_path / 'pairs'}", "model=policy",
                     "n_samples=2", "test_size=0", *engine(""), *judge)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["prompts"] == 3 and manifest["unscored_prompts"] == 1
    code, err = main("data_synth.tag", f"input={data}", f"output_dir={tmp_path / 'tagged'}",
                     "taggers=[reward_difference]", "base_model=base", "base_max_tokens=4", *engine("base_"), *judge)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "tagged" / "manifest.json").read_text())
    assert manifest["failures"]["reward"] == {"failed": 0, "untagged": 1}
    assert manifest["failures"]["reward_difference"] == {"failed": 0, "untagged": 1}  # missing, not failed
    rows = pq.read_table(tmp_path / "tagged" / "train-00000.parquet").to_pylist()
    assert [r["reward_difference"] is None for r in rows] == [False, True, False, False]


def test_pairs_keep_their_samples_when_scoring_fails_and_free_the_policy_before_scoring(
    tmp_path, embedded_path, table_server, monkeypatch
):
    """Responses are written before anything is scored, so a scoring outage never costs the generations; and the
    policy engine is gone before the scorer loads (on a GPU, a reward model needs the memory vLLM held)."""
    import gc
    import weakref

    import data_synth.pairs as pairs
    from data_synth.scoring import Scorer

    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    policy = table_server([["", {"cycle": ["Good answer.", "Poor answer."]}]])
    judge = table_server([["Poor answer.", {"text": "2", "top_logprobs": {"2": -0.01}}],
                          ["", {"text": "9", "top_logprobs": {"9": -0.01}}]])  # fmt: skip
    data = conversations(tmp_path / "in.jsonl", ["Name a colour.", "Name a fish."])
    engine = lambda prefix, url: [f"{prefix}engine.backend=openai", f"{prefix}engine.base_urls=[{url}]",  # noqa: E731
                                  f"{prefix}engine.tokenizer={embedded_path}", f"{prefix}engine.api_key_env=TEST_SERVER_KEY",
                                  f"{prefix}engine.max_retries=0"]  # fmt: skip
    args = [f"input={data}", f"output_dir={tmp_path / 'pairs'}", "model=policy", "n_samples=2", "test_size=0",
            f"judge.model={embedded_path}", "judge.max_tokens=1"]  # fmt: skip
    code, err = main("data_synth.pairs", *args, *engine("", policy), *engine("judge.", dead_url()))
    assert code == 3 and len(list((tmp_path / "pairs" / "responses").glob("part-*.parquet"))) == 1
    started = []
    monkeypatch.setattr(
        pairs, "make_engine", lambda *a: started.append(a)
    )  # the policy must not be needed now
    code, err = main("data_synth.pairs", *args, *engine("", dead_url()), *engine("judge.", judge))
    assert code == 0, err
    assert started == []  # nothing sampled again
    rows = pq.read_table(tmp_path / "pairs" / "train-00000.parquet").to_pylist()
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("Good answer.", "Poor answer.")
    ] * 2

    monkeypatch.undo()
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    made, alive_when_scoring = [], []
    real_make, real_rewards = pairs.make_engine, Scorer.rewards

    def make(*a):
        made.append(weakref.ref(e := real_make(*a)))
        return e

    def rewards(self, flat):
        gc.collect()
        alive_when_scoring.append(made[0]() is not None)
        return real_rewards(self, flat)

    monkeypatch.setattr(pairs, "make_engine", make)
    monkeypatch.setattr(Scorer, "rewards", rewards)
    args = [a.replace(f"output_dir={tmp_path / 'pairs'}", f"output_dir={tmp_path / 'fresh'}") for a in args]
    assert main("data_synth.pairs", *args, *engine("", policy), *engine("judge.", judge))[0] == 0
    assert alive_when_scoring == [False]  # the policy engine was released before the first score

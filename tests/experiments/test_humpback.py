"""Humpback (instruction backtranslation): seed loader, corpus, reversed and tagged training data, curation, the
augmentation's seeds, and the whole loop on the embedded model with a kill in the middle."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, build
from core.engines import Completion
from core.judge import JudgeConfig
from data_synth import baselines, corpus, select, tag
from experiments import humpback
from experiments.humpback import S_A, S_W
from tests.conftest import ROOT

# ------------------------------------------------------------------------------------------- seed: oasst1


def oasst_rows() -> list[dict]:
    """Two trees in oasst1's real message layout (one row per message), plus the cases the loader must skip."""

    def msg(mid, parent, role, text, lang="en", rank=None, deleted=False, tree="t1"):
        return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-05T00:00:00+00:00",
                "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True,
                "deleted": deleted, "rank": rank, "synthetic": False, "model_name": None,
                "detoxify": None, "message_tree_id": tree, "tree_state": "ready_for_export", "emojis": None,
                "labels": None}  # fmt: skip

    return [
        msg("p1", None, "prompter", "How do tides work?"),
        msg("a1", "p1", "assistant", "The moon's gravity pulls the oceans.", rank=0),
        msg("a2", "p1", "assistant", "Tides are magic.", rank=1),  # not the best reply
        msg("p2", "a1", "prompter", "And the sun?"),  # a second turn: not a first turn
        msg("a3", "p2", "assistant", "The sun adds a smaller pull.", rank=0),
        msg("p3", None, "prompter", "¿Qué es una marea?", lang="es", tree="t2"),  # not English
        msg("a4", "p3", "assistant", "Es el ascenso del mar.", lang="es", rank=0, tree="t2"),
        msg("p4", None, "prompter", "Name a prime number.", tree="t3"),
        msg("a5", "p4", "assistant", "Seven.", rank=0, deleted=True, tree="t3"),  # deleted
        msg("a6", "p4", "assistant", "Two is the smallest prime.", rank=1, tree="t3"),
        msg("p5", None, "prompter", "Write a haiku about rain.", tree="t4"),
        msg("a7", "p5", "assistant", "Soft rain on the roof / ...", rank=0, tree="t4"),
    ]


def test_oasst1_seed_is_first_turns_in_english_with_the_rank_0_reply(tmp_path):
    src = tmp_path / "oasst1.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in oasst_rows()))
    summary = baselines.run(
        baselines.BaselineConfig(name="oasst1", source=str(src), output_dir=str(tmp_path / "seed"))
    )
    rows = pq.read_table(tmp_path / "seed" / "train-00000.parquet").to_pylist()
    assert [[m["content"] for m in r["messages"]] for r in rows] == [
        ["How do tides work?", "The moon's gravity pulls the oceans."],
        ["Write a haiku about rain.", "Soft rain on the roof / ..."],
    ]
    assert summary["rows"] == 2 and rows[0]["id"] == "p1"


def test_oasst1_in_another_layout_fails_naming_the_missing_columns(tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"not oasst1's message layout: no \['message_id'"):
        baselines.run(
            baselines.BaselineConfig(name="oasst1", source=str(src), output_dir=str(tmp_path / "o"))
        )


# ------------------------------------------------------------------------------------------------ corpus

DOC = """Tides
=====

Tides are the rise and fall of sea levels caused by the combined effects of the gravitational forces exerted by
the Moon and the Sun and the rotation of the Earth.

Most places have two high tides and two low tides a day. The times and heights depend on the shape of the coast.

QUICK LINKS AND ADVERTISEMENT
=============================

Subscribe to our free newsletter for the best tide tables on the whole wide internet, every single week.

Spring tides
------------

x

When the Sun and the Moon line up, their pulls add and the range between high and low water is largest.
"""


def test_corpus_cuts_at_headings_packs_paragraphs_and_counts_every_drop(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(DOC)
    (tmp_path / "docs" / "b.txt").write_text(DOC)  # every passage a duplicate of a.txt's
    cfg = corpus.CorpusConfig(
        source=str(tmp_path / "docs"), min_chars=80, max_chars=260, output_dir=str(tmp_path / "c")
    )
    summary = corpus.run(cfg)
    rows = pq.read_table(tmp_path / "c" / "train-00000.parquet").to_pylist()
    assert [(r["title"], r["doc_id"]) for r in rows] == [
        ("Tides", "a.txt"),
        ("Tides", "a.txt"),
        ("Spring tides", "a.txt"),
    ]
    assert (
        rows[0]["text"].startswith("Tides are the rise") and "Most places" in rows[1]["text"]
    )  # 2 paragraphs > 260
    assert summary["passages"] == 3
    assert summary["dropped"] == {"boilerplate_heading": 2, "too_short": 0, "too_long": 0, "low_letters": 0,
                                  "duplicate": 3}  # fmt: skip
    # the "x" paragraph is packed with the next one (packs are cut at max_chars, never inside a paragraph)
    assert rows[2]["text"].startswith("x\n\nWhen the Sun")


def test_corpus_of_pythons_own_docs_resumes_after_a_lost_chunk_without_losing_or_repeating_a_passage(
    tmp_path,
):
    """A chunk lost to a kill is redone; so are the chunks after it, even when the resumed run cuts its chunks
    differently (docs_per_shard may change on resume)."""
    cfg = corpus.CorpusConfig(
        source="pydoc", min_chars=200, max_chars=900, docs_per_shard=20, output_dir=str(tmp_path / "c")
    )
    first = corpus.run(cfg)
    texts = [r["text"] for r in pq.read_table(sorted((tmp_path / "c").glob("train-*.parquet"))).to_pylist()]
    assert first["documents"] == 79 and first["passages"] > 300  # the 79 topics of pydoc_data
    assert len(set(texts)) == len(texts)
    for lost, per_shard in (("train-00001.parquet", 7), ("train-00003.parquet", 30)):
        (tmp_path / "c" / lost).unlink()
        again = corpus.run(dataclasses.replace(cfg, docs_per_shard=per_shard))
        after = [
            r["text"] for r in pq.read_table(sorted((tmp_path / "c").glob("train-*.parquet"))).to_pylist()
        ]
        assert after == texts and again == first


def test_corpus_names_a_missing_text_column(tmp_path):
    (tmp_path / "web.jsonl").write_text(json.dumps({"content": "some text"}) + "\n")
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: content\); set text_column="):
        corpus.run(corpus.CorpusConfig(source=str(tmp_path / "web.jsonl"), output_dir=str(tmp_path / "c")))


# ----------------------------------------------------------------------------------- training data options


def test_backward_pairs_are_reversed_and_each_source_carries_its_system_prompt(tmp_path):
    import pyarrow as pa

    from train.sft import SFTScriptArgs, load_conversations

    seed, curated = tmp_path / "seed.jsonl", tmp_path / "curated.parquet"
    seed.write_text(json.dumps({"instruction": "Q1", "response": "A1"}) + "\n")
    # another file type and string type (64-bit offsets) than the seed's: the mixture still concatenates
    message = pa.struct([("role", pa.string()), ("content", pa.large_string())])
    turns = [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "passage 2"}]
    pq.write_table(pa.table({"messages": pa.array([turns], pa.list_(message))}), curated)
    backward = load_conversations(SFTScriptArgs(dataset=str(seed), reverse_pairs=True))
    assert backward["messages"] == [
        [{"role": "user", "content": "A1"}, {"role": "assistant", "content": "Q1"}]
    ]
    mixed = load_conversations(SFTScriptArgs(dataset_mixture={str(seed): 1.0, str(curated): 1.0},
                                          system_prompts={str(seed): S_A, str(curated): S_W}))  # fmt: skip
    by_user = {m[1]["content"]: m[0] for m in mixed["messages"]}
    assert by_user == {"Q1": {"role": "system", "content": "Answer in the style of an AI Assistant."},
                       "Q2": {"role": "system", "content": "Answer with knowledge from web search."}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"system_prompts: \['other'\] are not sources"):
        load_conversations(SFTScriptArgs(dataset=str(seed), system_prompts={"other": S_A}))


# --------------------------------------------------------------------------------------------- curation


@pytest.mark.parametrize(
    ("reply", "score"),
    [("The answer is on topic and complete.\nScore: 4", 4), ("Score: 2\nOn reflection... Score: 5", 5),
     ("**Score:** 3", 3), ("Score: 4.", 4), ("Score: 4.5", None), ("Score: 7", None), ("A fine answer, I would say four.", None), ("", None)],
)  # fmt: skip
def test_a_curation_score_is_the_last_score_line_and_never_a_guess(reply, score):
    parsed = tag.parse_curation(Completion(reply, 5, "stop"))
    assert (parsed["curation_score"] if parsed else None) == score


def test_probability_mode_scores_the_weighted_digit_rounded():
    import math

    def read(probs: dict[str, float]) -> dict | None:
        logprobs = {k: math.log(v) for k, v in probs.items()}
        return tag.read_curation_probabilities(Completion("5", 1, "length", top_logprobs=logprobs))

    assert read({" 5": 0.5, "3": 0.5}) == {
        "curation_score": 4,
        "curation_expected": 4.0,
        "curation_reply": None,
    }
    assert read({"5": 0.3, "2": 0.6, "the": 0.1})["curation_score"] == 3  # 2.9 over the digits' mass
    assert read({"The": 0.9, "A": 0.1}) is None  # no digit: a failure, not a score


def pairs_file(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [("Explain tides.", "Tides are the rise and fall of sea levels."),
         ("What is a prime?", "I remember my teacher, back in 1998, said primes were boring."),
         ("Name a colour.", "Click here to subscribe to our newsletter!"),
         ("Describe rain.", "Rain is liquid water falling from clouds.")]  # fmt: skip


def test_paper_curation_over_http_scores_retries_counts_failures_and_keeps_a5(
    embedded_path, tmp_path, monkeypatch
):
    """The paper's protocol, from a judge that follows it (a real server answering from a table): reasoning then
    "Score: N" parsed, a reply without a score asked again and then counted failed, and A5/A4 selected."""
    from tests.conftest import start_server

    table = [[["Explain tides."], "Clear, complete, written as an assistant.\nScore: 5"],
             [["What is a prime?"], "Personal anecdote from a blog.\nScore: 3"],
             [["Name a colour."], "This is promotional text, off-topic."],  # no score: retried, then failed
             [["Describe rain."], "Helpful and self-contained.\nScore: 4"]]  # fmt: skip
    (tmp_path / "table.json").write_text(json.dumps(table))
    url, proc = start_server(embedded_path, tmp_path / "table.json")
    monkeypatch.setenv("TABLE_KEY", "sk-test-123")
    try:
        judge = JudgeConfig(
            model=embedded_path, max_tokens=64, temperature=0.7, top_p=0.9, retries=1, logprobs=None
        )
        judge.engine.backend, judge.engine.base_urls, judge.engine.api_key_env = "openai", [url], "TABLE_KEY"
        summary = tag.run(tag.TagConfig(input=str(pairs_file(tmp_path / "a.jsonl", PAIRS)), taggers=["curation"],
                                        judge=judge, output_dir=str(tmp_path / "curate")))  # fmt: skip
    finally:
        proc.kill()
    rows = pq.read_table(tmp_path / "curate" / "train-00000.parquet").to_pylist()
    assert [r["curation_score"] for r in rows] == [5, 3, None, 4]
    assert [r["curation_failed"] for r in rows] == [False, False, True, False]
    assert rows[0]["curation_reply"].endswith("Score: 5")
    assert summary["judge_calls"] == {
        "calls": 5,
        "cached": 0,
        "unparsed": 1,
        "engine_errors": 0,
    }  # 4 + 1 retry
    source = (
        pq.read_schema(tmp_path / "curate" / "train-00000.parquet")
        .field("curation_score")
        .metadata[b"source"]
    )
    assert b"the paper's protocol" in source
    for k, kept in ((5, 1), (4, 2)):
        out = select.run(select.SelectConfig(input=str(tmp_path / "curate"), output_dir=str(tmp_path / f"a{k}"),
                                             filters=[select.Filter("curation_score", ">=", k)]))  # fmt: skip
        assert out["selected_rows"] == kept and out["steps"][1]["missing_values"] == 1
    summary = humpback.curation_summary(tmp_path / "curate", threshold=4)
    assert summary["scores"] == {"1": 0, "2": 0, "3": 1, "4": 1, "5": 1}
    assert summary["unparseable"] == 1 and summary["unparseable_rate"] == 0.25 and summary["kept"] == 2


def test_probability_curation_with_the_embedded_model_gives_every_pair_a_real_score(embedded_path, tmp_path):
    judge = JudgeConfig(model=embedded_path)
    judge.engine.batch_size = 4
    tag.run(tag.TagConfig(input=str(pairs_file(tmp_path / "a.jsonl", PAIRS)), taggers=["curation"], judge=judge,
                          curation="probability", output_dir=str(tmp_path / "curate")))  # fmt: skip
    table = pq.read_table(tmp_path / "curate" / "train-00000.parquet")
    rows = table.to_pylist()
    assert all(r["curation_score"] in (1, 2, 3, 4, 5) and 1 <= r["curation_expected"] <= 5 for r in rows)
    assert b"probability mode" in table.schema.field("curation_score").metadata[b"source"]


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_seeds_each_request_and_resumes_a_lost_chunk(embedded_path, tmp_path):
    """Identical passages still get their own instructions (a seed per request), and a chunk lost to a kill is
    redone to the same rows. With the same chunk size: the redo then decodes in the same batches from an empty
    prefix cache, where another size changes what shares a batch and what the cache holds, which moves the
    float rounding and, at T=0.7, can move a sampled token."""
    from data_synth import augment

    passage = "Lists are mutable sequences, typically used to store collections of homogeneous items."
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": passage}) + "\n" for _ in range(4)))
    cfg = augment.AugmentConfig(model=embedded_path, input=str(tmp_path / "corpus.jsonl"), max_tokens=24,
                                chunk_size=2, output_dir=str(tmp_path / "aug"))  # fmt: skip
    cfg.engine.batch_size = 4
    first = augment.run(cfg)
    rows = pq.read_table(sorted((tmp_path / "aug").glob("train-*.parquet"))).to_pylist()
    instructions = [r["messages"][0]["content"] for r in rows]
    assert first["rows"] + first["failed"] == 4 and len(set(instructions)) == len(instructions) >= 3
    assert all(r["messages"][1]["content"] == passage for r in rows)
    (tmp_path / "aug" / "train-00000.parquet").unlink()  # a lost chunk
    again = augment.run(cfg)
    redone = pq.read_table(sorted((tmp_path / "aug").glob("train-*.parquet"))).to_pylist()
    assert sorted(redone, key=lambda r: r["passage_index"]) == rows
    assert again["rows"] == first["rows"]


# ----------------------------------------------------------------------------------------------- the loop


def test_the_loop_unrolls_iterations_with_the_previous_model_curating():
    cfg = humpback.HumpbackConfig(iterations=2, threshold=4, seed_data="seed.jsonl")
    stages = {s.name: s for s in humpback.stages(cfg)}
    assert list(stages) == ["corpus", "backward", "augment", "m0", "curate1", "report1", "select1", "m1", "curate2",
                            "report2", "select2", "m2", "evaluate"]  # fmt: skip
    assert stages["backward"].overrides["reverse_pairs"] is True
    assert stages["curate2"].overrides["judge.model"] == "{m1}/merged" and stages["curate2"].group == "iter2"
    assert stages["select1"].overrides["filters"] == [{"column": "curation_score", "op": ">=", "value": 4}]
    assert stages["m2"].overrides["system_prompts"] == {"seed.jsonl": S_A, "{select2}": S_W}
    assert stages["evaluate"].overrides["system_prompts"] == {"m1": f"{S_A} {S_W}", "m2": f"{S_A} {S_W}"}
    full_m0 = humpback.stages(dataclasses.replace(cfg, m0_overrides={"peft": "none"}))
    assert (
        next(s for s in full_m0 if s.name == "curate1").overrides["judge.model"] == "{m0}"
    )  # no merged copy
    with pytest.raises(ConfigError, match=r"key 'threshold': must be in \[1, 5\], got 6"):
        build({"threshold": 6}, humpback.HumpbackConfig)


SEED = [("What is a list in Python?", "A list is an ordered, mutable collection of items."),
        ("How do I open a file?", "Use open(path) and read it inside a with block."),
        ("What does len do?", "len returns the number of items in a container."),
        ("Explain a dictionary.", "A dictionary maps keys to values.")]  # fmt: skip


@pytest.mark.integration
def test_the_whole_loop_on_the_embedded_model_resumes_after_a_kill(tmp_path):
    """Seed -> corpus -> backward model -> augmentation -> M0 -> (curate, select, M_i) x 2 -> M0 vs M1 vs M2, on
    the real 135M model; killed during the first curation, then run again to the end."""
    seed = pairs_file(tmp_path / "seed.jsonl", SEED)
    args = [f"seed_data={seed}", f"output_dir={tmp_path / 'loop'}", "threshold=1", "iterations=2",
            "corpus.overrides={max_passages: 6, min_chars: 150, max_chars: 400}",
            "backward.overrides={max_steps: 2, save_strategy: 'no', max_length: 192}",
            "model.overrides={max_steps: 2, save_strategy: 'no', max_length: 192}",
            "augment.overrides={max_tokens: 16, chunk_size: 6}",
            "curate.overrides={chunk_size: 2}",
            "evaluate.overrides={max_instructions: 2, max_tokens: 12, n_bootstrap: 50}"]  # fmt: skip
    cmd = [sys.executable, "-m", "experiments.humpback", "recipe=humpback_demo", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not list((tmp_path / "loop" / "stages" / "iter1").glob("curate1-*/tags/curation/part-*.parquet")):
        assert proc.poll() is None and time.time() < deadline, "the loop ended before its first curation"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the loop and the stage it runs, mid-curation
    proc.wait()
    m0_status = next((tmp_path / "loop" / "stages" / "iter0").glob("m0-*.sweep")) / "sweep_status.json"
    finished_at = m0_status.read_text()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    assert m0_status.read_text() == finished_at  # a finished stage is not run again
    curate1 = next(
        d for d in (tmp_path / "loop" / "stages" / "iter1").glob("curate1-*") if d.suffix != ".sweep"
    )
    # the rows the killed run had scored are not asked again
    assert json.loads((curate1 / "manifest.json").read_text())["judge_calls"]["calls"] < 6
    assert "threshold: 1" in (tmp_path / "loop" / "config.yaml").read_text()
    report = json.loads((tmp_path / "loop" / "report.json").read_text())
    assert report["augment"]["passages"] == 6 and report["augment"]["rows"] + report["augment"]["failed"] == 6
    for it in report["iterations"]:  # every candidate has a real score or is counted unparseable
        assert sum(it["scores"].values()) + it["unparseable"] == report["augment"]["rows"]
        assert it["kept"] == sum(it["scores"].values())  # threshold 1 keeps every scored pair
    assert [it["judge"] for it in report["iterations"]] == ["m0", "m1"]
    assert {"m0", "m1", "m2"} <= set(report["leaderboard"].split())
    m2, select2 = (next(d for d in (tmp_path / "loop" / "stages" / "iter2").glob(f"{name}-*") if d.suffix != ".sweep")
                   for name in ("m2", "select2"))  # fmt: skip
    trained = json.loads(json.dumps(__import__("yaml").safe_load((m2 / "config.yaml").read_text())))
    seed_tag, curated_tag = trained["system_prompts"][str(seed)], trained["system_prompts"][str(select2)]
    assert (seed_tag, curated_tag) == (S_A, S_W) and set(trained["dataset_mixture"]) == {
        str(seed),
        str(select2),
    }
    assert (m2 / "merged" / "config.json").is_file()
    assert "Humpback 65B 83.71" in (tmp_path / "loop" / "report.md").read_text()
    card = Path(report["iterations"][1]["card"])  # data_synth.report's card of the second curation
    assert "**curation_score** (" in card.read_text() and (card.parent / "curation_score.png").is_file()

"""Resume follows content: when the input under the same path is reordered or edited, a re-run keeps what was computed
from unchanged content and redoes the rest; nothing computed from one row ever lands on another.

The models are table servers (tests/openai_server.py): fixed replies per prompt, so what was kept and what was
redone shows in the output (the second server answers differently)."""

import json

import pyarrow.parquet as pq

from tests.conftest import start_server
from tests.core.test_output_dir import main


def table(tmp_path, embedded_path, procs, rows) -> str:
    path = tmp_path / f"table{len(procs)}.json"
    path.write_text(json.dumps(rows))
    url, proc = start_server(embedded_path, path)
    procs.append(proc)
    return url


def server_args(prefix: str, url: str, embedded_path: str) -> list[str]:
    return [f"{prefix}engine.backend=openai", f"{prefix}engine.base_urls=[{url}]", f"{prefix}engine.tokenizer={embedded_path}",
            f"{prefix}engine.api_key_env=TEST_SERVER_KEY", f"{prefix}engine.max_retries=0"]  # fmt: skip


def test_corpus_redoes_the_chunks_whose_documents_changed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    paragraph = lambda name: f"Some words about {name}. " * 12  # noqa: E731
    for name in ("a", "b", "c"):
        (docs / f"{name}.txt").write_text(paragraph(name))
    args = [
        f"source={docs}",
        f"output_dir={tmp_path / 'corpus'}",
        "docs_per_shard=1",
        "min_chars=50",
        "max_chars=2000",
    ]
    assert main("data_synth.corpus", *args)[0] == 0
    first = (tmp_path / "corpus" / "train-00000.parquet").stat().st_mtime_ns
    (docs / "b.txt").write_text(paragraph("bees, edited"))
    assert main("data_synth.corpus", *args)[0] == 0
    texts = [
        pq.read_table(tmp_path / "corpus" / f"train-0000{k}.parquet").column("text")[0].as_py()
        for k in range(3)
    ]
    assert ["about a." in texts[0], "bees, edited" in texts[1], "about c." in texts[2]] == [True] * 3
    assert (tmp_path / "corpus" / "train-00000.parquet").stat().st_mtime_ns == first  # unchanged: kept


def test_augment_redoes_the_chunks_whose_passages_changed(tmp_path, embedded_path, monkeypatch):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    passages = tmp_path / "passages.jsonl"
    write = lambda texts: passages.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # noqa: E731
    write(["Passage about apples.", "Passage about bees.", "Passage about clouds.", "Passage about dunes."])
    procs = []
    try:
        old = table(tmp_path, embedded_path, procs, [["", "What is this about?"]])
        args = [f"input={passages}", f"output_dir={tmp_path / 'aug'}", "model=backward", "chunk_size=2"]
        assert main("data_synth.augment", *args, *server_args("", old, embedded_path))[0] == 0
        write(
            [
                "Passage about apples.",
                "Passage about bees.",
                "Passage about CLOUDS, edited.",
                "Passage about dunes.",
            ]
        )
        new = table(tmp_path, embedded_path, procs, [["", "Asked again."]])
        code, err = main("data_synth.augment", *args, *server_args("", new, embedded_path))
        assert code == 0, err
    finally:
        for p in procs:
            p.kill()
    rows = [
        r for f in sorted((tmp_path / "aug").glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    got = sorted((r["passage_index"], r["messages"][1]["content"], r["messages"][0]["content"]) for r in rows)
    assert got == [(0, "Passage about apples.", "What is this about?"), (1, "Passage about bees.", "What is this about?"),
                   (2, "Passage about CLOUDS, edited.", "Asked again."), (3, "Passage about dunes.", "Asked again.")]  # fmt: skip


def test_pairs_follow_their_instructions_when_the_input_is_reordered_and_edited(
    tmp_path, embedded_path, monkeypatch
):
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    data = tmp_path / "in.jsonl"
    write = lambda qs: data.write_text(  # noqa: E731
        "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}]}) + "\n"
                for q in qs))  # fmt: skip
    write(["Name a colour.", "Name a fruit.", "Name a tree."])
    good, bad = {"text": "9", "top_logprobs": {"9": -0.01}}, {"text": "2", "top_logprobs": {"2": -0.01}}
    procs = []
    try:
        policy = table(tmp_path, embedded_path, procs, [["colour", {"cycle": ["Red.", "Blue, a fine colour."]}],
                                                        ["", {"cycle": ["Fine answer.", "Poor answer."]}]])  # fmt: skip
        judge = table(tmp_path, embedded_path, procs, [["Poor", bad], ["Red.", bad], ["", good]])
        args = [f"input={data}", f"output_dir={tmp_path / 'pairs'}", "model=policy", "n_samples=2", "test_size=0",
                "judge.max_tokens=1", f"judge.model={embedded_path}"]  # fmt: skip
        run = lambda p, j: main("data_synth.pairs", *args, *server_args("", p, embedded_path),  # noqa: E731
                                *server_args("judge.", j, embedded_path))  # fmt: skip
        assert run(policy, judge)[0] == 0
        write(
            ["Name a tree.", "Name a river.", "Name a colour.", "Name a tree."]
        )  # reordered, edited, a repeat
        flipped = table(tmp_path, embedded_path, procs, [["", {"cycle": ["New A.", "New B."]}]])
        judge2 = table(tmp_path, embedded_path, procs, [["New A.", good], ["", bad]])
        code, err = run(flipped, judge2)
        assert code == 0, err
    finally:
        for p in procs:
            p.kill()
    rows = pq.read_table(tmp_path / "pairs" / "train-00000.parquet").to_pylist()
    got = [
        (r["source_index"], r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
        for r in rows
    ]
    assert got == [(0, "Name a tree.", "Fine answer.", "Poor answer."), (1, "Name a river.", "New A.", "New B."),
                   (2, "Name a colour.", "Blue, a fine colour.", "Red.")]  # fmt: skip
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["prompts"] == 3 and manifest["duplicate_prompts"] == 1

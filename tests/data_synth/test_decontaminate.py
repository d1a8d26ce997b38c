"""Decontamination against the real published benchmark prompts (trimmed copies in tests/fixtures): which training rows
each rule flags, against a plain re-implementation of open-instruct's n-gram rule, and the path to `select`."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.questions import load_questions
from data_synth import decontaminate as dc
from data_synth import report, select
from tests.core.test_output_dir import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
QUESTIONS = {
    "alpaca_eval": str(FIXTURES / "alpaca_eval_cd543a1" / "alpaca_eval.json"),
    "arena_hard": str(FIXTURES / "arena_hard_auto_196f6b8" / "arena-hard-v0.1" / "question.jsonl"),
    "arena_hard_v2": str(FIXTURES / "arena_hard_auto_196f6b8" / "arena-hard-v2.0" / "question.jsonl"),
    "mt_bench": str(FIXTURES / "fastchat_0e6d3e4" / "mt_bench" / "question.jsonl"),
}
BENCHES = list(QUESTIONS)


def turns(bench: str) -> list[list[str]]:
    return [q["turns"] for q in load_questions(bench, QUESTIONS[bench])]


def chat(*users: str) -> dict:
    messages = []
    for u in users:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": "Sure, here it is."}]
    return {"messages": messages}


def training_rows() -> tuple[list[dict], dict[str, set[int]], dict[str, set[int]]]:
    """Rows that copy, reformat, lightly edit or only resemble real benchmark prompts; and the rows each rule must
    flag per benchmark (n-grams; embeddings, beyond what the n-grams flag)."""
    ae, ah, ah2, mt = (turns(b) for b in BENCHES)
    script = ae[6][0].split()  # a 54-word AlpacaEval prompt: three words changed, far apart
    for i, word in ((5, "scene"), (25, "club"), (45, "woman")):
        script[i] = word
    spy = ae[13][0]  # 63 words: shouted, re-spaced and re-punctuated
    arena = ah[3][0].split()  # 151 words: the first 40% copied
    rows = [
        chat(ae[0][0]),  # 0 verbatim
        chat("  " + spy.upper().replace(" ", "\n   ").replace(",", " ,")),  # 1 reformatted
        chat(" ".join(script)),  # 2 a few words changed
        chat("Could you explain the basics of quantum computing?"),  # 3 one word changed in an 8-token prompt
        chat("Give me three tips for getting better sleep."),  # 4 unrelated
        chat("What are some famous actors who began in film?"),  # 5 same topic as 0, another question
        chat("Hi! Can you help me with something?", mt[3][0]),  # 6 a benchmark prompt as the second user turn
        chat(f"My teacher asked me this, please help: {ah[9][0]} Thanks a lot!"),  # 7 inside a longer request
        chat(" ".join(arena[: int(len(arena) * 0.4)])),  # 8 40% of a long prompt
        chat(mt[0][1]),  # 9 the second turn of an MT-Bench question
        chat(
            "Can you explain the fundamentals of quantum computing?"
        ),  # 10 two words changed: near, not near-exact
        chat(
            "What are some places to visit in Montgomery, Alabama?"
        ),  # 11 one word added to an 8-token prompt
        chat(ah2[24][0]),  # 12 verbatim, Arena-Hard v2.0
    ]
    by_ngram = {"alpaca_eval": {0, 1, 2}, "arena_hard": {7}, "arena_hard_v2": {12}, "mt_bench": {6, 9}}
    by_embedding_only = {
        "alpaca_eval": {3, 11},
        "arena_hard": set(),
        "arena_hard_v2": set(),
        "mt_bench": set(),
    }
    return rows, by_ngram, by_embedding_only


def reference_score(doc: str, prompt: str, n: int) -> float:
    """open-instruct's `ngram_match` (decontamination/search.py) for one test string and one training document, as
    written there: the prompt's n-grams as a dict n-gram -> token positions (a repeated n-gram keeps its last
    place), the positions of every n-gram the document contains are matched, score = matched / prompt tokens."""
    q, d = dc.tokens(prompt), dc.tokens(doc)
    in_doc = {tuple(d[i : i + n]) for i in range(len(d) - n + 1)}
    mapping = {tuple(q[i : i + n]): range(i, i + n) for i in range(len(q) - n + 1)}
    matched = {t for gram, positions in mapping.items() if gram in in_doc for t in positions}
    return len(matched) / len(q) if q else 0.0


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def config(tmp_path: Path, data: Path, name: str = "out", **kw) -> dc.DecontaminateConfig:
    kw = {"embedder": None, **kw}
    return dc.DecontaminateConfig(
        input=str(data), output_dir=str(tmp_path / name), benchmarks=BENCHES, questions=QUESTIONS, **kw
    )


def read(path: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("train-*.parquet"))]).to_pylist()


def flagged(rows: list[dict], bench: str) -> set[int]:
    return {i for i, r in enumerate(rows) if r[f"contaminated_{bench}"]}


def test_tokens_are_open_instructs_analyzer():
    assert dc.tokens('Hello,  WORLD!\n(it\'s) "foo-bar"\tbaz\\qux: 3.5?') == [
        "hello", "world", "it's", "foo", "bar", "baz", "qux", "3", "5",
    ]  # fmt: skip


def test_ngrams_flag_copies_of_real_benchmark_prompts(tmp_path):
    rows, by_ngram, _ = training_rows()
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    summary = dc.run(config(tmp_path, data))
    out = read(tmp_path / "out")
    # no row dropped, moved or changed: the input's columns as they were, the flags added
    assert [{"messages": r["messages"]} for r in out] == rows
    for bench in BENCHES:
        assert flagged(out, bench) == by_ngram[bench], bench
        assert f"contamination_embed_{bench}" not in out[0]  # no embedder, no embedding column
    # every score is open-instruct's rule, computed the plain way: max over user turns and the benchmark's prompts
    for bench in BENCHES:
        prompts = [t for q in turns(bench) for t in q]
        for i, row in enumerate(rows):
            users = [m["content"] for m in row["messages"] if m["role"] == "user"]
            expected = max(reference_score(u, p, 8) for u in users for p in prompts)
            assert out[i][f"contamination_ngram_{bench}"] == pytest.approx(expected), (bench, i)
    assert out[0]["contamination_ngram_alpaca_eval"] == out[1]["contamination_ngram_alpaca_eval"] == 1.0
    assert 0.5 < out[2]["contamination_ngram_alpaca_eval"] < 1.0
    assert out[8]["contamination_ngram_arena_hard"] == pytest.approx(0.397, abs=0.01)  # below 0.5: kept
    assert [out[i]["contamination_match_alpaca_eval"] for i in (0, 1, 2, 3)] == ["0", "13", "6", None]
    assert (
        out[9]["contamination_match_mt_bench"] == "81#2" and out[6]["contamination_match_mt_bench"] == "93#1"
    )
    assert out[12]["contamination_match_arena_hard_v2"] == "b5cd2ab13aa249f5"
    ae = summary["benchmarks"]["alpaca_eval"]
    assert (ae["flagged_rows"], ae["questions_hit"], ae["questions"], ae["prompts"]) == (3, 3, 30, 30)
    assert summary["benchmarks"]["mt_bench"]["prompts"] == 40  # both turns of 20 questions
    assert ae["contamination_rate"] == pytest.approx(3 / 13, abs=1e-6)
    assert summary["flagged_rows"] == 7
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["benchmarks"] == summary["benchmarks"]
    source = pq.read_schema(tmp_path / "out" / "train-00000.parquet").field("contaminated_mt_bench").metadata
    assert b"8-grams shared with a prompt of mt_bench cover > 0.5" in source[b"source"]
    # first turns only: the MT-Bench prompt in row 6's second turn goes unseen; 13-gram, any overlap (GPT-3's rule)
    dc.run(config(tmp_path, data, "first", turns="first"))
    assert flagged(read(tmp_path / "first"), "mt_bench") == {9}
    dc.run(config(tmp_path, data, "gpt3", ngram_size=13, ngram_threshold=0.0))
    gpt3 = read(tmp_path / "gpt3")
    assert flagged(gpt3, "arena_hard") == {7, 8} and flagged(gpt3, "mt_bench") == {6}  # row 9: 11 tokens < 13


@pytest.mark.integration
def test_minilm_flags_near_exact_copies_the_ngrams_miss(tmp_path):
    """The real all-MiniLM-L6-v2: a one-word edit of a prompt shorter than 8 tokens has no 8-gram in common with it,
    but is a near-exact copy; a two-word edit (cosine 0.94) and a same-topic question are not."""
    rows, by_ngram, by_embedding = training_rows()
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    summary = dc.run(config(tmp_path, data, embedder="all-MiniLM-L6-v2"))
    out = read(tmp_path / "out")
    for bench in BENCHES:
        assert flagged(out, bench) == by_ngram[bench] | by_embedding[bench], bench
    cosine = [r["contamination_embed_alpaca_eval"] for r in out]
    assert cosine[0] == pytest.approx(1.0, abs=1e-4) and cosine[3] > 0.99 and cosine[11] > 0.99
    assert 0.9 < cosine[10] < 0.95 and cosine[5] < 0.85 and cosine[4] < 0.3
    assert out[8]["contamination_embed_arena_hard"] < 0.95  # 40% of a long prompt is not a near-exact copy
    assert (
        out[3]["contamination_ngram_alpaca_eval"] == 0.0 and out[3]["contamination_match_alpaca_eval"] == "27"
    )
    assert summary["benchmarks"]["alpaca_eval"]["by_embedding"] == 5  # 0, 1, 2 (also n-gram), 3, 11
    assert summary["benchmarks"]["alpaca_eval"]["flagged_rows"] == 5


@pytest.mark.integration
def test_bfloat16_embeddings_flag_the_same_rows(tmp_path):
    """embed_dtype=bfloat16 runs MiniLM under bf16 autocast: cosines move by rounding only, never across the line."""
    rows, by_ngram, by_embedding = training_rows()
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        dc.run(config(tmp_path / dtype, data, embedder="all-MiniLM-L6-v2", embed_dtype=dtype))
        runs[dtype] = read(tmp_path / dtype / "out")
    for bench in BENCHES:
        assert flagged(runs["bfloat16"], bench) == by_ngram[bench] | by_embedding[bench], bench
        ours, want = ([r[f"contamination_embed_{bench}"] for r in runs[d]] for d in ("bfloat16", "float32"))
        assert ours != want  # bf16 really ran
        assert ours == pytest.approx(want, abs=5e-3)


def test_rerun_is_idempotent_and_redoes_only_changed_shards(tmp_path):
    rows, by_ngram, _ = training_rows()
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:7]), data / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:]), data / "train-00001.parquet")
    cfg = config(tmp_path, data)
    first = dc.run(cfg)
    shards = sorted((tmp_path / "out").glob("train-*.parquet"))
    assert [pq.read_metadata(s).num_rows for s in shards] == [7, 6]  # aligned with the input's shards
    before = {s.name: (s.read_bytes(), s.stat().st_mtime_ns) for s in shards}
    second = dc.run(cfg)  # the same rows and settings: nothing recomputed, the same output and counts
    assert {s.name: (s.read_bytes(), s.stat().st_mtime_ns) for s in shards} == before
    assert {k: v for k, v in first.items() if k != "wall_seconds"} == {
        k: v for k, v in second.items() if k != "wall_seconds"
    }
    # one input shard changes: only its output shard is redone, and the counts follow
    pq.write_table(
        pa.Table.from_pylist(rows[7:] + [chat(turns("alpaca_eval")[4][0])]), data / "train-00001.parquet"
    )
    third = dc.run(cfg)
    assert shards[0].stat().st_mtime_ns == before[shards[0].name][1]
    assert shards[1].stat().st_mtime_ns != before[shards[1].name][1]
    assert third["benchmarks"]["alpaca_eval"]["flagged_rows"] == 4 and third["rows"] == 14
    # its own output as input: the columns are replaced, not duplicated, with the same values
    again = dc.run(config(tmp_path, tmp_path / "out", "again"))
    assert read(tmp_path / "again") == read(tmp_path / "out")
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == {
        k: v for k, v in third.items() if k != "wall_seconds"
    }


def test_bad_input_fails_in_one_line_naming_it(tmp_path):
    rows, _, _ = training_rows()
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], rows[1], {"instruction": "no answer"}])
    good = ["embedder=null", f"benchmarks=[{','.join(BENCHES)}]"] + [
        f"questions.{b}={p}" for b, p in QUESTIONS.items()
    ]

    def fails(*args: str) -> str:
        code, err = main("data_synth.decontaminate", *good, f"output_dir={tmp_path / 'o'}", *args)
        last = err.strip().splitlines()[-1]  # after the data loader's progress bars
        assert code == 2 and last.startswith("error: ") and err.count("error: ") == 1, (code, err)
        return last

    assert f"{tmp_path}/missing.jsonl: no such file or directory" in fails(f"input={tmp_path}/missing.jsonl")
    err = fails(f"input={data}", f"questions.mt_bench={tmp_path}/mt.jsonl")
    assert f"questions.mt_bench: {tmp_path}/mt.jsonl: no such file or directory" in err
    err = fails(f"input={data}", f"questions.alpaca_eval={QUESTIONS['mt_bench']}")
    assert "questions.alpaca_eval: " in err and "row 1: expected an 'instruction' string" in err
    assert f"{bad}: row 2: no conversation" in fails(f"input={bad}")
    assert "key 'benchmarks[1]': expected one of" in fails(f"input={data}", "benchmarks=[alpaca_eval,gsm8k]")
    assert "questions: ['arena_hard', 'arena_hard_v2', 'mt_bench'] not in benchmarks" in fails(
        f"input={data}", "benchmarks=[alpaca_eval]"
    )
    assert "key 'ngram_threshold': must be in [0, 1), got 1.5" in fails(
        f"input={data}", "ngram_threshold=1.5"
    )
    assert "key 'embed_threshold': must be in [0, 1), got -0.2" in fails(
        f"input={data}", "embed_threshold=-0.2"
    )
    assert "key 'ngram_size': must be >= 1, got 0" in fails(f"input={data}", "ngram_size=0")
    assert not list((tmp_path / "o").glob("train-*"))


def test_select_drops_flagged_rows_and_the_card_shows_the_rate(tmp_path):
    rows, by_ngram, _ = training_rows()
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    dc.run(config(tmp_path, data))
    out = tmp_path / "out"
    summary = select.run(
        select.SelectConfig(input=str(out), output_dir=str(tmp_path / "clean"), drop_contaminated=True)
    )
    dirty = set().union(*by_ngram.values())
    assert summary["selected_rows"] == len(rows) - len(dirty) == 6
    step = summary["steps"][1]
    assert step["step"] == "drop_contaminated" and step["removed"] == 7 and len(step["columns"]) == 4
    kept = read(tmp_path / "clean")
    assert [{"messages": r["messages"]} for r in kept] == [r for i, r in enumerate(rows) if i not in dirty]
    # a plain filter on one benchmark's flag, from the command line
    code, err = main("data_synth.select", f"input={out}", f"output_dir={tmp_path / 'no_alpaca'}",
                     "filters=[{column: contaminated_alpaca_eval, op: '==', value: false}]")  # fmt: skip
    assert code == 0, err
    assert len(read(tmp_path / "no_alpaca")) == len(rows) - 3
    code, err = main(
        "data_synth.select", f"input={data}", f"output_dir={tmp_path / 'x'}", "drop_contaminated=true"
    )
    assert code == 2 and "drop_contaminated: no 'contaminated_<benchmark>' column" in err
    # the data card: the rate per benchmark, and the questions hit from decontaminate's manifest
    df, _ = report._frame(str(out))
    card = report.card(df, "rows", [], json.loads((out / "manifest.json").read_text()))
    assert "| alpaca_eval | 3 | 23.08% | 3 of 30 |" in card and "| mt_bench | 2 | 15.38% | 2 of 20 |" in card
    assert "contamination" not in report.card(report._frame(str(data))[0], "rows", [], {})

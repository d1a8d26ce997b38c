"""eval.generate: every question format in, every benchmark's answer format out, with the embedded model."""

import json

import pytest

from core.config import ConfigError
from eval.arena_hard import read_answers
from eval.generate import check_same_questions, export, load_questions, main, style_metadata


def write(path, rows, as_list=False):
    path.write_text(json.dumps(rows) if as_list else "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_question_formats_of_each_benchmark(tmp_path):
    alpaca = write(
        tmp_path / "a.json", [{"instruction": "Hi", "dataset": "helpful_base"}, {"instruction": "Yo"}], True
    )
    qs = load_questions("alpaca_eval", alpaca)
    assert [q["turns"] for q in qs] == [["Hi"], ["Yo"]] and qs[0]["extra"]["dataset"] == "helpful_base"
    arena = write(tmp_path / "q.jsonl", [{"question_id": "ab12", "category": "arena-hard-v0.1", "cluster": "c",
                                           "turns": [{"content": "Write a haiku"}]}])  # fmt: skip
    (q,) = load_questions("arena_hard", arena)
    assert q["id"] == "ab12" and q["turns"] == ["Write a haiku"] and q["extra"] == {"cluster": "c"}
    v2 = write(
        tmp_path / "v2.jsonl",
        [
            {
                "uid": "2edbb5f36f5b42be",
                "category": "hard_prompt",
                "subcategory": "coding",
                "prompt": "Write me a zig program",
            }
        ],
    )  # fmt: skip  arena-hard-auto since v2.0
    (q,) = load_questions("arena_hard_v2", v2)
    assert (q["id"], q["turns"], q["category"]) == (
        "2edbb5f36f5b42be",
        ["Write me a zig program"],
        "hard_prompt",
    )
    fastchat = write(
        tmp_path / "mt.jsonl", [{"question_id": 81, "category": "writing", "turns": ["One", "Two"]}]
    )
    assert load_questions("mt_bench", fastchat)[0]["turns"] == ["One", "Two"]
    h4 = write(
        tmp_path / "h4.jsonl", [{"prompt_id": 7, "category": "math", "prompt": ["A", "B"], "reference": []}]
    )
    assert load_questions("mt_bench", h4)[0]["id"] == "7"

    bad = write(
        tmp_path / "bad.jsonl", [{"question_id": 1, "turns": ["ok"]}, {"question_id": 2, "text": "no turns"}]
    )
    with pytest.raises(
        ConfigError, match=r"bad.jsonl: row 2: expected 'uid' and 'prompt' \(arena-hard-auto\), 'question_id'"
    ):
        load_questions("arena_hard", bad)
    dup = write(
        tmp_path / "dup.jsonl", [{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}]
    )
    with pytest.raises(ConfigError, match=r"duplicate question ids \['1'\]"):
        load_questions("arena_hard", dup)


def test_mismatched_answer_files_fail_naming_the_ids():
    check_same_questions(["q1", "q2"], ["q1", "q2"], "f")
    check_same_questions(["q1", "q2"], ["q2", "q1"], "f", ordered=False)  # keyed files may be in any order
    with pytest.raises(ConfigError, match=r"f does not match .*missing question_ids 'q2'"):
        check_same_questions(["q1", "q2"], ["q1"], "f")
    with pytest.raises(ConfigError, match=r"unexpected question_ids 'q9'"):
        check_same_questions(["q1"], ["q1", "q9"], "f")
    with pytest.raises(ConfigError, match=r"question_ids out of order, first 'q2', 'q1'"):
        check_same_questions(["q1", "q2"], ["q2", "q1"], "f")
    with pytest.raises(ConfigError, match=r"duplicated question_ids 'q1'"):
        check_same_questions(["q1"], ["q1", "q1"], "f", ordered=False)


def test_style_metadata_counts_markdown_outside_code():
    text = "# Title\n## Part\n1. one\n2. two\n- dot\n* star\n**bold** and __also__\n```\n# not a header\n- no\n```\n"
    meta = style_metadata(text, 42)
    assert meta["token_len"] == 42
    assert meta["header_count"]["h1"] == 1 and meta["header_count"]["h2"] == 1
    assert meta["list_count"] == {"ordered": 2, "unordered": 2}
    assert meta["bold_count"] == {"**": 1, "__": 1}


def test_embedded_model_answers_each_benchmark_in_its_format(embedded_path, tmp_path):
    questions = write(tmp_path / "mt.jsonl", [{"question_id": 81, "category": "writing",
                                               "turns": ["Name a color.", "Now name another one."]},
                                              {"question_id": 82, "category": "math",
                                               "turns": ["What is 2+2?", "And 3+3?"]}])  # fmt: skip
    # float32: a greedy answer regenerated alone must equal the one generated in a batch of two (bfloat16
    # rounds batched and single matmuls differently enough to flip a near-tie)
    common = [
        f"model={embedded_path}",
        "name=smol",
        "max_tokens=8",
        "repetition_penalty=1.2",
        "engine.dtype=float32",
    ]
    main([*common, "bench=mt_bench", f"questions={questions}", f"output_dir={tmp_path / 'mt'}"])
    rows = [
        json.loads(line)
        for line in (tmp_path / "mt" / "model_answer" / "smol.jsonl").read_text().splitlines()
    ]
    assert [r["question_id"] for r in rows] == ["81", "82"]
    for r in rows:  # FastChat's answer format, both turns answered
        assert r["model_id"] == "smol" and len(r["choices"][0]["turns"]) == 2
        assert all(isinstance(t, str) and t for t in r["choices"][0]["turns"])

    # Resume: a lost second turn is regenerated, everything else is kept as it was.
    progress = tmp_path / "mt" / "answers.jsonl"
    kept = [json.loads(line) for line in progress.read_text().splitlines()]
    kept[1]["answers"], kept[1]["n_tokens"] = kept[1]["answers"][:1], kept[1]["n_tokens"][:1]
    progress.write_text("".join(json.dumps(r) + "\n" for r in kept))
    main([*common, "bench=mt_bench", f"questions={questions}", f"output_dir={tmp_path / 'mt'}"])
    again = [json.loads(line) for line in progress.read_text().splitlines()]
    assert again[0] == kept[0] and again[1]["answers"][0] == kept[1]["answers"][0]
    assert again[1]["answers"][1] == rows[1]["choices"][0]["turns"][1]  # greedy: the same answer again

    arena = write(tmp_path / "ah.jsonl", [{"question_id": "x1", "turns": [{"content": "Name a fruit."}]}])
    main([*common, "bench=arena_hard", f"questions={arena}", f"output_dir={tmp_path / 'ah'}"])
    answers = read_answers(tmp_path / "ah" / "model_answer" / "smol.jsonl")  # what eval.arena_hard reads
    (row,) = [json.loads(line) for line in (tmp_path / "ah" / "model_answer" / "smol.jsonl").open()]
    assert list(row) == ["uid", "ans_id", "model", "messages", "tstamp", "metadata"]  # arena-hard-auto v2.0's
    assert list(answers) == ["x1"] and 0 < answers["x1"]["token_len"] <= 8
    assert answers["x1"]["meta"]["token_len"] == answers["x1"]["token_len"]

    alpaca = write(tmp_path / "ae.json", [{"instruction": "Name a fruit.", "dataset": "demo"}], as_list=True)
    main([*common, "bench=alpaca_eval", f"questions={alpaca}", f"output_dir={tmp_path / 'ae'}"])
    (out,) = json.loads((tmp_path / "ae" / "model_outputs.json").read_text())
    assert out["instruction"] == "Name a fruit." and out["generator"] == "smol" and out["dataset"] == "demo"
    assert out["output"] == answers["x1"]["text"]  # same model, same prompt, greedy


def test_a_chat_api_model_answers_over_real_http(openai_server, embedded_path, tmp_path, monkeypatch):
    """engine.chat: a hosted model (a baseline such as gpt-4-0314) gets messages, not rendered text."""
    monkeypatch.setenv("HOSTED_KEY", "sk-test-123")
    arena = write(tmp_path / "ah.jsonl", [{"question_id": "x1", "turns": [{"content": "Name a fruit."}]}])
    hosted = ["model=hosted", "engine.backend=openai", "engine.chat=true", f"engine.base_urls={openai_server}",
              "engine.api_key_env=HOSTED_KEY"]  # fmt: skip
    for name, args in (("hosted", hosted), ("local", [f"model={embedded_path}"])):
        main([*args, f"name={name}", "bench=arena_hard", "max_tokens=8", f"questions={arena}",
              f"output_dir={tmp_path / name}"])  # fmt: skip
    remote = read_answers(tmp_path / "hosted" / "model_answer" / "hosted.jsonl")
    local = read_answers(tmp_path / "local" / "model_answer" / "local.jsonl")
    assert remote["x1"]["text"] == local["x1"]["text"]  # the server applied the same chat template


def test_arena_hard_answer_files_in_both_of_arena_hard_autos_layouts(tmp_path):
    answered = [{"id": "x1", "turns": ["Name a fruit."], "answers": ["## Fruit\n- **Apple**"], "n_tokens": [7],
                 "extra": {}}]  # fmt: skip
    v2 = json.loads(export("arena_hard", "smol", answered, tmp_path / "v2", "v2").read_text())
    # gen_answer.py since v2.0: show_result.py reads messages[-1].content.answer, and style control sums the
    # metadata values in this key order
    assert v2["messages"] == [{"role": "user", "content": "Name a fruit."},
                              {"role": "assistant", "content": {"answer": "## Fruit\n- **Apple**"}}]  # fmt: skip
    assert list(v2["metadata"]) == ["token_len", "header_count", "list_count", "bold_count"]
    assert v2["metadata"]["token_len"] == 7 and v2["metadata"]["header_count"]["h2"] == 1
    old = json.loads(export("arena_hard", "smol", answered, tmp_path / "v01", "v0.1").read_text())
    assert list(old) == ["question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"]
    assert old["choices"][0]["turns"] == [{"content": "## Fruit\n- **Apple**", "token_len": 7}]
    for layout in ("v2", "v01"):  # and eval.arena_hard reads both back
        (answer,) = read_answers(tmp_path / layout / "model_answer" / "smol.jsonl").values()
        assert answer["text"] == "## Fruit\n- **Apple**" and answer["token_len"] == 7


def test_a_reordered_and_edited_questions_file_keeps_each_answer_with_its_question(tmp_path, embedded_path,
                                                                                   table_server, monkeypatch):  # fmt: skip
    """The issue: resume was keyed by position, so a reordered file put every answer under another question."""
    from tests.core.test_output_dir import main as run

    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    first = table_server([["apples", "About apples."], ["bees", "About bees."], ["clouds", "About clouds."]])
    questions = tmp_path / "q.json"
    args = ["bench=alpaca_eval", f"questions={questions}", "name=m", f"output_dir={tmp_path / 'g'}",
            "engine.backend=openai", f"engine.tokenizer={embedded_path}", "engine.api_key_env=TEST_SERVER_KEY",
            "max_tokens=8"]  # fmt: skip
    write(questions, [{"instruction": f"Tell me about {x}."} for x in ("apples", "bees", "clouds")], True)
    assert run("eval.generate", *args, f"engine.base_urls=[{first}]")[0] == 0
    # Reordered, one question edited, one repeated; a server that now answers otherwise shows what is redone
    again = ("clouds", "dunes", "apples", "dunes")
    write(questions, [{"instruction": f"Tell me about {x}."} for x in again], True)
    second = table_server([["", "Recomputed."]])
    code, err = run("eval.generate", *args, f"engine.base_urls=[{second}]")
    assert code == 0, err
    outputs = json.loads((tmp_path / "g" / "model_outputs.json").read_text())
    assert [(o["instruction"], o["output"]) for o in outputs] == [
        ("Tell me about clouds.", "About clouds."),
        ("Tell me about dunes.", "Recomputed."),
        ("Tell me about apples.", "About apples."),
        ("Tell me about dunes.", "Recomputed."),  # the same text: one answer, given once
    ]


@pytest.mark.integration
def test_a_prompt_that_fills_the_context_is_never_answered_empty(tmp_path, embedded_path):
    """vLLM refuses a whole call when one prompt exceeds max_model_len (a long Magpie-MT or MT-Bench history):
    the engines answer such a prompt with finish_reason "context" instead, and generate stops naming the question,
    keeping every other answer, rather than scoring an empty answer as the model's."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.engines import CONTEXT_FULL, EngineConfig, Sampling, TransformersEngine
    from tests.core.test_output_dir import main as run

    tok = AutoTokenizer.from_pretrained(embedded_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    model = tmp_path / "short_context"
    LlamaForCausalLM(config).save_pretrained(model)
    tok.save_pretrained(model)
    long = "Tell me everything about " + "the sea and the sky, " * 40
    short, full = TransformersEngine(str(model), EngineConfig()).complete(
        ["Hi", long], Sampling(max_tokens=3)
    )
    assert short.finish_reason == "length" and short.n_tokens == 3
    assert (full.text, full.n_tokens, full.finish_reason) == ("", 0, CONTEXT_FULL)

    questions = tmp_path / "q.json"
    write(questions, [{"instruction": "Name a color."}, {"instruction": long}], True)
    code, err = run("eval.generate", f"model={model}", "bench=alpaca_eval", f"questions={questions}", "name=m",
                    "max_tokens=4", f"output_dir={tmp_path / 'g'}")  # fmt: skip
    assert code == 2 and "the prompt fills the model's context" in err and "(turn 1)" in err
    kept = [json.loads(line) for line in (tmp_path / "g" / "answers.jsonl").read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["answers"][0] != ""

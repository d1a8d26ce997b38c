"""Magpie and pairs over the `openai` engine against a real local server that seeds each request on its own, as
vLLM, SGLang and `vllm serve` do (tests/openai_server.py): realistic chunk sizes, no repeats, and the same rows
however many servers answer."""

import datasets
import pytest

from data_synth.magpie import MagpieConfig
from data_synth.magpie import run as magpie
from data_synth.pairs import PairsConfig
from data_synth.pairs import run as pairs
from tests.conftest import start_server, write_questions

pytestmark = pytest.mark.slow


def magpie_over(urls: list[str], out, concurrency: int) -> tuple[dict, list]:
    cfg = MagpieConfig(model="smollm2", output_dir=str(out), n_conversations=16, chunk_size=16, seed=3)
    cfg.engine.backend, cfg.engine.base_urls, cfg.engine.concurrency = "openai", urls, concurrency
    cfg.engine.tokenizer, cfg.engine.api_key_env = "embedded", "SERVER_KEY"
    cfg.instruction.max_tokens, cfg.response.max_tokens = 40, 4
    summary = magpie(cfg)
    rows = datasets.load_dataset("parquet", data_dir=str(out), split="train").to_list()
    return summary, rows


def test_server_honours_seeds_as_vllm_does(openai_server, monkeypatch):
    from core.engines import EngineConfig, OpenAIEngine, Sampling

    monkeypatch.setenv("SERVER_KEY", "sk-test-123")
    engine = OpenAIEngine(
        "m", EngineConfig(backend="openai", base_urls=[openai_server], api_key_env="SERVER_KEY")
    )
    prompt = "<|im_start|>user\n"
    same = engine.complete([prompt] * 3, Sampling(temperature=1.0, max_tokens=12, seed=5))
    assert len({c.text for c in same}) == 1  # one seed, one text: what made every chunk repeat itself
    distinct = engine.complete(
        [prompt] * 3, [Sampling(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2, 3)]
    )
    assert len({c.text for c in distinct}) == 3


def test_magpie_over_a_serving_engine_does_not_repeat_and_ignores_the_server_count(
    openai_server, embedded_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("SERVER_KEY", "sk-test-123")
    one, rows_one = magpie_over([openai_server], tmp_path / "one", concurrency=4)
    assert one["rows"] == 16 and len({r["messages"][0]["content"] for r in rows_one}) == 16
    # A T=1 sampler after one fixed prompt repeats itself rarely; a shared seed repeated ~half of every chunk.
    assert one["duplicates_dropped"] <= 3
    assert one["instructions_sampled"] <= 2 * 16
    assert len({r["seed"] for r in rows_one}) == 16

    url, proc = start_server(embedded_path)
    try:
        two, rows_two = magpie_over([openai_server, url], tmp_path / "two", concurrency=2)
    finally:
        proc.kill()
        proc.wait()
    # Every request's text is a function of its prompt and its own seed, so routing changes nothing.
    assert [r["messages"] for r in rows_two] == [r["messages"] for r in rows_one]


def test_pairs_over_a_serving_engine_samples_distinct_responses(openai_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVER_KEY", "sk-test-123")
    questions = ["Give me a tip for learning a new language.", "Describe the color blue.", "Why do we sleep?"]
    data = write_questions(tmp_path / "rows.jsonl", questions)
    cfg = PairsConfig(input=str(data), output_dir=str(tmp_path / "pairs"), model="smollm2", n_samples=4,
                      max_tokens=16, test_size=0.0)  # fmt: skip
    cfg.engine.backend, cfg.engine.base_urls, cfg.engine.api_key_env = "openai", [openai_server], "SERVER_KEY"
    cfg.engine.tokenizer = "embedded"
    summary = pairs(cfg)
    work = datasets.load_dataset(
        "parquet", data_dir=str(tmp_path / "pairs" / "work"), split="train"
    ).to_list()
    for row in work:  # four samples at T=0.8 of one prompt, each with its own seed: not four copies
        assert len(set(row["all_scores"])) >= 3, row
    assert summary["pairs"] == 3 and summary["ties_dropped"] == 0
    assert not (tmp_path / "pairs" / "test-00000.parquet").exists()  # no empty, schema-less test split

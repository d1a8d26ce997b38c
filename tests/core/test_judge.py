"""The judgment cache and failure accounting, with the real embedded judge."""

import pytest

from core.engines import EngineConfig
from core.errors import OutageError
from core.judge import Judge, JudgeConfig

QUESTIONS = [[{"role": "user", "content": f"Is {n} an even number? Answer yes or no."}] for n in (2, 7, 10)]


def first_word(c):
    words = c.text.strip().split()
    return words[0].lower().strip(".,!") if words else None


def test_rerun_is_served_from_the_cache_without_touching_the_engine(embedded_path, tmp_path):
    cfg = JudgeConfig(
        model=embedded_path, max_tokens=3, logprobs=5, retries=0, engine=EngineConfig(batch_size=4)
    )
    judge = Judge(cfg, tmp_path / "cache.sqlite")
    first = judge.ask(QUESTIONS, first_word)
    assert judge.stats.calls == 3 and judge.stats.cached == 0 and len(judge.cache) == 3
    assert all(v.completion.top_logprobs for v in first)

    # Same judge, prompts and sampling, but the engine now points at a dead server: any call would fail.
    dead = EngineConfig(
        backend="openai", base_urls=["http://127.0.0.1:9"], max_retries=0, tokenizer=embedded_path
    )
    again = Judge(JudgeConfig(**{**cfg.__dict__, "engine": dead}), tmp_path / "cache.sqlite")
    second = again.ask(QUESTIONS, first_word)
    assert again.stats.calls == 0 and again.stats.cached == 3 and again.stats.unparsed == 0
    assert [v.value for v in second] == [v.value for v in first]
    assert [v.completion.text for v in second] == [v.completion.text for v in first]

    # A different sampling setting is a different key: it is not served from the cache, and the dead judge is
    # an outage, not a verdict.
    other = Judge(JudgeConfig(**{**cfg.__dict__, "engine": dead, "max_tokens": 4}), tmp_path / "cache.sqlite")
    with pytest.raises(OutageError, match=r"the last 1 requests all failed: .*127\.0\.0\.1:9"):
        other.ask(QUESTIONS[:1], first_word)
    assert other.stats.unparsed == 0 and other.stats.calls == 0 and len(other.cache) == 3


def test_a_reply_without_verdict_is_retried_then_reported(embedded_path, tmp_path):
    cfg = JudgeConfig(
        model=embedded_path, max_tokens=2, logprobs=None, retries=2, engine=EngineConfig(batch_size=4)
    )
    judge = Judge(cfg, tmp_path / "cache.sqlite")
    verdicts = judge.ask(QUESTIONS[:2], lambda c: None)  # a parser that never finds a verdict
    assert judge.stats.calls == 2 * 3  # first try + two retries each
    assert judge.stats.unparsed == 2 and judge.stats.engine_errors == 0
    for v in verdicts:
        assert v.value is None and v.attempts == 3 and v.error == "no verdict in the reply"
        assert v.completion is not None  # the last reply is kept for the report
    # The retries are cached too: the failed evaluation re-runs with zero calls and the same failures.
    again = Judge(cfg, tmp_path / "cache.sqlite")
    assert [v.value for v in again.ask(QUESTIONS[:2], lambda c: None)] == [None, None]
    assert again.stats.calls == 0 and again.stats.unparsed == 2


def test_prefill_starts_the_reply_and_parsers_see_it(embedded_path, tmp_path):
    cfg = JudgeConfig(model=embedded_path, max_tokens=2, logprobs=None, retries=0, prefill="Verdict: [[")
    judge = Judge(cfg, tmp_path / "cache.sqlite")
    assert judge.prompt(QUESTIONS[0]).endswith("<|im_start|>assistant\nVerdict: [[")
    (v,) = judge.ask(QUESTIONS[:1], lambda c: c.text)
    assert v.value.startswith("Verdict: [[")


def test_chat_api_judge_over_real_http(openai_server, embedded_path, monkeypatch, tmp_path):
    """A hosted chat-only judge (engine.chat): messages go to /v1/chat/completions, logprobs come back."""
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    engine = EngineConfig(backend="openai", chat=True, base_urls=[openai_server], api_key_env="JUDGE_KEY")
    judge = Judge(
        JudgeConfig(model="gpt-judge", engine=engine, max_tokens=3, logprobs=5, retries=0), tmp_path / "c"
    )
    remote = judge.ask(QUESTIONS[:2], first_word)
    local = Judge(JudgeConfig(model=embedded_path, max_tokens=3, logprobs=5, retries=0), tmp_path / "c2")
    expected = local.ask(QUESTIONS[:2], first_word)
    # The server renders the same chat template: the same greedy reply and first-token distribution.
    assert [v.completion.text for v in remote] == [v.completion.text for v in expected]
    assert list(remote[0].completion.top_logprobs) == list(expected[0].completion.top_logprobs)
    assert judge.stats.calls == 2

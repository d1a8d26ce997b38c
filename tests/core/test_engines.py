import socket

import pytest

from core.config import ConfigError
from core.engines import (
    EngineConfig,
    EngineError,
    OpenAIEngine,
    Sampling,
    TransformersEngine,
    VLLMEngine,
    completion_from_vllm,
    request_seed,
    vllm_sampling_kwargs,
)
from core.errors import OutageError

PRE_QUERY = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"


def chat(q: str) -> str:
    return PRE_QUERY + q + "<|im_end|>\n<|im_start|>assistant\n"


def test_transformers_engine_generates_real_text_with_stops_and_limits(embedded_engine):
    sampling = [
        Sampling(temperature=1.0, max_tokens=48, stop=("\n", "<|im_end|>"), seed=3),
        Sampling(temperature=1.0, max_tokens=48, stop=("\n", "<|im_end|>"), seed=3),
        Sampling(temperature=1.0, max_tokens=4, stop=("\n",), seed=3),  # per-request max tokens
    ]
    outs = embedded_engine.complete([PRE_QUERY] * 3, sampling)
    for o in outs[:2]:
        assert o.text.strip() and "\n" not in o.text and "<|im_end|>" not in o.text
        assert len(o.text.split()) >= 2  # words, not noise
    assert outs[2].n_tokens <= 4


def test_transformers_engine_greedy_is_deterministic_and_answers(embedded_engine):
    s = Sampling(temperature=0.0, max_tokens=24, stop=("<|im_end|>",))
    a = embedded_engine.complete([chat("What is the capital of France?")], s)[0]
    b = embedded_engine.complete([chat("What is the capital of France?"), chat("Name a color.")], s)[0]
    assert a.text == b.text  # batching and padding do not change greedy output
    assert "Paris" in a.text


def test_seeded_sampling_reproduces(embedded_engine):
    s = Sampling(temperature=1.0, max_tokens=16, seed=11)
    assert (
        embedded_engine.complete([PRE_QUERY], s)[0].text == embedded_engine.complete([PRE_QUERY], s)[0].text
    )


def test_top_logprobs_of_first_token(embedded_engine):
    out = embedded_engine.complete(
        [chat("Answer with one letter, A or B: which letter comes first?")],
        Sampling(temperature=0.0, max_tokens=2, logprobs=5),
    )[0]
    lps = list(out.top_logprobs.values())
    assert len(lps) == 5 and lps == sorted(lps, reverse=True)
    assert all(lp <= 0 for lp in lps)


def test_openai_engine_against_a_real_server(openai_server, embedded_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test-123")
    engine = OpenAIEngine(
        "smollm2",
        EngineConfig(backend="openai", base_urls=[openai_server], api_key_env="MY_KEY", concurrency=2),
    )
    s = Sampling(temperature=0.0, max_tokens=24, stop=("<|im_end|>",))
    prompts = [chat("What is the capital of France?"), chat("Name a color.")]
    remote = engine.complete(prompts, s)
    local = TransformersEngine(embedded_path, EngineConfig(batch_size=4, dtype="float32")).complete(
        prompts, s
    )
    assert [r.text for r in remote] == [lo.text for lo in local]  # same model, same greedy text, over HTTP
    assert all(r.n_tokens > 0 for r in remote)
    lp = engine.complete([chat("Hi")], Sampling(temperature=0.0, max_tokens=1, logprobs=3))[0]
    assert len(lp.top_logprobs) == 3


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_openai_engine_survives_a_dead_server(openai_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test-123")
    cfg = EngineConfig(
        backend="openai", base_urls=[_dead_url(), openai_server], api_key_env="MY_KEY", max_retries=2
    )
    outs = OpenAIEngine("smollm2", cfg).complete(
        [chat("Say hi.")] * 4, Sampling(temperature=0.0, max_tokens=8)
    )
    assert len(outs) == 4 and all(o.text for o in outs)


def test_openai_engine_dead_url_fails_naming_it():
    dead = _dead_url()
    cfg = EngineConfig(backend="openai", base_urls=[dead], max_retries=1, timeout=5)
    with pytest.raises(OutageError, match=dead.replace(".", r"\.")):
        OpenAIEngine("m", cfg).complete(["hi"], Sampling(max_tokens=2))


def test_openai_engine_api_key_comes_from_the_environment(openai_server, monkeypatch):
    monkeypatch.delenv("MISSING_KEY", raising=False)
    with pytest.raises(EngineError, match="MISSING_KEY"):
        OpenAIEngine(
            "m", EngineConfig(backend="openai", base_urls=[openai_server], api_key_env="MISSING_KEY")
        )
    monkeypatch.setenv("WRONG_KEY", "sk-wrong")
    engine = OpenAIEngine(
        "m", EngineConfig(backend="openai", base_urls=[openai_server], api_key_env="WRONG_KEY")
    )
    with pytest.raises(EngineError, match="the server refuses these requests: .*HTTP 401") as err:
        engine.complete(["hi"], Sampling(max_tokens=2))
    assert "sk-wrong" not in str(err.value)  # keys never reach messages


def test_vllm_is_optional():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match=r"pip install -e '\.\[vllm\]'"):
            VLLMEngine("embedded", EngineConfig(backend="vllm"))
    else:
        pytest.skip("vLLM installed: exercised on GPU machines")


def test_each_request_is_seeded_on_its_own_as_on_vllm(embedded_engine):
    # vLLM semantics: the same prompt, settings and seed give the same text; distinct seeds give distinct texts,
    # and a request's text does not depend on what else shares its batch.
    s = [
        Sampling(temperature=1.0, max_tokens=24, stop=("\n",), seed=request_seed(0, "t", i))
        for i in range(16)
    ]
    outs = embedded_engine.complete([PRE_QUERY] * 16, s)
    assert len({o.text for o in outs}) >= 14
    again = embedded_engine.complete([PRE_QUERY] * 4, s[4:8])
    assert [o.text for o in again] == [o.text for o in outs[4:8]]
    shared = embedded_engine.complete([PRE_QUERY] * 4, Sampling(temperature=1.0, max_tokens=24, seed=7))
    assert len({o.text for o in shared}) == 1


def test_request_seed_is_stable_distinct_and_in_range():
    seeds = {request_seed(0, "instruction", slot, 0, attempt) for slot in range(1000) for attempt in range(3)}
    assert len(seeds) >= 2999  # 31 bits: a collision among thousands is possible but rare
    assert all(0 <= x < 2**31 for x in seeds)
    assert request_seed(0, "instruction", 5, 0, 1) == request_seed(0, "instruction", 5, 0, 1)
    assert request_seed(0, "instruction", 5, 0, 1) != request_seed(1, "instruction", 5, 0, 1)
    assert request_seed(12, "x") == 156012842  # pinned: a changed derivation would silently change every run


def test_vllm_translation_without_vllm():
    from types import SimpleNamespace as NS

    s = Sampling(temperature=0.8, top_p=0.95, max_tokens=64, stop=("\n",), stop_token_ids=(2,),
                 repetition_penalty=1.2, seed=123, logprobs=2)  # fmt: skip
    kw = vllm_sampling_kwargs(s)
    assert kw == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "stop": ["\n"], "stop_token_ids": [2],
                  "repetition_penalty": 1.2, "seed": 123, "logprobs": 2, "skip_special_tokens": False}  # fmt: skip
    assert vllm_sampling_kwargs(Sampling())["stop"] is None  # vLLM wants None, not []
    # A RequestOutput as vLLM builds it: outputs[0] is a CompletionOutput; logprobs a list of {id: Logprob}.
    lp = {7: NS(logprob=-0.1, rank=1, decoded_token=" A"), 9: NS(logprob=-2.5, rank=2, decoded_token=" B")}
    out = NS(outputs=[NS(text="A is first", token_ids=[7, 8, 5], finish_reason="stop", logprobs=[lp, {}])])
    c = completion_from_vllm(out, s)
    assert (c.text, c.n_tokens, c.finish_reason) == ("A is first", 3, "stop")
    assert c.top_logprobs == {" A": -0.1, " B": -2.5}
    out.outputs[0].finish_reason = "length"
    assert completion_from_vllm(out, Sampling()).finish_reason == "length"
    assert completion_from_vllm(out, Sampling()).top_logprobs is None
    try:
        from vllm import SamplingParams
    except ImportError:
        return
    SamplingParams(**kw)  # where vLLM is installed, the kwargs are its own


def test_a_rate_limit_is_waited_out_and_a_refusal_is_a_reply(embedded_path, tmp_path, monkeypatch):
    """A 429 with Retry-After is retried after the time it asks, not given up on; a hosted chat model's refusal
    (`content: null`) is its reply, not an AttributeError past every handler."""
    import json
    import time

    from tests.conftest import start_server

    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    (tmp_path / "t.json").write_text(json.dumps([
        ["limited", {"status": 429, "times": 2, "retry_after": 1.5, "then": "Finally."}],
        ["forbidden", {"refusal": "I can't help with that."}], ["", "Fine."]]))  # fmt: skip
    url, proc = start_server(embedded_path, tmp_path / "t.json")
    try:
        cfg = EngineConfig(backend="openai", base_urls=[url], api_key_env="TEST_SERVER_KEY", max_retries=2)
        start = time.time()
        (out,) = OpenAIEngine("m", cfg).complete([chat("limited")], Sampling(max_tokens=4))
        assert out.text == "Finally." and time.time() - start >= 3.0  # two waits of the 1.5 s asked
        chat_cfg = EngineConfig(backend="openai", base_urls=[url], api_key_env="TEST_SERVER_KEY", chat=True)
        messages = [[{"role": "user", "content": q}] for q in ("forbidden", "hello")]
        refused, fine = OpenAIEngine("m", chat_cfg).complete(messages, Sampling(max_tokens=4))
        assert refused.text == "I can't help with that." and fine.text == "Fine."
    finally:
        proc.kill()


def test_a_reasoning_model_gets_max_completion_tokens(embedded_path, monkeypatch):
    """OpenAI's reasoning models refuse `max_tokens` (HTTP 400 for every request); `max_completion_tokens` carries
    the limit instead, and is what api.openai.com gets unless told otherwise."""
    from core.engines import token_limit_field
    from core.errors import OutageError
    from tests.conftest import start_server

    monkeypatch.setenv("TEST_SERVER_KEY", "sk-test-123")
    url, proc = start_server(embedded_path)
    try:
        messages = [[{"role": "user", "content": "Name three colors."}]]
        cfg = dict(backend="openai", base_urls=[url], api_key_env="TEST_SERVER_KEY", chat=True, max_retries=0)
        with pytest.raises(OutageError, match="Use 'max_completion_tokens' instead"):
            OpenAIEngine("o3-mini", EngineConfig(**cfg)).complete(messages, Sampling(max_tokens=3))
        engine = OpenAIEngine("o3-mini", EngineConfig(**cfg, token_limit="max_completion_tokens"))
        (out,) = engine.complete(messages, Sampling(max_tokens=3, temperature=0.0))
        assert out.text and out.n_tokens == 3 and out.finish_reason == "length"  # the limit was honoured
    finally:
        proc.kill()
    hosted = EngineConfig(
        backend="openai", base_urls=["https://api.openai.com/v1"], api_key_env="K", chat=True
    )
    assert token_limit_field(hosted) == "max_completion_tokens"
    assert (
        token_limit_field(EngineConfig(backend="openai", base_urls=["http://gpu-node:8000/v1"]))
        == "max_tokens"
    )


def test_vllm_speculative_decoding_settings_reach_vllm_from_the_recipe(monkeypatch):
    """vLLM cannot run here: a stand-in `vllm` module records what the engine hands to `vllm.LLM`."""
    import sys
    import types

    from core.config import parse_config
    from data_synth.magpie import MagpieConfig

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    spec = "{method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4}"
    (cfg,) = parse_config("magpie", ["recipe=magpie_air", f"engine.speculative_config={spec}"], MagpieConfig)
    VLLMEngine(cfg.model, cfg.engine)
    assert seen["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
    }
    (plain,) = parse_config("magpie", ["recipe=magpie_air"], MagpieConfig)
    seen.clear()
    VLLMEngine(plain.model, plain.engine)
    assert "speculative_config" not in seen  # the recipe's null: vLLM's own default, whatever its version
    for bad, message in [
        ("{num_speculative_tokens: 4}", "names neither a `method`"),
        ("{method: ngram, num_speculative_tokens: 0}", "num_speculative_tokens: expected an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config("magpie", ["recipe=magpie_air", f"engine.speculative_config={bad}"], MagpieConfig)
    with pytest.raises(ConfigError, match="backend=transformers does not use it"):
        parse_config("magpie", ["recipe=magpie_demo", f"engine.speculative_config={spec}"], MagpieConfig)

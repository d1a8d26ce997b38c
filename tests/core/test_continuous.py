"""Continuous batching (core/engines/continuous.py) on a tiny random-weight Llama: it must decode exactly what
`model.generate` decodes, whatever the batch size, and keep every request's own settings and seed."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.engines import Sampling
from core.engines.continuous import ContinuousBatcher, PrefixCache, _length_groups, _Row, _top_p

EOS = 2


@pytest.fixture(scope="module")
def tiny(embedded_path):
    tok = AutoTokenizer.from_pretrained(embedded_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS,
        initializer_range=0.2,  # attention far from uniform, so a wrong position or mask changes the text
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model, tok


PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a very long poem about the sea and the sky and the wind.<|im_end|>\n",
    "hi",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",  # a repeat
]


def reference(model, tok, prompt, max_tokens, penalty=1.0):
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens, eos_token_id=[EOS],
                         pad_token_id=EOS, repetition_penalty=penalty)  # fmt: skip
    new = [t for t in out[0, ids["input_ids"].shape[1] :].tolist() if t != EOS]
    return tok.decode(new, skip_special_tokens=False)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_greedy_matches_generate_at_any_batch_size(tiny, batch_size):
    model, tok = tiny
    limits = [5, 17, 40, 3, 17]  # rows finish at different steps, so rows are refilled mid-flight
    samplings = [Sampling(temperature=0.0, max_tokens=n) for n in limits]
    outs = ContinuousBatcher(model, tok, batch_size, [EOS]).run(PROMPTS, samplings)
    for prompt, n, out in zip(PROMPTS, limits, outs, strict=True):
        assert out.text == reference(model, tok, prompt, n)
        assert out.n_tokens == n and out.finish_reason == "length"  # random weights never say EOS here


def test_the_compiled_decode_attention_decodes_what_generate_does(tiny):
    """The CPU engine's attention (cpu_kernels.use_decode_kernel) through transformers' attention registry: rows
    of different spans, refilled mid-flight, decode what sdpa's `generate` does (also on the floor release)."""
    import copy

    from core.engines.cpu_kernels import use_decode_kernel

    model, tok = tiny
    ours = copy.deepcopy(model)
    assert use_decode_kernel(ours) and ours.config._attn_implementation == "harness_cpu_decode"
    limits = [5, 17, 40, 3, 17]
    outs = ContinuousBatcher(ours, tok, 2, [EOS]).run(
        PROMPTS, [Sampling(temperature=0.0, max_tokens=n) for n in limits]
    )
    assert [o.text for o in outs] == [
        reference(model, tok, p, n) for p, n in zip(PROMPTS, limits, strict=True)
    ]


def test_prompts_of_very_different_lengths_prefill_in_groups_and_decode_as_generate(tiny):
    """Admitted rows are prefilled in groups of similar length (padding every prompt to the batch's longest
    wasted half the prefill on Magpie's responses); what each row decodes must not change."""
    model, tok = tiny
    long = "<|im_start|>user\n" + "the sea and the sky " * 40 + "<|im_end|>\n<|im_start|>assistant\n"
    prompts = [PROMPTS[3], long, PROMPTS[1], long + "Sure", PROMPTS[0], PROMPTS[0]]
    rows = [
        _Row(i, Sampling(), tok(p, add_special_tokens=False)["input_ids"], None)
        for i, p in enumerate(prompts)
    ]
    groups = _length_groups(rows)
    assert [sorted(r.index for r in g) for g in groups] == [[0, 2, 4, 5], [1, 3]]  # short ones, long ones
    assert len(_length_groups(rows[4:])) == 1  # equal lengths: one forward
    outs = ContinuousBatcher(model, tok, 8, [EOS]).run(
        prompts, [Sampling(temperature=0.0, max_tokens=12)] * 6
    )
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.text == reference(model, tok, prompt, 12)


def test_repetition_penalty_matches_generate(tiny):
    model, tok = tiny
    samplings = [
        Sampling(temperature=0.0, max_tokens=30, repetition_penalty=1.3),
        Sampling(temperature=0.0, max_tokens=30),
    ]
    outs = ContinuousBatcher(model, tok, 4, [EOS]).run(PROMPTS[:2], samplings)
    assert outs[0].text == reference(model, tok, PROMPTS[0], 30, penalty=1.3)
    assert outs[1].text == reference(model, tok, PROMPTS[1], 30)  # its neighbour's penalty is not its own
    # the first row ends after 11 tokens, the batch drops it and the penalized row moves into its slot: with the
    # tokens it has seen, so the one it drew 9th is still penalized when it comes up again 3 tokens later
    samplings = [Sampling(temperature=0.0, max_tokens=11), samplings[0]]
    outs = ContinuousBatcher(model, tok, 2, [EOS]).run(PROMPTS[1::-1], samplings)
    assert outs[1].text == reference(model, tok, PROMPTS[0], 30, penalty=1.3)


def test_seeds_are_per_request_and_independent_of_the_batch(tiny):
    model, tok = tiny
    s = [Sampling(temperature=1.0, max_tokens=12, seed=i) for i in range(6)]
    alone = [ContinuousBatcher(model, tok, 1, [EOS]).run([PROMPTS[0]], [x])[0].text for x in s]
    together = [o.text for o in ContinuousBatcher(model, tok, 4, [EOS]).run([PROMPTS[0]] * 6, s)]
    assert alone == together
    assert len(set(together)) == 6
    same = ContinuousBatcher(model, tok, 4, [EOS]).run([PROMPTS[0]] * 3, [s[2]] * 3)
    assert {o.text for o in same} == {together[2]}


def test_stop_strings_stop_ids_and_limits(tiny):
    model, tok = tiny
    free = ContinuousBatcher(model, tok, 2, [EOS]).run(
        [PROMPTS[0]], [Sampling(temperature=0.0, max_tokens=40)]
    )[0]
    word = free.text[10:14]  # a string the greedy text is known to contain
    first_token = tok(free.text, add_special_tokens=False)["input_ids"][0]
    samplings = [
        Sampling(temperature=0.0, max_tokens=40, stop=(word,)),
        Sampling(temperature=0.0, max_tokens=40, stop_token_ids=(first_token,)),
        Sampling(temperature=0.0, max_tokens=0),
    ]
    outs = ContinuousBatcher(model, tok, 2, [EOS]).run([PROMPTS[0]] * 3, samplings)
    assert outs[0].text == free.text[: free.text.index(word)] and outs[0].finish_reason == "stop"
    assert outs[1].text == "" and outs[1].n_tokens == 0 and outs[1].finish_reason == "stop"
    assert outs[2].text == "" and outs[2].n_tokens == 0


def test_first_token_logprobs(tiny):
    model, tok = tiny
    out = ContinuousBatcher(model, tok, 2, [EOS]).run(
        [PROMPTS[1]], [Sampling(temperature=0.0, max_tokens=1, logprobs=5)]
    )[0]
    ids = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        expected = torch.log_softmax(model(ids).logits[0, -1], -1).topk(5)
    assert list(out.top_logprobs.values()) == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert out.text == tok.decode(expected.indices[:1].tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    kept = _top_p(probs, torch.tensor([0.7, 1.0]))
    assert kept[0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert kept[1].tolist() == pytest.approx([0.25] * 4)


def test_a_sliding_window_model_runs_within_its_window_and_is_refused_beyond_it(tiny):
    """One mask serves every layer, so a window the requests could outgrow is refused, never silently widened."""
    from transformers import MistralConfig, MistralForCausalLM

    from core.errors import EngineError

    _, tok = tiny
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS, sliding_window=48,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    prompt = PROMPTS[1]  # 13 tokens
    out = ContinuousBatcher(model, tok, 2, [EOS]).run([prompt], [Sampling(temperature=0.0, max_tokens=20)])
    assert out[0].text == reference(
        model, tok, prompt, 20
    )  # within the window: exactly what generate decodes
    with pytest.raises(EngineError, match=r"attends within 48 tokens while a request here may reach 63"):
        ContinuousBatcher(model, tok, 2, [EOS]).run([prompt], [Sampling(temperature=0.0, max_tokens=50)])


@pytest.mark.integration
def test_continuous_batching_on_the_oldest_transformers_we_allow(tmp_path):
    """The tests above run on the installed (newest) transformers; these run them on the floor pyproject.toml states,
    which names the forward's cache keyword differently. Needs the package index, as the GPU-setup test does."""
    import os
    import re
    import subprocess
    import sys

    import tomllib

    from tests.conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = re.search(r"transformers>=(\d+\.\d+)", " ".join(deps)).group(1)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    f"transformers=={floor}.*"], check=True, capture_output=True, timeout=600)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", __file__],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True).stdout  # fmt: skip
    assert version.startswith(floor + "."), version


def test_prefix_cache_prefills_a_later_prompt_only_past_an_earlier_request(tiny):
    """Magpie's response prompt extends its instruction's prompt and sampled instruction: the KV of the finished
    request is reused, only the rest of the prompt is prefilled, and the reply is what generate decodes."""
    model, tok = tiny
    cache = PrefixCache(2**30)
    greedy = [Sampling(temperature=0.0, max_tokens=12)] * 2
    first = ContinuousBatcher(model, tok, 4, [EOS], prefix_cache=cache).run(PROMPTS[:2], greedy)
    follow = [
        p + o.text + "<|im_end|>\n<|im_start|>user\nMore.\n" for p, o in zip(PROMPTS[:2], first, strict=True)
    ]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in follow]
    uncached = [len(x) - cache.match(x, len(x) - 1)[0] for x in ids]
    assert all(n <= len(x) // 2 for n, x in zip(uncached, ids, strict=True))  # most of each prompt is cached
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(a[0].shape))
    try:
        outs = ContinuousBatcher(model, tok, 4, [EOS], prefix_cache=cache).run(follow, greedy)
    finally:
        hook.remove()
    assert [o.text for o in outs] == [reference(model, tok, p, 12) for p in follow]
    prefilled = sum(rows * width for rows, width in widths if width > 1)
    assert 0 < prefilled <= len(follow) * max(uncached)


class Scripted:
    """A caller's `Demand`: request 4 waits until request 0 has finished, request 5 is never wanted, and every
    triage and finish is logged in order."""

    def __init__(self, hold: bool = True):
        self.hold, self.log = hold, []

    def triage(self, queued):
        self.log.append(("triage", tuple(queued)))
        done = {i for kind, i in self.log if kind == "finished"}
        start = [i for i in queued if i < 4 or (i == 4 and 0 in done)] if self.hold else []
        return start, [i for i in queued if i == 5]

    def finished(self, index, completion):
        self.log.append(("finished", index))


def test_a_demand_holds_requests_back_and_drops_the_unwanted_ones(tiny):
    """Magpie's spare candidates: a request the caller does not want yet waits for running ones to finish, one
    it no longer wants never runs (None in its place), and the others decode as generate does."""
    model, tok = tiny
    prompts = PROMPTS + ["<|im_start|>user\nName a color.<|im_end|>\n"]
    # two rows: request 0 runs 20 steps while 1, 2 and 3 pass through the other row; 4 would be done by step 12
    limits = [20, 3, 3, 3, 3, 9]
    greedy = [Sampling(temperature=0.0, max_tokens=n) for n in limits]
    demand = Scripted()
    outs = ContinuousBatcher(model, tok, 2, [EOS]).run(prompts, greedy, demand)
    assert outs[5] is None
    for i in range(5):
        assert outs[i].text == reference(model, tok, prompts[i], limits[i])
    assert [i for kind, i in demand.log if kind == "finished"] == [1, 2, 3, 0, 4]  # 4 waited for 0
    assert demand.log.index(("triage", (4,))) < demand.log.index(("finished", 0))  # asked while 0 ran
    # a demand that never says start cannot stall the call: with nothing running, the queue runs in order
    stubborn = Scripted(hold=False)
    outs = ContinuousBatcher(model, tok, 2, [EOS]).run(prompts, greedy, stubborn)
    assert outs[5] is None and [o.text for o in outs[:5]] == [
        reference(model, tok, p, n) for p, n in zip(prompts[:5], limits[:5], strict=True)
    ]


def test_a_request_that_keeps_no_kv_leaves_the_prefix_cache_alone(tiny):
    """Sampling.keep_kv=False (Magpie's last turn, which nothing extends): its KV does not enter the cache, where
    it would push out entries later prompts extend."""
    model, tok = tiny
    cache = PrefixCache(2**30)
    samplings = [
        Sampling(temperature=0.0, max_tokens=6, keep_kv=False),
        Sampling(temperature=0.0, max_tokens=6),
    ]
    ContinuousBatcher(model, tok, 4, [EOS], prefix_cache=cache).run(PROMPTS[:2], samplings)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    assert len(cache.entries) == 1
    assert cache.match(ids[1] + [0], len(ids[1]))[0] == len(ids[1])  # kept: the whole prompt
    assert cache.match(ids[0] + [0], len(ids[0]))[0] < len(ids[0])  # not kept: at most a prefix it shares


def test_prefix_cache_evicts_oldest_first_within_its_budget():
    layer = lambda n: [(torch.ones(2, n, 4), torch.ones(2, n, 4))]  # noqa: E731  (2 * 2 * n * 4 floats)
    per_token = 2 * 2 * 4 * 4
    cache = PrefixCache(10 * per_token)
    cache.add((1, 2, 3, 4), layer(4))
    cache.add((1, 2, 5, 6), layer(4))
    assert cache.match([1, 2, 3, 4, 9], 4)[0] == 4 and cache.match([1, 2, 5, 6, 9], 4)[0] == 4
    cache.add((7, 8, 9), layer(3))  # 11 tokens > 10: the oldest entry goes
    assert cache.match([1, 2, 3, 4, 9], 4)[0] == 2  # its own tokens are gone, the prefix it shared is not
    assert cache.match([1, 2, 5, 6], 3)[0] == 3  # at most `most` tokens
    n, past = cache.match([7, 8, 9, 1], 4)
    assert n == 3 and past[0][0].shape == (2, 3, 4)
    cache.add(tuple(range(100, 120)), layer(20))  # larger than the whole budget: not kept, nothing evicted
    assert cache.match([100, 101], 2) == (0, None) and cache.match([7, 8, 9], 3)[0] == 3


@pytest.mark.integration
def test_the_engine_reuses_its_cache_across_calls_in_a_session_with_the_same_text(embedded_path):
    """Magpie on the real model, fp32: instructions, then answers to them, with the engine's prefix cache shared by
    both calls and without a cache; the answers must be the same text. Outside a session a call starts with an
    empty cache, so its text never depends on what ran before."""
    from core.chat import render_prompt
    from core.engines import EngineConfig, prefix_session
    from core.engines.transformers_engine import TransformersEngine
    from data_synth.templates import pre_query

    texts = {}
    for on in (True, False):
        engine = TransformersEngine(
            embedded_path, EngineConfig(batch_size=8, dtype="float32", enable_prefix_caching=on)
        )
        pq = pre_query(engine.tokenizer)
        with prefix_session(engine):
            sampled = engine.complete(
                [pq.prompt_prefix] * 6,
                [Sampling(1.0, 1.0, 24, ("\n",), tuple(pq.stop_token_ids), seed=i) for i in range(6)],
            )
            questions = [c.text.strip() or "Hi." for c in sampled]
            prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}]) for q in questions]
            ids = engine.tokenizer(prompts, add_special_tokens=False)["input_ids"]
            template = len(engine.tokenizer(pq.prompt_prefix, add_special_tokens=False)["input_ids"])
            if on:  # each answer's prompt is cached past the template, through its instruction
                assert all(engine.prefix_cache.match(x, len(x) - 1)[0] > template + 1 for x in ids)
            else:
                assert engine.prefix_cache is None
            answers = engine.complete(prompts, Sampling(0.0, 1.0, 32, (), tuple(pq.stop_token_ids)))
        texts[on] = (questions, [a.text for a in answers])
        if on:
            engine.complete(["Hello there"], Sampling(0.0, 1.0, 4))  # outside the session: a fresh cache
            assert all(engine.prefix_cache.match(x, len(x) - 1)[0] == 0 for x in ids)
    assert texts[True] == texts[False]

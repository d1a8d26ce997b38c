"""Continuous batching (core/engines/continuous.py) on a tiny random-weight Llama: it must decode exactly what
`model.generate` decodes, whatever the batch size, and keep every request's own settings and seed."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.engines import Sampling
from core.engines.continuous import ContinuousBatcher, _length_groups, _Row, _top_p

EOS = 2


@pytest.fixture(scope="module")
def tiny(embedded_path):
    tok = AutoTokenizer.from_pretrained(embedded_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS,
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

"""CPU kernels (core/engines/cpu_kernels.py). Linear layers prepacked for oneDNN: every Linear is replaced, and
the model computes what it computed before, on a tiny Llama and on the real embedded SmolLM2 through the engine.
The compiled decode attention: equal to sdpa on the continuous batcher's shapes (views of a longer cache, rows
with their own spans, grouped kv heads), never reading a masked column, and the engine decodes the same text with
it or without; where it cannot be built, the engine says so and runs sdpa."""

import copy
import functools
import os
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.engines import EngineConfig, Sampling, cpu_kernels
from core.engines.cpu_kernels import PackedLinear, decode_kernel, pack_linears, supported
from core.engines.transformers_engine import TransformersEngine, inference_dtype

pytestmark = pytest.mark.skipif(not supported(torch.float32), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_compute_what_plain_ones_do(dtype):
    if not supported(dtype):
        pytest.skip(f"this CPU has no oneDNN {dtype} matmul")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(dtype)
    packed = copy.deepcopy(model)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(packed) == linears == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert packed.get_output_embeddings().weight.shape == (1000, 64)  # shape still readable
    ids = torch.randint(0, 1000, (3, 17))
    with torch.inference_mode():
        hidden, ours = model.model(ids).last_hidden_state, packed.model(ids).last_hidden_state
        # the head runs in float32 whatever the model's dtype (bfloat16 logits are too coarse to sample from)
        want = torch.nn.functional.linear(hidden.float(), model.lm_head.weight.float())
        got = packed(ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(ours, hidden) if dtype == torch.bfloat16 else torch.allclose(ours, hidden, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-4)


def test_the_engine_decodes_the_same_text_packed_or_plain(embedded_engine, embedded_path):
    assert any(isinstance(m, PackedLinear) for m in embedded_engine.model.modules())  # on by default on CPU
    plain = TransformersEngine(embedded_path, EngineConfig(batch_size=8, pack_linear=False))
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    tok = plain.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.")
    ]
    sampling = Sampling(temperature=0.0, max_tokens=24)
    assert [c.text for c in embedded_engine.complete(prompts, sampling)] == [
        c.text for c in plain.complete(prompts, sampling)
    ]


def test_auto_dtype_is_bfloat16_on_a_cpu_with_onednn_bfloat16(embedded_engine):
    expected = torch.bfloat16 if supported(torch.bfloat16) else torch.float32
    assert inference_dtype("cpu") == expected
    assert embedded_engine.model.model.embed_tokens.weight.dtype == expected  # engine.dtype=auto, the default


def _decode_case(dtype, heads, kv_heads, rows=5, capacity=40, span=23, head_dim=16):
    """A decoding step as the batcher makes it: q [rows, heads, 1, d]; keys and values the columns [lo, t] of
    a longer cache; each row attends to its own columns (starts differ, one row has a hole)."""
    g = torch.Generator().manual_seed(0)
    cache_k = torch.randn(rows, kv_heads, capacity, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(rows, kv_heads, capacity, head_dim, generator=g).to(dtype)
    q = torch.randn(rows, heads, 1, head_dim, generator=g).to(dtype)
    lo, t = 9, 9 + span
    mask = torch.zeros(rows, capacity, dtype=torch.bool)
    for r in range(rows):
        mask[r, lo + 3 * r : t] = True
    mask[1, lo + 5 : lo + 8] = False
    return q, cache_k, cache_v, mask, lo, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4)])
def test_the_decode_kernel_computes_what_sdpa_does(dtype, heads, kv_heads):
    kernel = decode_kernel()
    assert kernel is not None, "the kernel should build on the machines the tests run on (g++, OpenMP, ninja)"
    q, cache_k, cache_v, mask, lo, t = _decode_case(dtype, heads, kv_heads)
    k, v, m = cache_k[:, :, lo:t], cache_v[:, :, lo:t], mask[:, lo:t]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=m[:, None, None], scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    # masked columns are never read: poison them, and the result is unchanged
    poisoned_k, poisoned_v = cache_k.clone(), cache_v.clone()
    poisoned_k[:, :, lo:t][~m[:, None, :, None].expand_as(k)] = float("nan")
    poisoned_v[:, :, lo:t][~m[:, None, :, None].expand_as(v)] = float("nan")
    got = kernel.decode_attention(q, poisoned_k[:, :, lo:t], poisoned_v[:, :, lo:t], m, 0.3)
    assert got.shape == (q.shape[0], 1, heads, q.shape[-1]) and got.dtype == dtype
    assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_the_engine_decodes_the_same_text_with_the_kernel_or_sdpa(
    embedded_engine, embedded_path, monkeypatch
):
    assert embedded_engine.model.config._attn_implementation == "harness_cpu_decode"  # on by default on CPU
    calls = []
    kernel = decode_kernel()

    class Counting:  # a spy: the real kernel, counted
        def decode_attention(self, *args):
            calls.append(args[0].shape)
            return kernel.decode_attention(*args)

    monkeypatch.setattr(cpu_kernels, "decode_kernel", lambda: Counting())
    # float32: bfloat16's rounding differs between any two attention kernels and can flip a near-tie of greedy
    ours = TransformersEngine(embedded_path, EngineConfig(batch_size=8, dtype="float32"))
    plain = TransformersEngine(
        embedded_path, EngineConfig(batch_size=8, dtype="float32", decode_kernel=False)
    )
    assert plain.model.config._attn_implementation == "sdpa"
    tok = plain.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Give me a word that rhymes with cat.", "What is 2 + 2?", "Name a large mammal.")
    ]
    sampling = Sampling(temperature=0.0, max_tokens=24)
    texts = [c.text for c in ours.complete(prompts, sampling)]
    layers = ours.model.config.num_hidden_layers
    assert len(calls) >= 10 * layers  # every decoding step
    assert all(shape[2] == 1 for shape in calls)  # never prefill
    assert texts == [c.text for c in plain.complete(prompts, sampling)]


def test_an_engine_without_a_compiler_says_so_and_runs_sdpa(embedded_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels, "_machine_tag", lambda: "test")
    monkeypatch.setattr(cpu_kernels, "decode_kernel", functools.cache(cpu_kernels.decode_kernel.__wrapped__))
    build = tmp_path / "harness" / "harness_decode_attention_test"
    build.mkdir(parents=True)
    (build / "lock").touch()  # left by a build killed long ago: removed, not waited on forever
    os.utime(build / "lock", (time.time() - 3600, time.time() - 3600))
    engine = TransformersEngine(embedded_path, EngineConfig(batch_size=4))
    err = capsys.readouterr().err
    assert "decode attention kernel could not be built" in err and "decoding uses sdpa" in err
    assert not (build / "lock").exists()
    assert engine.model.config._attn_implementation == "sdpa"
    out = engine.complete(["The capital of France is"], Sampling(temperature=0.0, max_tokens=5))
    assert out[0].n_tokens > 0

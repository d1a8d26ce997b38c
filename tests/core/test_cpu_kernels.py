"""Linear layers prepacked for oneDNN (core/engines/cpu_kernels.py): every Linear is replaced, and the model
computes what it computed before, on a tiny Llama and on the real embedded SmolLM2 through the engine."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.engines import EngineConfig, Sampling
from core.engines.cpu_kernels import PackedLinear, pack_linears, supported
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

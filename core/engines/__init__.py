"""Inference engines: one small interface over raw-text prompts.

`engine.complete(prompts, sampling) -> list[Completion]`. Prompts are raw text that already carries every
special token it needs (Magpie renders templates itself), so no engine adds a BOS of its own.
Synthesis, tagging judges and evaluation judges all go through here.

    base.py                the interface, EngineConfig and the helpers every backend shares
    transformers_engine.py a local model with continuous batching (continuous.py)
    openai_engine.py       OpenAI-compatible servers, hosted or local
    vllm_engine.py         offline vLLM (GPU)
"""

from __future__ import annotations

from core.engines.base import (
    CONTEXT_FULL,
    Completion,
    Demand,
    Engine,
    EngineConfig,
    Sampling,
    free_memory,
    load_tokenizer,
    prefix_session,
    prompt_seed,
    request_seed,
    truncate_at_stop,
    within_context,
)
from core.engines.openai_engine import OpenAIEngine, Refused, token_limit_field
from core.engines.transformers_engine import TransformersEngine
from core.engines.vllm_engine import VLLMEngine, completion_from_vllm, vllm_sampling_kwargs
from core.errors import EngineError
from core.models import resolve_model

__all__ = [
    "CONTEXT_FULL",
    "Completion",
    "Demand",
    "Engine",
    "EngineConfig",
    "EngineError",
    "OpenAIEngine",
    "Refused",
    "Sampling",
    "TransformersEngine",
    "VLLMEngine",
    "completion_from_vllm",
    "free_memory",
    "load_tokenizer",
    "make_engine",
    "prefix_session",
    "prompt_seed",
    "request_seed",
    "token_limit_field",
    "truncate_at_stop",
    "vllm_sampling_kwargs",
    "within_context",
]


def make_engine(model: str, cfg: EngineConfig) -> Engine:
    """`model` is a local path, a Hub id, `embedded`, or (openai backend) the server's model name."""
    if cfg.backend == "openai":
        return OpenAIEngine(model, cfg)
    path = resolve_model(model)
    if cfg.backend == "vllm":
        return VLLMEngine(path, cfg)
    return TransformersEngine(path, cfg)

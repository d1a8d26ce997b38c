"""Offline vLLM (an optional extra, imported lazily)."""

from __future__ import annotations

from typing import Any

from core.engines.base import Completion, Demand, EngineConfig, Sampling, _as_list, within_context
from core.errors import EngineError


def vllm_sampling_kwargs(s: Sampling) -> dict[str, Any]:
    """`Sampling` -> the keyword arguments of `vllm.SamplingParams` (a pure function, tested without vLLM)."""
    return {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "stop": list(s.stop) or None,
        "stop_token_ids": list(s.stop_token_ids) or None,
        "repetition_penalty": s.repetition_penalty,
        "seed": s.seed,  # vLLM seeds each request on its own
        "logprobs": s.logprobs,
        "skip_special_tokens": False,  # as the other engines decode
    }


def completion_from_vllm(output: Any, s: Sampling) -> Completion:
    """A `vllm.RequestOutput` -> `Completion`: its first `CompletionOutput`'s text, token count, finish reason
    ("stop" for an end token or stop string, "length" for max_tokens) and the first token's top logprobs
    (`{token_id: Logprob(logprob, rank, decoded_token)}`)."""
    o = output.outputs[0]
    top = None
    if s.logprobs is not None and o.logprobs:
        top = {
            lp.decoded_token: lp.logprob for lp in sorted(o.logprobs[0].values(), key=lambda lp: -lp.logprob)
        }
    return Completion(o.text, len(o.token_ids), "stop" if o.finish_reason == "stop" else "length", top)


class VLLMEngine:
    """Offline `vllm.LLM` (tensor parallel, prefix caching). Imported lazily: vLLM is an optional extra.

    Every prompt of a call goes to `LLM.generate` at once; vLLM schedules them itself."""

    def __init__(self, model_path: str, cfg: EngineConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineError(
                "engine.backend=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine"
            ) from e
        self.model_name = str(model_path)
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype="bfloat16" if cfg.dtype == "auto" else cfg.dtype,
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            trust_remote_code=cfg.trust_remote_code,
            **({"speculative_config": cfg.speculative_config} if cfg.speculative_config else {}),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = cfg.max_model_len

    def close(self) -> None:
        """vLLM keeps GPU memory (and, with tensor parallelism, worker processes) until its engine is shut down."""
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        try:  # the process group vLLM made for tensor parallelism, so the next LLM can make its own
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except ImportError:
            pass

    def complete(
        self, prompts: list[str], sampling: Sampling | list[Sampling], demand: Demand | None = None
    ) -> list[Completion]:
        """Every request runs: vLLM schedules a call's requests itself (`demand` is for engines that do not)."""
        from vllm import SamplingParams

        samplings = _as_list(sampling, len(prompts))
        params = [SamplingParams(**vllm_sampling_kwargs(s)) for s in samplings]
        # Token ids, not text: vLLM would otherwise add a second BOS to prompts that carry one.
        inputs = [{"prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts]

        def run(keep: list[int]) -> list[Completion]:
            outs = self.llm.generate([inputs[i] for i in keep], [params[i] for i in keep], use_tqdm=True)
            return [completion_from_vllm(out, samplings[i]) for out, i in zip(outs, keep, strict=True)]

        # what vLLM settled on (max_model_len: null means the model's own), else what was asked
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        limit = getattr(config, "max_model_len", None) or self.max_model_len
        return within_context([len(x["prompt_token_ids"]) for x in inputs], limit, run)

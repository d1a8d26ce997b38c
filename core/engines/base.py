"""The engine interface: sampling settings, completions, engine settings, and the helpers every backend shares
(per-request seeds, stop strings, the context limit)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from core.errors import EngineError
from core.models import resolve_model


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # top-k logprobs of the first generated token (judges need them)
    # transformers engine: keep this request's KV (prompt and reply) in the prefix cache for later prompts that
    # extend it. False for a reply nothing extends (Magpie's last turn), so it does not push out what will be.
    keep_kv: bool = True


@dataclass
class Completion:
    text: str
    n_tokens: int
    # "stop" (end marker or stop string), "length" (max_tokens), or "context": the prompt alone fills the model's
    # context (vLLM's max_model_len, a model's max_position_embeddings), so nothing was generated. The engine
    # answers that per prompt instead of failing the call: vLLM refuses a whole call for one long prompt.
    finish_reason: str
    top_logprobs: dict[str, float] | None = None  # first generated token: token text -> logprob


class Demand(Protocol):
    """Which requests of one `complete()` call are still wanted, for callers that send spares (Magpie draws
    instruction candidates with a margin for the ones it will drop). An engine that supports it (transformers)
    asks before starting queued requests and leaves `None` in place of each request it never started; the others
    run every request, and the caller must come to the same result either way."""

    def triage(self, queued: list[int]) -> tuple[list[int], list[int]]:
        """Of the queued requests (indices into the call's prompts, in order): those to start now, and those no
        longer wanted (never to run). The rest wait for requests now running to finish."""
        ...

    def finished(self, index: int, completion: Completion) -> None: ...


class Engine(Protocol):
    model_name: str
    tokenizer: Any  # the model's tokenizer, for rendering chat prompts

    def complete(
        self, prompts: list[str], sampling: Sampling | list[Sampling], demand: Demand | None = None
    ) -> list[Completion | None]: ...

    def close(self) -> None:
        """Drop the model (on a GPU: its weights and KV cache), so the next one can load beside it."""


def prefix_session(engine: Engine) -> contextlib.AbstractContextManager:
    """A block whose calls share the engine's prefix cache (a Magpie chunk: its response prompts extend its
    instruction prompts). Outside such a block every call starts with an empty cache, so what a call decodes never
    depends on what earlier calls left behind (a resumed run starts at a chunk boundary with nothing cached, as
    the uninterrupted run did). Engines without a cache of their own (servers, vLLM): nothing."""
    session = getattr(engine, "prefix_session", None)
    return session() if session is not None else contextlib.nullcontext()


def free_memory() -> None:
    """Collect what closed engines left behind and hand the GPU's cached blocks back to the driver."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class EngineConfig:
    """How to run a model; one group in every recipe that generates text."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    # renders chat prompts; defaults to the model (set it when a server's name differs)
    tokenizer: str | None = None
    # transformers
    batch_size: int = 16  # rows decoding at once (continuous batching); callers never cut work to this size
    # "auto" = bfloat16 on a GPU and on a CPU with oneDNN bfloat16 (AVX512-BF16/AMX), else float32
    # (transformers_engine.inference_dtype); "int8" = every Linear layer dynamically quantized to int8 (CPU
    # only; 1.35x float32 here but its text is much worse: see the README's throughput table)
    dtype: str = "auto"
    device: str | None = None
    # CPU: run every float32/bfloat16 Linear layer on weights prepacked for oneDNN (cpu_kernels.py), 1.3-4x
    # faster per layer with the same outputs to float rounding; false: PyTorch's plain Linear
    pack_linear: bool = True
    # CPU: decoding attention through a kernel compiled once per machine (cpu_kernels.py; needs a C++ compiler,
    # else sdpa with a one-line notice), 2.2x faster per layer call than sdpa, same outputs to float rounding
    decode_kernel: bool = True
    # KV of finished requests kept for later prompts that extend them (Magpie's response prompt extends its
    # instruction's), up to this many GB (continuous.PrefixCache); 0 or enable_prefix_caching=false: none
    prefix_cache_gb: float = 1.0
    # openai-compatible servers (vllm serve, SGLang, llama.cpp server, TGI)
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str | None = None  # name of the environment variable that holds the key; never the key
    # /chat/completions with messages instead of /completions with rendered text: hosted chat-only models
    # (gpt-4-1106-preview as AlpacaEval/Arena-Hard judge). Only callers that pass messages may use it.
    chat: bool = False
    concurrency: int = 8  # requests in flight per server
    timeout: float = 600.0
    # with backoff 0.5, 1, 2, ... 16 s (or what Retry-After asks): about 30 s for a server
    max_retries: int = 6
    # The request field for the reply's length. OpenAI's API takes max_completion_tokens (its reasoning models
    # refuse max_tokens); vLLM, SGLang and llama.cpp servers take max_tokens. auto: the former for api.openai.com.
    token_limit: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    # vLLM extension: prompts already carry their BOS, so the server must not add one.
    extra_body: dict = field(default_factory=lambda: {"add_special_tokens": False})
    # vllm
    tensor_parallel_size: int = 1
    max_model_len: int | None = 4096
    enable_prefix_caching: bool = True  # vllm and transformers
    gpu_memory_utilization: float = 0.9
    # vLLM's speculative decoding, passed through as its `speculative_config`: n-gram prompt lookup
    # {method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4} or a draft model sharing the tokenizer
    # {model: meta-llama/Meta-Llama-3-8B-Instruct, num_speculative_tokens: 5}. null: plain decoding.
    speculative_config: dict | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # Never echo the value: a common slip is passing the key itself ($OPENAI_API_KEY).
            raise ValueError(
                "engine.api_key_env must be the NAME of an environment variable (letters, digits, _), such as "
                "OPENAI_API_KEY, not the key itself; the value given is not shown"
            )
        if self.speculative_config is not None:
            spec = self.speculative_config
            if not ("method" in spec or "model" in spec):
                raise ValueError(
                    f"engine.speculative_config: {spec} names neither a `method` (ngram, eagle, ...) nor a draft "
                    "`model`; see vLLM's SpeculativeConfig"
                )
            n = spec.get("num_speculative_tokens")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(
                    f"engine.speculative_config.num_speculative_tokens: expected an integer >= 1, got {n!r}"
                )
            if self.backend != "vllm":
                raise ValueError(
                    f"engine.speculative_config is vLLM's setting; backend={self.backend} does not use it (for "
                    "`vllm serve`, pass --speculative-config to the server)"
                )
        if self.backend == "openai" and not self.base_urls:
            raise ValueError("engine.base_urls is empty: the openai backend needs at least one server URL")


def load_tokenizer(model: str, cfg: EngineConfig) -> Any:
    """The tokenizer that renders `model`'s chat prompts: `engine.tokenizer` if set, else the model's own."""
    from transformers import AutoTokenizer

    name = resolve_model(cfg.tokenizer or model)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (
        OSError,
        ValueError,
    ) as e:  # a missing path reads as a bad Hub id ("Repo id must be in the form ...")
        where = "no such local directory, and" if not Path(name).exists() else "a local path, but"
        raise EngineError(
            f"model '{name}': {where} its tokenizer could not be loaded ({str(e).strip().splitlines()[0][:160]})"
        ) from None


def request_seed(*parts: int | str) -> int:
    """A request's own seed, derived from (run seed, stage, row, turn, attempt, ...).

    Serving engines (vLLM, SGLang, `vllm serve`) seed every request on its own, so two requests with the same
    prompt, settings and seed return the same text: a seed shared by a chunk of identical Magpie prompts would
    repeat one instruction. Deriving each seed from the request's identity instead gives distinct samples, the
    same rows for the same command whatever the engine, the batching or the number of servers, and the same
    sequence after a resume. 31 bits, the range every engine accepts (llama.cpp's server takes a uint32).
    """
    blob = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") & 0x7FFFFFFF


def prompt_seed(prompt: str | list[dict[str, str]], *parts: int | str) -> int:
    """A seed named by a prompt's content and `parts` (the attempt): for judges, whose requests have no row."""
    digest = hashlib.sha256(json.dumps(prompt, ensure_ascii=False).encode()).hexdigest()
    return request_seed(digest, *parts)


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """Cut `text` at its earliest stop string (which is not kept)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _as_list(sampling: Sampling | list[Sampling], n: int) -> list[Sampling]:
    if isinstance(sampling, Sampling):
        return [sampling] * n
    if len(sampling) != n:
        raise ValueError(f"got {n} prompts but {len(sampling)} sampling settings")
    return list(sampling)


# --------------------------------------------------------------------------------------------- transformers


CONTEXT_FULL = "context"


def within_context(token_counts: list[int], limit: int | None, run: Any) -> list[Completion]:
    """`run(indices)` on the prompts whose token count leaves room to generate under `limit`; the others get an
    empty completion whose finish_reason is "context" (callers drop or report them, never keep them as replies)."""
    fits = [i for i, n in enumerate(token_counts) if limit is None or n < limit]
    out: list[Completion] = [Completion("", 0, CONTEXT_FULL) for _ in token_counts]
    for i, c in zip(fits, run(fits) if fits else [], strict=True):
        out[i] = c
    return out


def _ids(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return [x] if isinstance(x, int) else list(x)

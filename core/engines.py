"""Inference engines: one small interface over raw-text prompts.

`engine.complete(prompts, sampling) -> list[Completion]`. Prompts are raw text that already carries every
special token it needs (Magpie renders templates itself), so no engine adds a BOS of its own.
Synthesis, tagging judges and evaluation judges all go through here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import itertools
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from core.errors import OutageError
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


@dataclass
class Completion:
    text: str
    n_tokens: int
    # "stop" (end marker or stop string), "length" (max_tokens), or "context": the prompt alone fills the model's
    # context (vLLM's max_model_len, a model's max_position_embeddings), so nothing was generated. The engine
    # answers that per prompt instead of failing the call: vLLM refuses a whole call for one long prompt.
    finish_reason: str
    top_logprobs: dict[str, float] | None = None  # first generated token: token text -> logprob


class Engine(Protocol):
    model_name: str
    tokenizer: Any  # the model's tokenizer, for rendering chat prompts

    def complete(self, prompts: list[str], sampling: Sampling | list[Sampling]) -> list[Completion]: ...

    def close(self) -> None:
        """Drop the model (on a GPU: its weights and KV cache), so the next one can load beside it."""


def free_memory() -> None:
    """Collect what closed engines left behind and hand the GPU's cached blocks back to the driver."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Refused(OutageError):
    """A request refused for who or what it asks (HTTP 401, 403, 404: a wrong key or model name), not for its
    content: when every request of a call is refused, the call is an `EngineError`."""


class EngineError(RuntimeError):
    """An engine that cannot start (a missing model, an unset API key variable, no server URL): a user error.
    A request that fails once the engine runs is an `OutageError` instead."""


@dataclass
class EngineConfig:
    """How to run a model; one group in every recipe that generates text."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    tokenizer: str | None = (
        None  # renders chat prompts; defaults to the model (set it when a server's name differs)
    )
    # transformers
    batch_size: int = 16  # rows decoding at once (continuous batching); callers never cut work to this size
    # "auto" = float32 on CPU, bfloat16 on GPU; "int8" = float32 with every Linear layer dynamically quantized
    # to int8 (CPU only: 2-3x faster decoding here, at a small cost in fidelity)
    dtype: str = "auto"
    device: str | None = None
    # openai-compatible servers (vllm serve, SGLang, llama.cpp server, TGI)
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str | None = None  # name of the environment variable that holds the key; never the key
    # /chat/completions with messages instead of /completions with rendered text: hosted chat-only models
    # (gpt-4-1106-preview as AlpacaEval/Arena-Hard judge). Only callers that pass messages may use it.
    chat: bool = False
    concurrency: int = 8  # requests in flight per server
    timeout: float = 600.0
    max_retries: int = (
        6  # with backoff 0.5, 1, 2, ... 16 s (or what Retry-After asks): about 30 s for a server
    )
    # The request field for the reply's length. OpenAI's API takes max_completion_tokens (its reasoning models
    # refuse max_tokens); vLLM, SGLang and llama.cpp servers take max_tokens. auto: the former for api.openai.com.
    token_limit: Literal["auto", "max_tokens", "max_completion_tokens"] = "auto"
    # vLLM extension: prompts already carry their BOS, so the server must not add one.
    extra_body: dict = field(default_factory=lambda: {"add_special_tokens": False})
    # vllm
    tensor_parallel_size: int = 1
    max_model_len: int | None = 4096
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # Never echo the value: a common slip is passing the key itself ($OPENAI_API_KEY).
            raise ValueError(
                "engine.api_key_env must be the NAME of an environment variable (letters, digits, _), such as "
                "OPENAI_API_KEY, not the key itself; the value given is not shown"
            )
        if self.backend == "openai" and not self.base_urls:
            raise ValueError("engine.base_urls is empty: the openai backend needs at least one server URL")


def make_engine(model: str, cfg: EngineConfig) -> Engine:
    """`model` is a local path, a Hub id, `embedded`, or (openai backend) the server's model name."""
    if cfg.backend == "openai":
        return OpenAIEngine(model, cfg)
    path = resolve_model(model)
    if cfg.backend == "vllm":
        return VLLMEngine(path, cfg)
    return TransformersEngine(path, cfg)


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


class TransformersEngine:
    """Continuous batching over a transformers model (`core/continuous.py`): up to `batch_size` rows decode at
    once, a finished row is refilled from the queue at once, and every request keeps its own sampling settings
    and seed, as on vLLM. Callers hand over all their prompts; the engine does its own batching."""

    def __init__(self, model_path: str, cfg: EngineConfig | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        cfg = cfg or EngineConfig()
        self.cfg = cfg
        self.model_name = str(model_path)
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.dtype == "int8" and self.device != "cpu":
            raise EngineError(
                "engine.dtype=int8 is dynamic int8 quantization for CPUs; on a GPU use bfloat16"
            )
        if cfg.dtype in ("auto", "int8"):
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        self.tokenizer = load_tokenizer(model_path, cfg)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # sdpa takes the 4D per-row masks continuous batching needs (flash-attention kernels do not).
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=cfg.trust_remote_code
        ).to(self.device)
        self.model.eval()
        if cfg.dtype == "int8":
            from torch.ao.quantization import quantize_dynamic

            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        # the tokenizer's eos and every eos the model's generation_config lists (<|eot_id|> for Llama-3-Instruct
        # and for models this harness trains on a chat template)
        generation_eos = _ids(getattr(self.model.generation_config, "eos_token_id", None))
        self.eos_ids = list(dict.fromkeys(_ids(self.tokenizer.eos_token_id) + generation_eos))

    def close(self) -> None:
        self.model = None

    def complete(self, prompts: list[str], sampling: Sampling | list[Sampling]) -> list[Completion]:
        from tqdm.auto import tqdm

        from core.continuous import ContinuousBatcher

        samplings = _as_list(sampling, len(prompts))
        if not prompts:
            return []
        # A bar of its own for calls longer than one batch (805 AlpacaEval answers arrive as one call).
        with tqdm(total=len(prompts), desc="generate", unit="req", leave=False,
                  disable=len(prompts) <= self.cfg.batch_size) as bar:  # fmt: skip
            batcher = ContinuousBatcher(self.model, self.tokenizer, self.cfg.batch_size, self.eos_ids, bar)
            counts = [len(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
            limit = getattr(self.model.config, "max_position_embeddings", None)
            return within_context(
                counts,
                limit,
                lambda keep: batcher.run([prompts[i] for i in keep], [samplings[i] for i in keep]),
            )


CONTEXT_FULL = "context"


def within_context(token_counts: list[int], limit: int | None, run: Any) -> list[Completion]:
    """`run(indices)` on the prompts whose token count leaves room to generate under `limit`; the others get an
    empty completion whose finish_reason is "context" (callers drop or report them, never keep them as replies)."""
    fits = [i for i, n in enumerate(token_counts) if limit is None or n < limit]
    out: list[Completion] = [Completion("", 0, CONTEXT_FULL) for _ in token_counts]
    for i, c in zip(fits, run(fits) if fits else [], strict=True):
        out[i] = c
    return out


def _retry_after(error: Exception) -> float:
    """Seconds a 429 or 503 asks the client to wait (Retry-After, or OpenAI's retry-after-ms), at most a minute;
    else 0 (the backoff decides)."""
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    try:
        if "retry-after-ms" in headers:
            return min(60.0, float(headers["retry-after-ms"]) / 1000)
        return min(60.0, float(headers.get("retry-after", 0)))
    except ValueError:  # an HTTP date instead of seconds: fall back to the backoff
        return 0.0


def _ids(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return [x] if isinstance(x, int) else list(x)


# --------------------------------------------------------------------------------------------------- openai


class OpenAIEngine:
    """Client of any OpenAI-compatible `/v1/completions` server; many servers at once for scale.

    Requests are spread round-robin over `base_urls`; a failed request is retried with exponential
    backoff on the next server, so one dead server slows a run down but loses nothing.
    """

    def __init__(self, model: str, cfg: EngineConfig):
        import httpx

        if not cfg.base_urls:
            raise EngineError("engine.base_urls is empty: the openai backend needs at least one server URL")
        self.model_name = model
        self.cfg = cfg
        self.urls = [
            u.rstrip("/") if u.rstrip("/").endswith("/v1") else u.rstrip("/") + "/v1" for u in cfg.base_urls
        ]
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise EngineError(f"environment variable {cfg.api_key_env} (engine.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=cfg.concurrency * len(self.urls))
        self.client = httpx.Client(headers=headers, timeout=cfg.timeout, limits=limits)
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    @functools.cached_property
    def tokenizer(self):
        """Only for rendering chat prompts client-side; the server tokenizes itself."""
        return load_tokenizer(self.model_name, self.cfg)

    def complete(self, prompts: list, sampling: Sampling | list[Sampling]) -> list[Completion]:
        """Rendered prompts, or chat messages when `engine.chat` is set. When requests fail (after their retries),
        OutageError, carrying the completions that did come back so a caller can keep them."""
        samplings = _as_list(sampling, len(prompts))
        workers = max(1, min(len(prompts), self.cfg.concurrency * len(self.urls)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._one, p, s) for p, s in zip(prompts, samplings, strict=True)]
        done: list[Completion | None] = []
        errors: list[OutageError] = []
        for future in futures:
            try:
                done.append(future.result())
            except OutageError as e:
                done.append(None)
                errors.append(e)
        if errors and not any(done) and all(isinstance(e, Refused) for e in errors):
            # Every request refused for who or what is asked (a wrong key or model name): the user's to fix
            raise EngineError(f"the server refuses these requests: {errors[0]}")
        if errors:
            raise OutageError(
                f"{len(errors)} of {len(prompts)} requests failed; the first: {errors[0]}", done
            )
        return done  # type: ignore[return-value]

    def _body(self, prompt: str | list[dict[str, str]], s: Sampling) -> dict:
        if self.cfg.chat != isinstance(prompt, list):
            raise EngineError(
                "engine.chat=true needs chat messages and engine.chat=false rendered text; "
                f"this caller passed {'messages' if isinstance(prompt, list) else 'text'}"
            )
        body = {
            "model": self.model_name,
            token_limit_field(self.cfg): s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            **self.cfg.extra_body,
        }
        body["messages" if self.cfg.chat else "prompt"] = prompt
        if s.stop:
            body["stop"] = list(s.stop)
        if s.stop_token_ids:
            body["stop_token_ids"] = list(s.stop_token_ids)  # vLLM/SGLang extension
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty  # vLLM/SGLang/llama.cpp extension
        if s.seed is not None:
            body["seed"] = s.seed
        if s.logprobs is not None and self.cfg.chat:
            body.update(logprobs=True, top_logprobs=s.logprobs)
        elif s.logprobs is not None:
            body["logprobs"] = s.logprobs
        return body

    def _one(self, prompt: str, s: Sampling) -> Completion:
        import httpx

        with self._lock:
            first = next(self._counter)
        body = self._body(prompt, s)
        errors = []
        for attempt in range(self.cfg.max_retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                r = self.client.post(
                    f"{url}/{'chat/completions' if self.cfg.chat else 'completions'}", json=body
                )
                if r.status_code == 429 or r.status_code >= 500:
                    raise httpx.HTTPStatusError(
                        f"HTTP {r.status_code}: {r.text[:200]}", request=r.request, response=r
                    )
                if r.status_code >= 400:  # a wrong key, model name or request: retrying will not help
                    error = Refused if r.status_code in (401, 403, 404) else OutageError
                    raise error(
                        f"{url}/completions rejected the request: HTTP {r.status_code}: {r.text[:500]}"
                    )
                return self._parse(r.json(), s, self.cfg.chat)
            except (httpx.TransportError, httpx.HTTPStatusError, ValueError, KeyError) as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                if attempt < self.cfg.max_retries:
                    time.sleep(max(_retry_after(e), min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())))
        raise OutageError(
            f"completion failed after {self.cfg.max_retries + 1} attempts; last error {errors[-1]}"
            + (
                f" (servers tried: {', '.join(sorted(set(e.split(': ')[0] for e in errors)))})"
                if errors
                else ""
            )
        )

    @staticmethod
    def _parse(data: dict, s: Sampling, chat: bool = False) -> Completion:
        choice = data["choices"][0]
        # A hosted chat model that refuses answers `content: null` and its refusal beside it: that is its reply
        raw = (
            (choice["message"]["content"] or choice["message"].get("refusal") or "")
            if chat
            else choice["text"]
        )
        text, hit = truncate_at_stop(raw, s.stop)
        top = None
        lp = choice.get("logprobs") or {}
        if s.logprobs is not None and chat and lp.get("content"):
            top = {t["token"]: t["logprob"] for t in lp["content"][0]["top_logprobs"]}
        elif s.logprobs is not None and lp.get("top_logprobs"):
            top = dict(sorted(lp["top_logprobs"][0].items(), key=lambda kv: -kv[1]))
        n_tokens = (data.get("usage") or {}).get("completion_tokens", 0)
        reason = "stop" if hit or choice.get("finish_reason") == "stop" else "length"
        return Completion(text, n_tokens, reason, top)


# ----------------------------------------------------------------------------------------------------- vllm


def token_limit_field(cfg: EngineConfig) -> str:
    """The request field that carries max_tokens for this server (`EngineConfig.token_limit`)."""
    if cfg.token_limit != "auto":
        return cfg.token_limit
    hosted = any("api.openai.com" in url for url in cfg.base_urls)
    return "max_completion_tokens" if hosted else "max_tokens"


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

    def complete(self, prompts: list[str], sampling: Sampling | list[Sampling]) -> list[Completion]:
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

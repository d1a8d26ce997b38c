"""Client of OpenAI-compatible servers (vllm serve, SGLang, llama.cpp, TGI, hosted APIs)."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import random
import threading
import time

from core.engines.base import (
    Completion,
    Demand,
    EngineConfig,
    Sampling,
    _as_list,
    load_tokenizer,
    truncate_at_stop,
)
from core.errors import EngineError, OutageError


class Refused(OutageError):
    """A request refused for who or what it asks (HTTP 401, 403, 404: a wrong key or model name), not for its
    content: when every request of a call is refused, the call is an `EngineError`."""


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

    def complete(
        self, prompts: list, sampling: Sampling | list[Sampling], demand: Demand | None = None
    ) -> list[Completion]:
        """Rendered prompts, or chat messages when `engine.chat` is set. When requests fail (after their retries),
        OutageError, carrying the completions that did come back so a caller can keep them. Every request is
        sent (`demand` is not used: the server schedules them)."""
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


def token_limit_field(cfg: EngineConfig) -> str:
    """The request field that carries max_tokens for this server (`EngineConfig.token_limit`)."""
    if cfg.token_limit != "auto":
        return cfg.token_limit
    hosted = any("api.openai.com" in url for url in cfg.base_urls)
    return "max_completion_tokens" if hosted else "max_tokens"

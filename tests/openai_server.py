"""A small, real OpenAI-compatible `/v1/completions` and `/v1/chat/completions` server for tests, answering with the transformers engine.

    python tests/openai_server.py --model PATH --port 8011 [--api-key-env VAR] [--table replies.json]

It speaks the subset the harness uses (prompt, max_tokens, temperature, top_p, stop, seed, logprobs) and
returns the OpenAI response shape, so the `openai` engine is tested over real HTTP, not against a mock.
With `--table` (a JSON list of [substring or list of substrings, reply] pairs) it loads no weights and answers
each prompt with the reply of the first entry whose substrings the prompt all contains (else ""), cut at the first
stop string as vLLM cuts it: a judge that really returns valid JSON, for testing what the harness does with good
labels. A reply may also be `{"text": ..., "top_logprobs": {token: logprob}}` (a first-token distribution),
`{"cycle": [text, ...]}` (the n-th request of a prompt gets the n-th text: a sampler that gives each sample of one
prompt another text), `{"status": 500}` (that HTTP error, as an overloaded or broken server answers: an outage,
not a reply; with `"times": N` only the first N requests of the prompt, then `"then"`'s reply; with
`"retry_after": S` a Retry-After header, as a rate limit answers 429) or `{"refusal": text}` (a hosted chat model's
refusal: `content: null` and the refusal beside it). Like OpenAI's API it takes max_completion_tokens for
max_tokens, and refuses max_tokens in a chat request for a reasoning model (a name starting o1..o9 or gpt-5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from core.chat import render_prompt
from core.engines import Completion, EngineConfig, Sampling, TransformersEngine, load_tokenizer


def _matches(keys: str | list[str], prompt: str) -> bool:
    return all(k in prompt for k in ([keys] if isinstance(keys, str) else keys))


class TableEngine:
    """Replies looked up in a fixed table; stop strings cut the reply (the stop itself is not returned)."""

    def __init__(self, table: list[list[str]]):
        self.table = table
        self.asked: dict[str, int] = {}  # requests per prompt so far, for `cycle` replies

    def complete(self, prompts: list[str], s: Sampling) -> list[Completion]:
        out = []
        for prompt in prompts:
            reply = next((reply for keys, reply in self.table if _matches(keys, prompt)), "")
            reply = reply if isinstance(reply, dict) else {"text": reply}
            if "status" in reply:
                n = self.asked[prompt] = self.asked.get(prompt, -1) + 1
                if n < reply.get("times", float("inf")):
                    raise HTTPStatus(reply["status"], reply.get("retry_after"))
                reply = reply["then"] if isinstance(reply["then"], dict) else {"text": reply["then"]}
            if "refusal" in reply:
                c = Completion(text="", n_tokens=0, finish_reason="stop")
                c.refusal = reply["refusal"]
                out.append(c)
                continue
            if "cycle" in reply:
                n = self.asked[prompt] = self.asked.get(prompt, -1) + 1
                text = reply["cycle"][n % len(reply["cycle"])]
            else:
                text = reply["text"]
            cuts = [text.index(stop) for stop in s.stop if stop in text]
            text = text[: min(cuts)] if cuts else text
            top = reply.get("top_logprobs") if s.logprobs else None
            out.append(
                Completion(text=text, n_tokens=len(text.split()), finish_reason="stop", top_logprobs=top)
            )
        return out


class HTTPStatus(Exception):
    """A table reply that is an HTTP error."""

    def __init__(self, status: int, retry_after: float | None = None):
        self.status, self.retry_after = status, retry_after


def serve(model: str, port: int, api_key: str | None = None, table: str | None = None) -> ThreadingHTTPServer:
    if table:
        engine = TableEngine(json.loads(Path(table).read_text()))
        engine.tokenizer = load_tokenizer(model, EngineConfig())
    else:
        # float32: requests arrive in batches the client's concurrency decides, and the tests compare texts
        # across routings; bfloat16 rounds a batch and a single row differently enough to flip a near-tie
        engine = TransformersEngine(model, EngineConfig(batch_size=4, dtype="float32"))
    lock = threading.Lock()  # one generate at a time; the engine is not thread-safe

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, obj: dict, retry_after: float | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._send(401, {"error": {"message": "invalid api key"}})
                return
            chat = self.path.rstrip("/") == "/v1/chat/completions"
            if self.path.rstrip("/") != "/v1/completions" and not chat:
                self._send(404, {"error": "not found"})
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if chat:  # the server applies the model's chat template, as vllm serve does
                body["prompt"] = render_prompt(engine.tokenizer, body["messages"])
                body["logprobs"] = body.get("top_logprobs") if body.get("logprobs") else None
            if chat and "max_tokens" in body and re.match(r"o\d|gpt-5", body.get("model", "")):
                # as OpenAI answers for its reasoning models
                self._send(400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with "
                                           "this model. Use 'max_completion_tokens' instead.",
                                           "type": "invalid_request_error", "param": "max_tokens",
                                           "code": "unsupported_parameter"}})  # fmt: skip
                return
            stop = body.get("stop") or []
            s = Sampling(
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
                max_tokens=int(body.get("max_completion_tokens", body.get("max_tokens", 16))),
                stop=tuple([stop] if isinstance(stop, str) else stop),
                stop_token_ids=tuple(body.get("stop_token_ids") or ()),
                repetition_penalty=float(body.get("repetition_penalty", 1.0)),
                seed=body.get("seed"),
                logprobs=body.get("logprobs"),
            )
            try:
                with lock:
                    (c,) = engine.complete([body["prompt"]], s)
            except HTTPStatus as e:
                self._send(e.status, {"error": {"message": f"table says HTTP {e.status}"}}, e.retry_after)
                return
            choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            if c.top_logprobs is not None:
                choice["logprobs"] = {"top_logprobs": [c.top_logprobs]}
            if chat:
                top = [{"token": t, "logprob": lp} for t, lp in (c.top_logprobs or {}).items()]
                refusal = getattr(c, "refusal", None)
                message = {"role": "assistant", "content": None if refusal else c.text, "refusal": refusal}
                choice = {"index": 0, "message": message,
                          "finish_reason": c.finish_reason,
                          "logprobs": {"content": [{"token": "", "logprob": 0.0, "top_logprobs": top}]} if top else None}  # fmt: skip
            self._send(
                200,
                {
                    "object": "text_completion",
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": {"completion_tokens": c.n_tokens},
                },
            )

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key-env")
    ap.add_argument("--table", help="JSON list of [substring, reply]: answer from it, load no weights")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps several servers off each other's cores"
    )
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    server = serve(a.model, a.port, os.environ.get(a.api_key_env) if a.api_key_env else None, a.table)
    print(f"ready on {a.port}", flush=True)
    server.serve_forever()

"""Continuous batching for the transformers engine: finished rows are refilled at once, never padded.

`model.generate` runs a batch until its longest row ends, so on Magpie's mix of short and long replies about half
of every batch's work is padding; it also takes one sampling setting and one seed for the whole batch, while a
serving engine (vLLM, SGLang) samples every request with its own settings and its own seed. transformers'
continuous-batching API (`generate_batch`) keeps one generation config for all requests and has no per-request
seed or stop strings, so this loop is our own, written against the model's ordinary forward pass:

- a slot KV cache `[batch, kv_heads, capacity, head_dim]` per layer in which every row is right-aligned to the
  shared write column `t`: a new request's prompt is prefilled on its own and copied into columns `[t - len, t)`
  of a free row, each row attends only to its own columns (a 4D mask) at its own positions (`position_ids`);
- every row samples with its own temperature, top_p, repetition penalty and `torch.Generator` seeded from its
  request's seed, and stops at its own stop strings, stop token ids and max_tokens, so a request's text is a
  function of its prompt and its settings, as on vLLM, not of what else shares its batch (up to float rounding
  in batched matmuls);
- identical prompts (Magpie's pre-query template, `n_samples` of one prompt) are prefilled once;
- the KV of every finished request (prompt and reply) is kept across calls in a `PrefixCache` (vLLM's automatic
  prefix caching), so a later prompt that extends it is prefilled from where it ends: Magpie's response prompt
  is its instruction's prompt and sampled instruction plus a few template tokens (a request that nothing will
  extend, `Sampling.keep_kv=False`, is not kept);
- a caller that sends spare requests (Magpie's instruction candidates, drawn with a margin for the ones it drops)
  passes a `Demand`, asked before queued requests start: spares wait while the requests before them may suffice,
  and are dropped, never run, once they certainly do;
- when the columns run out the cache shifts left past what no live row needs; when the queue is empty the batch
  drops its idle rows at once (live rows move into the holes, the tensors become views of their first rows), so
  the tail does not pay for empty rows.

What it relies on in transformers (tested on the pinned floor's API and on the newest release, and bounded above in
pyproject.toml): the forward's cache keyword (`cache`, formerly `past_key_values`, found by name), a 4D boolean
`attention_mask` taken as given, `DynamicCache(config=...)` and its `layers[i].keys/values` for the prefill, and a
cache object with `update(key, value, layer_idx)` and `get_seq_length()` for decoding. One mask serves every layer,
so a model with sliding-window attention (Mistral, Gemma 2/3) is refused when a request could outgrow its window:
within the window, a sliding mask and a full one are the same.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from core.engines.base import Completion, Demand, Sampling, truncate_at_stop
from core.errors import EngineError


class _SlotCache:
    """Duck-typed KV cache for the model's forward: `update` writes the new column `t` and returns the columns
    `[lo, t + 1)`, where `lo` is the first column a live row uses (decoding attention reads every returned
    column of every row, so columns no row needs are left out)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers  # (keys, values) per layer, [batch, kv_heads, capacity, head_dim]
        self.t = 0
        self.lo = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.layers[layer_idx]
        keys[:, :, self.t] = key[:, :, 0]
        values[:, :, self.t] = value[:, :, 0]
        return keys[:, :, self.lo : self.t + 1], values[:, :, self.lo : self.t + 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.t


class PrefixCache:
    """KV of finished requests (prompt and reply), kept across calls so a later prompt that starts with one is
    prefilled only from where the match ends. Entries are found token by token through a chain of hashes (the
    hash of a prefix is that of its prefix of one token less and its last token) and evicted oldest first once
    they hold more than `budget_bytes`. The index keeps, for each prefix, the newest entry that has it, so
    evicting the oldest entry removes exactly the prefixes no other entry has."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        # entry -> (token ids, (keys, values) per layer, bytes)
        self.entries: OrderedDict[
            int, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]], int]
        ] = OrderedDict()
        self.index: dict[int, tuple[int, int]] = {}  # prefix hash -> (entry, prefix length)
        self._next = 0

    def add(self, ids: tuple[int, ...], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `layers`, the (keys, values) `[kv_heads, len(ids), head_dim]` of each layer for `ids`."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if not ids or size > self.budget:
            return
        entry, self._next = self._next, self._next + 1
        self.entries[entry] = (ids, layers, size)
        self.bytes += size
        for n, h in enumerate(_chain(ids), 1):
            self.index[h] = (entry, n)
        while self.bytes > self.budget:
            old, (old_ids, _, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
            for h in _chain(old_ids):
                if self.index.get(h, (None,))[0] == old:
                    del self.index[h]

    def match(self, ids: list[int], most: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest cached prefix of `ids` of at most `most` tokens: its length and its (keys, values)."""
        best = None
        for h in _chain(ids[:most]):
            hit = self.index.get(h)
            if hit is None:
                break
            best = hit
        if best is None:
            return 0, None
        entry, n = best
        cached_ids, layers, _ = self.entries[entry]
        if list(cached_ids[:n]) != ids[:n]:  # a hash collision: never reuse another prompt's KV
            return 0, None
        return n, [(k[:, :n], v[:, :n]) for k, v in layers]


def _chain(ids) -> Iterator[int]:
    """The hash of every prefix of `ids`, shortest first (lazily: a lookup stops at its first miss)."""
    h = 0
    for token in ids:
        h = hash((h, token))
        yield h


@dataclass
class _Row:
    index: int  # the request's position in the caller's list
    sampling: Sampling
    prompt_ids: list[int]
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    top_logprobs: dict[str, float] | None = None
    cached: int = 0  # leading prompt tokens whose KV the prefix cache holds
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # their (keys, values) per layer


class ContinuousBatcher:
    """One `complete()` call's worth of requests through a model, `batch_size` rows at a time."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int,
        eos_ids: list[int],
        progress: Any = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model, self.tok = model, tokenizer
        self.prefix_cache = prefix_cache
        self.batch_size = max(1, batch_size)
        self.eos_ids = eos_ids
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.progress = progress
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.window = sliding_window(cfg)
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40)
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------------------------------ entry point

    def run(
        self, prompts: list[str], samplings: list[Sampling], demand: Demand | None = None
    ) -> list[Completion | None]:
        """A completion per prompt, or None where `demand` no longer wanted the request."""
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        if any(len(x) == 0 for x in ids):
            raise ValueError("an empty prompt: every request needs at least one token")
        queue = [_Row(i, s, ids[i], _generator(s.seed)) for i, s in enumerate(samplings) if s.max_tokens > 0]
        results: list[Completion | None] = [
            None if s.max_tokens > 0 else Completion("", 0, "length") for s in samplings
        ]
        self.max_prompt = max((len(r.prompt_ids) for r in queue), default=1)
        longest = max((len(r.prompt_ids) + r.sampling.max_tokens for r in queue), default=1)
        if self.window is not None and longest > self.window:
            raise EngineError(
                f"continuous batching has no sliding-window mask, and this model attends within {self.window} "
                f"tokens while a request here may reach {longest} (prompt + max_tokens): lower max_tokens, or use "
                "engine.backend=vllm"
            )
        self.capacity = longest + max(64, longest // 2)
        self._allocate(min(self.batch_size, len(queue)) or 1)
        self.demand = demand
        with torch.inference_mode():
            while queue or self._n_active():
                free = [s for s, r in enumerate(self.rows) if r is None]
                waiting = False
                if queue and free and (len(free) >= max(1, len(self.rows) // 8) or self._n_active() == 0):
                    new = self._take(queue, len(free))
                    if new:
                        if self.prefix_cache is not None:
                            for r in new:  # every prompt keeps a token of its own: its logits start the reply
                                r.cached, r.past = self.prefix_cache.match(
                                    r.prompt_ids, len(r.prompt_ids) - 1
                                )
                        for group in _length_groups(new):
                            self._admit(group, free[: len(group)], results)
                            free = free[len(group) :]
                        continue
                    waiting = True  # the demand holds back what is queued: free rows stay empty a while
                if not queue or waiting:
                    self._maybe_shrink()
                if self._n_active():
                    self._step(results)
        return results

    def _take(self, queue: list[_Row], n: int) -> list[_Row]:
        """Remove from the queue and return up to `n` requests to start, in order. With a demand: the ones it wants
        now (those it no longer wants leave the queue with no result); if nothing is running that could change
        its mind, the first ones regardless."""
        if self.demand is None:
            new = queue[:n]
        else:
            start, drop = self.demand.triage([r.index for r in queue])
            if drop:
                dropped = set(drop)
                queue[:] = [r for r in queue if r.index not in dropped]
                if self.progress is not None:
                    self.progress.update(len(dropped))
            wanted = set(start)
            new = [r for r in queue if r.index in wanted][:n]
            if not new and not self._n_active():
                new = queue[:n]
        taken = {id(r) for r in new}
        queue[:] = [r for r in queue if id(r) not in taken]
        return new

    # --------------------------------------------------------------------------------------------- state

    def _allocate(self, batch: int) -> None:
        shape = (batch, self.kv_heads, self.capacity, self.head_dim)
        layers = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.n_layers)
        ]
        self.cache = _SlotCache(layers)
        self.cache.t = self.max_prompt  # every prompt fits left of the first write column
        self.mask = torch.zeros(batch, self.capacity, dtype=torch.bool, device=self.device)
        self.start = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pending = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rows: list[_Row | None] = [None] * batch
        self.seen: torch.Tensor | None = None  # [batch, vocab] token-seen flags, only when a penalty is used

    def _n_active(self) -> int:
        return sum(r is not None for r in self.rows)

    def _maybe_shrink(self) -> None:
        """With the queue empty, drop the idle rows from the batch: an idle row costs a decoding step as much as
        a live one. The live rows beyond the new size move into the idle slots before it (only the columns
        they still read), and every tensor becomes a view of its first rows, so nothing else is copied."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        if not live or len(live) == len(self.rows):
            return
        size = len(live)
        movers = [s for s in live if s >= size]
        holes = [s for s in range(size) if self.rows[s] is None]
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            # columns before `lo` are never read again, and those from `t` on are written before they are read
            lo, t = int(self.start[src].min()), self.cache.t
            for k, v in self.cache.layers:
                k[dst, :, lo:t] = k[src, :, lo:t]
                v[dst, :, lo:t] = v[src, :, lo:t]
            for x in (self.mask, self.start, self.pending, self.seen):
                if x is not None:
                    x[dst] = x[src]
            for m, h in zip(movers, holes, strict=True):
                self.rows[h] = self.rows[m]
        self.cache.layers = [(k[:size], v[:size]) for k, v in self.cache.layers]
        self.mask, self.start, self.pending = self.mask[:size], self.start[:size], self.pending[:size]
        if self.seen is not None:
            self.seen = self.seen[:size]
        self.rows = self.rows[:size]

    def _make_room(self) -> None:
        """Shift every row left past the columns no live row (and no queued prompt) needs."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        first = int(self.start[live].min()) if live else self.cache.t
        shift = min(first, self.cache.t - self.max_prompt)
        if shift <= 0:
            raise RuntimeError(
                "continuous batching: KV capacity exhausted (a bug: capacity covers every row)"
            )
        t = self.cache.t
        for k, v in self.cache.layers:
            k[:, :, : t - shift] = k[:, :, shift:t].clone()
            v[:, :, : t - shift] = v[:, :, shift:t].clone()
        self.mask[:, : t - shift] = self.mask[:, shift:t].clone()
        self.mask[:, t - shift :] = False
        self.start -= shift
        self.cache.t = t - shift

    # ----------------------------------------------------------------------------------------- admission

    def _admit(self, new: list[_Row], free: list[int], results: list) -> None:
        """Prefill the new requests' prompts and place them in free rows. Each distinct prompt is computed once,
        from where its prefix-cache match ends."""
        unique: dict[tuple[int, ...], int] = {}
        pasts: list[tuple[int, list | None]] = []
        for r in new:
            if tuple(r.prompt_ids) not in unique:
                unique[tuple(r.prompt_ids)] = len(unique)
                pasts.append((r.cached, r.past))
            r.past = None  # the prefill copies it; the cache keeps its own
        keys, logits, columns = self._prefill(list(unique), pasts)
        t = self.cache.t
        for r, slot in zip(new, free, strict=False):
            u, n = unique[tuple(r.prompt_ids)], len(r.prompt_ids)
            for (K, V), (k, v) in zip(self.cache.layers, keys, strict=True):
                K[slot, :, t - n : t] = k[u].index_select(1, columns[u])
                V[slot, :, t - n : t] = v[u].index_select(1, columns[u])
            self.mask[slot] = False
            self.mask[slot, t - n : t] = True
            self.start[slot] = t - n
            self.rows[slot] = r
            if r.sampling.repetition_penalty != 1.0:
                self._seen()[slot] = False
                self._seen()[slot, torch.tensor(r.prompt_ids, device=self.device)] = True
            elif self.seen is not None:
                self.seen[slot] = False
        row_logits = logits[torch.tensor([unique[tuple(r.prompt_ids)] for r in new], device=self.device)]
        for r, lg in zip(new, row_logits, strict=True):
            if r.sampling.logprobs is not None:
                r.top_logprobs = self._top_logprobs(lg, r.sampling.logprobs)
        self._accept(free[: len(new)], row_logits, results)

    def _prefill(
        self, prompts: list[tuple[int, ...]], pasts: list[tuple[int, list | None]]
    ) -> tuple[list, torch.Tensor, list[torch.Tensor]]:
        """KV of every prompt per layer, the last position's logits, and for each prompt the columns of the KV
        that hold its tokens in order. `pasts[i]` is prompt i's cached prefix: its length and (keys, values) per
        layer, or (0, None). Without cached prefixes, a prefix every prompt shares (a system prompt) is computed
        once for all. Layout: cached prefixes right-aligned in the first columns, then the rest of each prompt
        left-padded, one forward for all."""
        from transformers import DynamicCache

        if len(prompts) > 1 and not any(n for n, _ in pasts):
            shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
            if shared >= 8:  # worth a forward pass of its own
                kv = DynamicCache(config=self.model.config)
                head = torch.tensor([prompts[0][:shared]], device=self.device)
                self.model(input_ids=head, use_cache=True, logits_to_keep=1, **{self.cache_kwarg: kv})
                pasts = [(shared, [(k[0], v[0]) for k, v in _cache_layers(kv)])] * len(prompts)
        cached = [n for n, _ in pasts]
        width_past = max(cached)
        kv = DynamicCache(config=self.model.config)
        if width_past:
            one_prefix = all(p is pasts[0] for p in pasts)  # the shared prefix computed above
            for i in range(self.n_layers):
                if one_prefix:
                    keys = pasts[0][1][i][0].expand(len(prompts), -1, -1, -1).contiguous()
                    values = pasts[0][1][i][1].expand(len(prompts), -1, -1, -1).contiguous()
                else:
                    shape = (len(prompts), self.kv_heads, width_past, self.head_dim)
                    keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    values = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    for j, (n, layers) in enumerate(pasts):
                        if n:
                            keys[j, :, width_past - n :] = layers[i][0]
                            values[j, :, width_past - n :] = layers[i][1]
                kv.update(keys, values, i)
        tails = [p[n:] for p, n in zip(prompts, cached, strict=True)]
        width = max(len(p) for p in tails)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in tails], device=self.device)
        tail_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in tails], device=self.device)
        past_mask = torch.tensor(
            [[0] * (width_past - n) + [1] * n for n in cached], dtype=torch.long, device=self.device
        )
        offset = torch.tensor(cached, device=self.device)[:, None]
        out = self.model(
            input_ids=input_ids,
            attention_mask=torch.cat([past_mask, tail_mask], 1),
            position_ids=offset + (tail_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: kv},
        )
        columns = [
            torch.cat(
                [
                    torch.arange(width_past - n, width_past),
                    torch.arange(width_past + width - len(p), width_past + width),
                ]
            ).to(self.device)
            for p, n in zip(tails, cached, strict=True)
        ]
        return _cache_layers(kv), out.logits[:, -1].float(), columns

    def _seen(self) -> torch.Tensor:
        if self.seen is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self.seen = torch.zeros(len(self.rows), vocab, dtype=torch.bool, device=self.device)
        return self.seen

    def _top_logprobs(self, logits: torch.Tensor, k: int) -> dict[str, float]:
        # Raw model logprobs of the first generated token (before temperature or penalties), as vLLM reports them.
        vals, ids = torch.log_softmax(logits, dim=-1).topk(k)
        top: dict[str, float] = {}
        for v, i in zip(vals.tolist(), ids.tolist(), strict=True):
            top.setdefault(self.tok.decode([i]), v)
        return top

    # -------------------------------------------------------------------------------------------- decoding

    def _step(self, results: list) -> None:
        if self.cache.t >= self.capacity:
            self._make_room()
        t = self.cache.t
        self.mask[:, t] = True
        live = [s for s, r in enumerate(self.rows) if r is not None]
        self.cache.lo = lo = int(self.start[live].min())
        out = self.model(
            input_ids=self.pending[:, None],
            attention_mask=self.mask[:, None, None, lo : t + 1],
            position_ids=(t - self.start)[:, None],
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        self.cache.t = t + 1
        slots = live
        logits = out.logits[:, -1].float()
        idle = [s for s, r in enumerate(self.rows) if r is None]
        if idle:
            self.mask[idle, t] = False
            logits = logits[slots]  # a copy of [rows, vocab]: only when some rows are idle
        self._accept(slots, logits, results)

    def _accept(self, slots: list[int], logits: torch.Tensor, results: list) -> None:
        """Sample the next token of each row in `slots`, then retire the rows that are done."""
        rows = [self.rows[s] for s in slots]
        penalty = torch.tensor([r.sampling.repetition_penalty for r in rows], device=self.device)
        if (penalty != 1.0).any():
            seen = self._seen()[slots]
            p = penalty[:, None]
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        # Each whole-vocabulary operation below runs only on the rows that need it (a [rows, 49152] pass costs
        # a few ms a step on a CPU).
        sampled = [j for j, r in enumerate(rows) if r.sampling.temperature > 0]
        greedy = [j for j, r in enumerate(rows) if r.sampling.temperature <= 0]
        chosen = [0] * len(rows)
        if greedy:
            picks = (logits if len(greedy) == len(rows) else logits[greedy]).argmax(-1)
            for j, token in zip(greedy, picks.tolist(), strict=True):
                chosen[j] = token
        if sampled:
            temps = [rows[j].sampling.temperature for j in sampled]
            scores = logits if len(sampled) == len(rows) else logits[sampled]
            if any(x != 1.0 for x in temps):
                scores = scores / torch.tensor(temps, device=self.device)[:, None]
            probs = torch.softmax(scores, dim=-1)
            top_p = torch.tensor([rows[j].sampling.top_p for j in sampled], device=self.device)
            if (top_p < 1.0).any():
                probs = _top_p(probs, top_p)
            # Inverse-CDF sampling with one uniform draw per row from the row's own generator: the same
            # distribution as torch.multinomial, vectorized over rows (30x faster here than a call per row).
            u = torch.cat([torch.rand(1, generator=rows[j].generator) for j in sampled]).to(self.device)
            cdf = probs.cumsum(-1)
            picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=probs.shape[-1] - 1)
            for j, token in zip(sampled, picks[:, 0].tolist(), strict=True):
                chosen[j] = token
        for slot, r, token in zip(slots, rows, chosen, strict=True):
            s = r.sampling
            if token in self.eos_ids or token in s.stop_token_ids:
                self._finish(slot, r, "stop", results)
                continue
            r.tokens.append(token)
            if self.seen is not None:
                self.seen[slot, token] = True
            if s.stop and _hits_stop(self.tok, r.tokens, s.stop):
                self._finish(slot, r, "stop", results)
            elif len(r.tokens) >= s.max_tokens:
                self._finish(slot, r, "length", results)
            else:
                self.pending[slot] = token

    def _finish(self, slot: int, r: _Row, reason: str, results: list) -> None:
        text = self.tok.decode(r.tokens, skip_special_tokens=False)
        text, hit = truncate_at_stop(text, r.sampling.stop)
        results[r.index] = Completion(text, len(r.tokens), "stop" if hit else reason, r.top_logprobs)
        if self.demand is not None:
            self.demand.finished(r.index, results[r.index])
        if self.prefix_cache is not None and r.sampling.keep_kv:
            # columns [start, t) hold the prompt and every generated token fed back so far
            start, t = int(self.start[slot]), self.cache.t
            self.prefix_cache.add(
                tuple((r.prompt_ids + r.tokens)[: t - start]),
                [(K[slot, :, start:t].clone(), V[slot, :, start:t].clone()) for K, V in self.cache.layers],
            )
        self.rows[slot] = None
        self.mask[slot] = False
        if self.progress is not None:
            self.progress.update(1)


def sliding_window(cfg: Any) -> int | None:
    """The attention window of a model that uses one in any layer, else None."""
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:  # Gemma 2/3, Qwen2 and others say per layer
        return window if "sliding_attention" in types else None
    return window if getattr(cfg, "use_sliding_window", True) else None  # Mistral: every layer


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return g


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches that row's top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs[before >= top_p[:, None]] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def _hits_stop(tok: Any, tokens: list[int], stops: tuple[str, ...]) -> bool:
    """Whether a stop string ends within the last tokens (a string of n characters spans at most n tokens)."""
    window = max(len(s) for s in stops) + 2
    tail = tok.decode(tokens[-window:], skip_special_tokens=False)
    return any(s and s in tail for s in stops)


def _length_groups(rows: list[_Row], overhead: int = 32) -> list[list[_Row]]:
    """Split newly admitted rows into prefill groups of similar prompt length (what the prefix cache does not
    hold). A group's forward pads every prompt to its longest; on Magpie's responses (prompts of 5 to 70 tokens)
    one group pads nearly half of its tokens. Sorted by length, the contiguous split that minimizes padded tokens
    plus `overhead` tokens per forward (the weights are read once per forward) is found exactly, in O(n^2) for a
    batch of n."""
    rows = sorted(rows, key=lambda r: len(r.prompt_ids) - r.cached)
    lengths = [len(r.prompt_ids) - r.cached for r in rows]
    n = len(rows)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + overhead + lengths[j - 1] * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(rows[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _common_prefix(prompts: list[tuple[int, ...]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return n


def _cache_layers(kv: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in kv.layers]

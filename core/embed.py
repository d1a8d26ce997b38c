"""Sentence embeddings (sentence-transformers), normalized, for neighbour search and coverage maps.

Three ways to run the same embedder, fastest last (rows/s on 2 CPU cores, ~150-character instructions, measured
by benchmarks/neighbors_scale.py): the model in float32 (~40), under bfloat16 autocast (~2x, cosine to float32 >
0.9999), and `static=True`: a bag-of-tokens model distilled from it (~100x; neighbours agree less, measured there).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.io import atomic_file
from core.models import cache_dir, resolve_model

EMBED_DTYPES = ("float32", "bfloat16")


def encoder(model: str, static: bool = False) -> Any:
    """A SentenceTransformer for `model`, or with `static` one made of sentence-transformers' StaticEmbedding
    holding token vectors distilled from it (cached)."""
    from sentence_transformers import SentenceTransformer

    if not static:
        return SentenceTransformer(resolve_model(model), device=None)
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from transformers import AutoTokenizer

    path = resolve_model(model)
    return SentenceTransformer(
        modules=[
            StaticEmbedding(AutoTokenizer.from_pretrained(path), embedding_weights=static_weights(path))
        ],
        device="cpu",
    )


def embed(
    texts: list[str],
    model: str,
    batch_size: int,
    block: int = 65_536,
    dtype: str = "float32",
    static: bool = False,
) -> np.ndarray:
    """Normalized sentence embeddings, filled block by block into one float32 array (no per-row objects).
    Identical texts are embedded once (synthetic data repeats itself: the paper's min_neighbor_distance > 0 filter
    exists for that)."""
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {EMBED_DTYPES}")
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
    unique = list(first)
    del first
    model_ = encoder(model, static)
    out = np.empty((len(unique), model_.get_embedding_dimension()), dtype=np.float32)
    for start in tqdm(range(0, len(unique), block), desc="embed", unit="block", disable=len(unique) <= block):
        out[start : start + block] = encode(
            model_,
            unique[start : start + block],
            batch_size,
            "float32" if static else dtype,
            progress=len(unique) <= block and not static,
        )
    return out if len(unique) == len(texts) else out[inverse]


def encode(
    model: Any, texts: list[str], batch_size: int, dtype: str = "float32", progress: bool = False
) -> np.ndarray:
    """Normalized float32 embeddings of `texts` by a loaded SentenceTransformer, under bfloat16 autocast for
    dtype=bfloat16."""
    import torch

    if dtype not in EMBED_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {EMBED_DTYPES}")
    autocast = torch.autocast("cpu" if model.device.type == "cpu" else "cuda", dtype=torch.bfloat16)
    with autocast if dtype == "bfloat16" else contextlib.nullcontext():
        part = model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=False,
        )
    part = part.astype(np.float32)
    # normalized here, in float32: bf16 normalization leaves norms off by ~1e-3
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def static_weights(path: str, dims: int = 256, sif: float = 1e-4) -> np.ndarray:
    """One vector per vocabulary token, distilled from a sentence-transformer as Model2Vec does: each token run
    through the model alone (between its special tokens, mean-pooled), PCA to `dims`, weighted by SIF over a
    Zipf estimate of the token's frequency (vocabularies list frequent tokens first). Cached per model.

    Written here rather than with the model2vec package: its distill extra pins transformers below what the
    training recipes need."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.strip("/"))[-80:]
    cached = cache_dir() / "static-embedders" / f"{name}-{dims}.npy"
    if cached.is_file():
        return np.load(cached)
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(len(tokenizer))
    edges = tokenizer("a")["input_ids"]  # where a lone token sits between the special ones: [CLS] a [SEP]
    at = edges.index(tokenizer("a", add_special_tokens=False)["input_ids"][0])
    vectors = []
    with torch.inference_mode():
        for chunk in tqdm(ids.split(1024), desc="distil static embedder", unit="batch"):
            batch = torch.tensor(edges).repeat(len(chunk), 1)
            batch[:, at] = chunk
            vectors.append(model(input_ids=batch).last_hidden_state.mean(1))
    x = torch.cat(vectors).numpy().astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    x = x @ vt[: min(dims, x.shape[1])].T
    rank_p = 1.0 / np.arange(2, len(x) + 2)
    x *= (sif / (sif + rank_p / rank_p.sum()))[:, None]
    weights = x.astype(np.float32)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cached) as tmp, Path(tmp).open("wb") as f:
        np.save(f, weights)
    return weights

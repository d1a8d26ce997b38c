"""Sentence embeddings (sentence-transformers), normalized, for neighbour search and coverage maps."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from core.models import resolve_model


def embed(texts: list[str], model: str, batch_size: int, block: int = 65_536) -> np.ndarray:
    """Normalized sentence embeddings, filled block by block into one float32 array (no per-row objects)."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(resolve_model(model), device=None)
    out = np.empty((len(texts), encoder.get_embedding_dimension()), dtype=np.float32)
    for start in tqdm(range(0, len(texts), block), desc="embed", unit="block", disable=len(texts) <= block):
        out[start : start + block] = encoder.encode(
            texts[start : start + block],
            batch_size=batch_size,
            show_progress_bar=len(texts) <= block,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
    return out

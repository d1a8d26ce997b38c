"""The neighbour tags: sentence embeddings of each first user turn, FAISS search, and near-duplicate clusters."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from core.embed import embed
from data_synth.tag.context import Context


def neighbor_tags(emb: np.ndarray, k: int, threshold: float, block: int = 4096) -> dict[str, np.ndarray]:
    """min_neighbor_distance (L2 to the nearest other row), repeat_count (neighbours closer than `threshold`)
    and a near-duplicate cluster id (the first row of each connected group closer than `threshold`). Queries
    are searched `block` rows at a time, so memory is block x k, not rows x k (at 1M rows and k=500 the whole
    result would be 6 GB)."""
    import faiss

    n, dim = emb.shape
    index = faiss.IndexFlatL2(dim)
    index.add(emb)
    k = min(k, n)
    min_dist = np.full(n, np.inf)
    repeats = np.zeros(n, dtype=np.int64)
    edges = []
    for start in tqdm(range(0, n, block), desc="neighbors", unit="block", disable=n <= block):
        sq, ids = index.search(emb[start : start + block], k)  # squared L2, self included
        dist = np.sqrt(np.maximum(sq, 0.0))
        rows = np.arange(start, start + len(ids))[:, None]
        other = (ids != rows) & (ids >= 0)
        min_dist[start : start + len(ids)] = np.where(other, dist, np.inf).min(axis=1)
        close = other & (dist < threshold)
        repeats[start : start + len(ids)] = close.sum(axis=1)
        edges.append(np.stack([np.broadcast_to(rows, ids.shape)[close], ids[close]], axis=1))
    # Near-duplicate clusters: the connected components of the "closer than threshold" graph, each named by its
    # first row (scipy's labels are arbitrary, so each maps to its smallest member).
    pairs = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    cluster = first[labels]
    return {"min_neighbor_distance": min_dist, "repeat_count": repeats, "cluster_id": cluster}


def tag_neighbors(ctx: Context, pairs: list[tuple[str, str]], idx: np.ndarray) -> list[dict]:
    cfg = ctx.cfg
    emb = embed([q for q, _ in pairs], cfg.embedder, cfg.embed_batch_size)
    tags = neighbor_tags(emb, cfg.neighbors_k, cfg.near_duplicate_distance, cfg.neighbors_block)
    return [
        dict(zip(tags, values, strict=True))
        for values in zip(*(v.tolist() for v in tags.values()), strict=True)
    ]

"""The neighbour tags: sentence embeddings of each first user turn, FAISS search, and near-duplicate clusters."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from core.embed import embed
from data_synth.tag.context import Context

NEIGHBOR_INDEXES = ("auto", "exact", "ivf")
EXACT_BELOW = 100_000  # index=auto: exact search below this many rows, IVF from here (quadratic vs ~n^1.5)


def build_index(emb: np.ndarray, kind: str = "auto", nprobe: int = 32) -> Any:
    """A FAISS index over `emb`: exact (IndexFlatL2, quadratic to search) or IVF-Flat with 4 sqrt(n) lists, of
    which `nprobe` are searched per query. Near neighbours share a list, so the tags the filters use
    (min_neighbor_distance, repeat_count, clusters) barely move; benchmarks/neighbors_scale.py measures by how much."""
    import faiss

    if kind not in NEIGHBOR_INDEXES:
        raise ValueError(f"neighbors_index={kind!r}: expected one of {NEIGHBOR_INDEXES}")
    n, dim = emb.shape
    if kind == "exact" or (kind == "auto" and n < EXACT_BELOW):
        index = faiss.IndexFlatL2(dim)
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        # k-means on a sample: FAISS asks for at least 39 points per list, 10 iterations settle it
        index.cp.niter = 10
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(emb[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    index.add(emb)
    return index


def neighbor_tags(
    emb: np.ndarray, k: int, threshold: float, block: int = 4096, index: str = "auto", nprobe: int = 32
) -> dict[str, np.ndarray]:
    """min_neighbor_distance (L2 to the nearest other row), repeat_count (neighbours closer than `threshold`)
    and a near-duplicate cluster id (the first row of each connected group closer than `threshold`). Queries
    are searched `block` rows at a time, so memory is block x k, not rows x k (at 1M rows and k=500 the whole
    result would be 6 GB)."""
    n, _ = emb.shape
    built = build_index(emb, index, nprobe)
    k = min(k, n)
    min_dist = np.full(n, np.inf)
    repeats = np.zeros(n, dtype=np.int64)
    edges = []
    for start in tqdm(range(0, n, block), desc="neighbors", unit="block", disable=n <= block):
        sq, ids = built.search(emb[start : start + block], k)  # squared L2, self included
        dist = np.sqrt(np.maximum(sq, 0.0))
        rows = np.arange(start, start + len(ids))[:, None]
        other = (ids != rows) & (ids >= 0)
        # FAISS computes |x|^2 + |y|^2 - 2xy, which leaves identical rows ~3e-4 apart (not 0: the paper's
        # min_neighbor_distance > 0 filter would keep every repeat) and differs by index type. The nearest rows
        # (all within that noise of the nearest) are measured again as |x - y|: 0 for a repeat, whatever the index.
        masked = np.where(other, dist, np.inf)
        cand = other & (masked <= masked.min(axis=1, keepdims=True) + 2e-3)
        r, c = np.nonzero(cand)
        exact = np.linalg.norm(emb[start + r] - emb[ids[r, c]], axis=1)
        best = np.full(len(ids), np.inf)
        np.minimum.at(best, r, exact)
        min_dist[start : start + len(ids)] = best
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
    emb = embed(
        [q for q, _ in pairs],
        cfg.embedder,
        cfg.embed_batch_size,
        dtype=cfg.embed_dtype,
        static=cfg.embed_static,
    )
    tags = neighbor_tags(
        emb,
        cfg.neighbors_k,
        cfg.near_duplicate_distance,
        cfg.neighbors_block,
        cfg.neighbors_index,
        cfg.neighbors_nprobe,
    )
    return [
        dict(zip(tags, values, strict=True))
        for values in zip(*(v.tolist() for v in tags.values()), strict=True)
    ]

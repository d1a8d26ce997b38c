"""The neighbour tags' fast paths: the IVF index against exact search, and the bf16 and static embedders against
the float32 model (the real all-MiniLM-L6-v2)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_synth.tag as tag
from core.embed import embed, static_weights
from core.models import embedded_embedder_path
from data_synth.tag.neighbors import EXACT_BELOW, build_index


def clustered(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres, with exact repeats and near copies (L2 ~0.02) planted."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    emb = centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[1::40] = emb[::40][: len(emb[1::40])]  # exact repeats
    nudge = 0.02 / np.sqrt(dim) * rng.choice([-1.0, 1.0], size=(len(emb[2::40]), dim))
    emb[2::40] = emb[::40][: len(emb[2::40])] + nudge  # near copies
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


def test_ivf_gives_the_exact_tags_on_clustered_data_with_repeats():
    emb = clustered(8000)
    exact = tag.neighbor_tags(emb, k=50, threshold=0.05, index="exact")
    ivf = tag.neighbor_tags(emb, k=50, threshold=0.05, index="ivf", nprobe=16)
    assert type(build_index(emb, "ivf")).__name__ == "IndexIVFFlat"
    assert type(build_index(emb, "auto")).__name__ == "IndexFlatL2"  # 8K rows < EXACT_BELOW
    assert EXACT_BELOW == 100_000
    np.testing.assert_allclose(ivf["min_neighbor_distance"], exact["min_neighbor_distance"], atol=1e-3)
    assert (ivf["repeat_count"] == exact["repeat_count"]).all()
    assert (ivf["cluster_id"] == exact["cluster_id"]).all()
    # every repeat is at distance exactly 0 in both (FAISS's float noise would leave ~3e-4 and the paper's
    # min_neighbor_distance > 0 filter would keep them), and every planted pair is one cluster
    for tags in (exact, ivf):
        assert (tags["min_neighbor_distance"][1::40] == 0.0).all()
        assert (tags["repeat_count"][2::40] >= 1).all()
        assert (tags["cluster_id"][1::40] == tags["cluster_id"][::40][: len(emb[1::40])]).all()
    with pytest.raises(ValueError, match="neighbors_index='hnsw'"):
        build_index(emb, "hnsw")


INSTRUCTIONS = [
    "How do I reverse a linked list in Python?",
    "how do i reverse a linked list in python",
    "Write a haiku about the autumn sea.",
    "Explain the causes of the French Revolution in three paragraphs.",
    "What is the boiling point of water at sea level?",
    "Give me a recipe for a vegan chocolate cake without nuts.",
    "How do I reverse a linked list in Python?",
]


@pytest.mark.integration
def test_bf16_and_static_embedders_against_the_float32_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGPIE_CACHE", str(tmp_path / "cache"))
    ref = embed(INSTRUCTIONS, "embedded-embedder", 4)
    assert ref.shape == (7, 384) and (ref[0] == ref[6]).all()  # a repeated text: embedded once, copied
    bf16 = embed(INSTRUCTIONS, "embedded-embedder", 4, dtype="bfloat16")
    assert ((bf16 * ref).sum(1) > 0.999).all()
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)

    static = embed(INSTRUCTIONS, "embedded-embedder", 4, static=True)
    cached = list((tmp_path / "cache" / "static-embedders").glob("*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (30522, 256)  # one vector per MiniLM token
    assert static.shape == (7, 256)
    np.testing.assert_allclose(np.linalg.norm(static, axis=1), 1.0, atol=1e-5)
    sim = static @ static.T
    np.fill_diagonal(sim, -1)
    # the re-cased copy is the nearest row of the original, and the unrelated rows are farther than it
    assert sim[0].argmax() in (1, 6) and sim[0, 1] > 0.95 and sim[0, [2, 3, 4, 5]].max() < 0.8
    assert sim[2].argmax() not in (0, 1, 6)
    # the second use reads the cache (same weights, no new file)
    again = static_weights(str(embedded_embedder_path()))
    assert (again == np.load(cached[0])).all()
    with pytest.raises(ValueError, match="dtype='int4'"):
        embed(INSTRUCTIONS, "embedded-embedder", 4, dtype="int4")


@pytest.mark.integration
def test_tag_command_with_the_fast_neighbour_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGPIE_CACHE", str(tmp_path / "cache"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Sure."}]}
            )
            + "\n"
            for q in INSTRUCTIONS
        )
    )
    out = tmp_path / "tagged"
    tag.run(
        tag.TagConfig(
            input=str(rows),
            output_dir=str(out),
            taggers=["neighbors"],
            embed_static=True,
            neighbors_index="ivf",
            neighbors_nprobe=4,
        )
    )
    table = pq.read_table(out / "train-00000.parquet")
    dist = table.column("min_neighbor_distance").to_pylist()
    assert dist[0] == 0.0 and dist[6] == 0.0 and min(dist[2:6]) > 0.1, dist
    assert table.column("repeat_count").to_pylist()[0] >= 1
    source = table.schema.field("min_neighbor_distance").metadata[b"source"].decode()
    assert "IndexIVFFlat (nprobe=4)" in source and "static embedder distilled from" in source

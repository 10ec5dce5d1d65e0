"""FAISS search against numpy brute force: same neighbours, deterministic ties, shards = one index.

Tolerance: scores agree within 1e-5; ids are identical except where the two reference scores of
the differing ids tie within 1e-6 (float rounding may order near-equal scores either way).
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import DATA, MODELS, needs_data, needs_tiny_6l

from retrieval.index import IndexShard, IndexSpec, brute_force, merge_topk, search, shard_bounds


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_vectors(n, d, seed, duplicates=()):
    rng = np.random.default_rng(seed)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    for source, targets in duplicates:
        xb[list(targets)] = xb[source]
    return unit(xb)


def assert_same_neighbours(D, I, xq, xb, D_ref, I_ref):
    assert D.shape == D_ref.shape and I.shape == I_ref.shape
    np.testing.assert_allclose(D, D_ref, atol=1e-5, rtol=0)
    rows, cols = np.nonzero(I != I_ref)
    for r, c in zip(rows, cols):
        exact = xb[[I[r, c], I_ref[r, c]]].astype(np.float64) @ xq[r].astype(np.float64)
        assert abs(exact[0] - exact[1]) <= 1e-6, f"query {r} rank {c}: {I[r, c]} vs {I_ref[r, c]} do not tie"


@pytest.fixture(scope="module")
def pool():
    # Rows 7, 100..149 are one vector: a 51-way tie, larger than the candidate margin.
    xb = random_vectors(3000, 32, seed=0, duplicates=[(7, range(100, 150))])
    xq = np.concatenate([xb[:60], random_vectors(40, 32, seed=1)])
    return xq, xb


def test_flat_equals_brute_force_on_random_vectors(pool):
    xq, xb = pool
    D, I = IndexShard(xb).search(xq, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert_same_neighbours(D, I, xq, xb, *brute_force(xq, xb, 10))
    assert (I[:60, 0] == np.r_[np.arange(7), 7, np.arange(8, 60)]).all()  # each source row finds itself first


def test_equal_scores_come_back_by_lower_id_first(pool):
    xq, xb = pool
    D, I = IndexShard(xb).search(xb[[120]], 20)
    assert I[0].tolist() == [7] + list(range(100, 119))
    assert len(set(D[0].tolist())) == 1
    D3, I3 = search(xb[[120]], [xb[:110], xb[110:130], xb[130:]], 20)
    assert I3[0].tolist() == I[0].tolist()


def test_ties_hidden_by_float32_rounding_are_found():
    """40 vectors score exactly 0.3 * 0.7 against the query, but FAISS's float32 sums cancel
    +-B * 0.3 with rounding noise, so its own top-11 misses ids 1 and 2; the result must not."""
    rng = np.random.default_rng(0)
    big = rng.uniform(100, 1000, size=40).astype(np.float32)
    xb = np.zeros((60, 4), np.float32)
    xb[:40, 0], xb[:40, 1], xb[:40, 2] = 0.3, big, -big
    xb[40:, 0] = 0.1
    xq = np.array([[0.7, 0.3, 0.3, 0.0]], np.float32)
    flat = faiss.IndexFlatIP(4)
    flat.add(xb)
    assert not {1, 2} <= set(flat.search(xq, 11)[1][0].tolist())  # the trap is real
    D, I = IndexShard(xb).search(xq, 3)
    assert I.tolist() == [[0, 1, 2]] and D[0].tolist() == pytest.approx([0.21] * 3, abs=1e-7)
    assert search(xq, [xb[:25], xb[25:]], 3)[1].tolist() == [[0, 1, 2]]


def test_shards_equal_one_index_exactly(pool):
    xq, xb = pool
    D, I = IndexShard(xb).search(xq, 25)
    parts = [xb[a:b] for a, b in shard_bounds(len(xb), 3)]
    D3, I3 = search(xq, parts, 25)
    np.testing.assert_array_equal(I3, I)
    np.testing.assert_array_equal(D3, D)


def test_merge_topk_orders_ties_by_id_and_pads():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[4, 1]]))
    b = (np.array([[0.9, 0.7]], np.float32), np.array([[2, 9]]))
    D, I = merge_topk([a, b], 3)
    assert I.tolist() == [[2, 4, 9]] and D.tolist()[0] == pytest.approx([0.9, 0.9, 0.7])
    D, I = merge_topk([(np.array([[0.3]], np.float32), np.array([[5]]))], 2)
    assert I.tolist() == [[5, -1]] and D[0, 1] == -np.inf


def test_small_shard_pads_and_offsets_ids():
    xb = random_vectors(3, 8, seed=2)
    D, I = IndexShard(xb, offset=100).search(xb, 5)
    assert I[:, :3].min() >= 100 and (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()


def test_shard_bounds_are_contiguous_and_cover():
    for n, shards in [(10, 3), (2, 3), (14041, 3), (0, 2)]:
        bounds = shard_bounds(n, shards)
        assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
        assert sum(b - a for a, b in bounds) == n and all(b > a for a, b in bounds)


def test_ivf_recall_against_flat():
    """IVF (nlist 32, nprobe 2) on clustered vectors: recall@10 against flat must be >= 0.95 (0.9965 seen)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32))
    xb = unit(centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32)))
    xq = unit(centres[rng.integers(0, 40, 200)] + 0.3 * rng.normal(size=(200, 32)))
    _, flat = IndexShard(xb).search(xq, 10)
    _, ivf = IndexSpec("ivf", nlist=32, nprobe=2).build(xb).search(xq, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat, ivf)])
    assert recall >= 0.95, recall
    assert IndexSpec("ivf", 32, 8).key() != IndexSpec("flat").key()


def test_bad_input_is_named():
    xb = random_vectors(20, 8, seed=4)
    shard = IndexShard(xb)
    with pytest.raises(ValueError, match="dimension 4"):
        shard.search(np.ones((1, 4), np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        IndexShard(np.full((3, 8), np.nan))
    with pytest.raises(ValueError, match="k must be between"):
        search(xb[:1], [xb[:5], xb[5:]], 21)
    with pytest.raises(ValueError, match="nlist"):
        IndexSpec("ivf")
    with pytest.raises(ValueError, match="kind"):
        IndexSpec("hnsw")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="a GPU is present, so device='cuda' is valid")
def test_cuda_without_gpu_is_refused_clearly():
    with pytest.raises(ValueError, match="sees no GPU"):
        IndexShard(random_vectors(5, 8, seed=5), device="cuda")


def test_real_embeddings_tiny_bert(tiny_bert, toy_corpus):
    from retrieval.embed import Embedder

    sentences = [s for lang in ("en", "es", "de") for s in toy_corpus[lang]]
    x = Embedder(tiny_bert, progress=False).embed(sentences)
    D, I = IndexShard(x).search(x, 5)
    assert_same_neighbours(D, I, x, x, *brute_force(x, x, 5))


@needs_data
@needs_tiny_6l
def test_real_embeddings_bert_tiny_6l():
    """The model of record on 400 English training sentences (their scores bunch within 1e-4)."""
    from retrieval.embed import Embedder
    from trainer.data.corpus import read_corpus

    sentences = read_corpus(DATA / "meta-cross/en/train.txt").sentences[:400]
    x = Embedder(MODELS / "bert-tiny-6l", progress=False).embed(sentences)
    D, I = IndexShard(x).search(x, 5)
    assert_same_neighbours(D, I, x, x, *brute_force(x, x, 5))
    D2, I2 = search(x, [x[:150], x[150:]], 5)
    np.testing.assert_array_equal(I2, I)

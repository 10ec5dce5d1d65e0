"""Retrieval on Ray actors (local 2-CPU cluster on 127.0.0.1): identical to the in-process path."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.retrieval import ShardedEmbedder, ShardedIndex, ShardedIndexSpec
from retrieval.embed import Embedder
from retrieval.index import IndexShard, IndexSpec
from retrieval.tasks import build_pseudo_tasks, source_support
from trainer.config import Config, with_overrides


def test_actors_need_a_started_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already started in this session")
    with pytest.raises(RuntimeError, match="Ray is not started"):
        ShardedIndex(np.ones((4, 2), np.float32), num_shards=2, spec=IndexSpec("flat"), num_cpus=0.5, num_gpus=0)


def test_three_index_actors_equal_one_index(ray_local):
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(900, 16)).astype(np.float32)
    xb[300:340] = xb[5]  # a tie group that straddles the shard boundary at 300
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = np.concatenate([xb[:50], xb[[320]]])
    with ShardedIndex(xb, num_shards=3, spec=IndexSpec("flat", device="cpu"), num_cpus=0.5, num_gpus=0) as index:
        assert len(index.shards) == 3
        D3, I3 = index.search(xq, 12)
    D, I = IndexShard(xb).search(xq, 12)
    np.testing.assert_array_equal(I3, I)
    np.testing.assert_array_equal(D3, D)
    assert I3[-1].tolist() == [5] + list(range(300, 311))


def test_embedding_actors_and_sharded_tasks_match_in_process(ray_local, tiny_bert, toy_corpus):
    cfg = Config()
    cfg = with_overrides(cfg, [("model.max_length", 32), ("model.window_context", 8), ("cluster.num_embed_actors", 2),
                               ("cluster.num_index_shards", 2), ("cluster.cpus_per_actor", 0.5)])
    sentences = toy_corpus["en"][:41] + toy_corpus["nl"][:10]
    local = Embedder.from_config(cfg, tiny_bert, progress=False)
    expected = local.embed(sentences)
    with ShardedEmbedder.from_config(cfg, tiny_bert) as embedder:
        assert embedder.key() == local.key()
        vectors = embedder.embed(sentences)
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
        sharded_index = ShardedIndexSpec.from_config(cfg)
        assert sharded_index.key() == IndexSpec("flat").key()
        support = build_pseudo_tasks(sentences, embedder, k=2, index=sharded_index)
    # Same vectors, sharded vs one index: identical ids, ties included.
    np.testing.assert_array_equal(support, source_support(vectors, sentences, 2, IndexSpec("flat")))
    # Actor and in-process vectors differ by float rounding (other batch padding), so a neighbour
    # may swap only with one whose cosine is within that rounding.
    in_process = build_pseudo_tasks(sentences, local, k=2)
    for q, j in zip(*np.nonzero(support != in_process)):
        gap = expected[q] @ expected[support[q, j]] - expected[q] @ expected[in_process[q, j]]
        assert abs(gap) < 1e-4, (q, j, gap)

"""Pseudo meta-NER tasks: the support sentences of each query sentence, as source sentence ids.

This is the only place where FAISS ids become sentence ids: row i of a result lists, best first,
the ids (positions in the source sentence list) of the K support sentences of query i.

- Source tasks (meta-training): each English sentence is a query; its support is its K most
  similar OTHER English sentences. The sentence itself and every exact duplicate of its text are
  excluded, since the English train set repeats many short lines ("-- --", table headers) and a
  duplicate would make the support a copy of the query.
- Target tasks (test time): each target sentence's support is its K most similar source sentences.
  The official code drops the single most similar candidate here too (`drop_top1=True`,
  retrieval.drop_top1_for_targets); by default it is kept, since a target sentence is never in the
  source set.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from trainer.utils.errors import ConfigError

from .cache import RetrievalCache, corpus_hash, key_hash
from .index import IndexSpec, as_matrix, merge_topk

logger = logging.getLogger(__name__)


class Searcher(Protocol):
    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class IndexBuilder(Protocol):
    """IndexSpec, or a sharded counterpart: builds a searcher over xb and names its results."""

    def build(self, xb: np.ndarray) -> Searcher: ...

    def key(self) -> str: ...


class ReusedIndex:
    """An IndexBuilder that builds its index once and serves every later build over the same xb
    from it, until close(): a job searches the source's index for its pseudo tasks and for every
    target set, and a sharded index costs a process start per shard actor."""

    def __init__(self, builder: IndexBuilder):
        self.builder = builder
        self._xb: np.ndarray | None = None
        self._searcher: Searcher | None = None

    def key(self) -> str:
        return self.builder.key()

    def build(self, xb: np.ndarray) -> Searcher:
        xb = as_matrix("xb", xb)
        if self._searcher is None or not np.array_equal(xb, self._xb):
            self.close()
            self._searcher, self._xb = self.builder.build(xb), xb
        return _Kept(self._searcher)

    def close(self) -> None:
        if self._searcher is not None and hasattr(self._searcher, "close"):
            self._searcher.close()
        self._searcher = self._xb = None

    def __enter__(self) -> "ReusedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Kept:
    """A searcher without close(): its owner, a ReusedIndex, closes it."""

    def __init__(self, searcher: Searcher):
        self.search = searcher.search


def duplicate_groups(sentences: Sequence[Any]) -> np.ndarray:
    """Group id of each sentence; sentences with the same word tuple share an id."""
    ids: dict[tuple[str, ...], int] = {}
    return np.array([ids.setdefault(tuple(s.words), len(ids)) for s in sentences], dtype=np.int64)


def _search(index: IndexBuilder, xb: np.ndarray, queries: list[tuple[np.ndarray, int]]) -> list:
    searcher = index.build(xb)
    try:
        return [searcher.search(xq, k) for xq, k in queries]
    finally:
        if hasattr(searcher, "close"):
            searcher.close()


def source_support(xb, sentences: Sequence[Any], k: int, index: IndexBuilder | None = None) -> np.ndarray:
    """[n, k] int64: for each source sentence, its k nearest other sentences, duplicates excluded."""
    xb = as_matrix("source embeddings", xb)
    if len(sentences) != xb.shape[0]:
        raise ValueError(f"{len(sentences)} sentences but {xb.shape[0]} embeddings; embed the same list")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    groups = duplicate_groups(sentences)
    sizes = np.bincount(groups)[groups]
    if (xb.shape[0] - sizes < k).any():
        worst = int(np.argmax(sizes))
        raise ConfigError(f"sentence {worst} has only {xb.shape[0] - sizes[worst]} other distinct sentences "
                          f"but k={k} supports were asked; lower retrieval.k or add source sentences")
    # A query's own group (itself and its duplicates) can fill at most `size` of the candidates,
    # so k + size candidates always leave k others. Queries are searched per group size.
    by_size = [np.flatnonzero(sizes == g) for g in np.unique(sizes)]
    results = _search(index or IndexSpec("flat"), xb, [(xb[rows], k + int(sizes[rows[0]])) for rows in by_size])
    support = np.empty((xb.shape[0], k), dtype=np.int64)
    for rows, (_, I) in zip(by_size, results):
        keep = (I >= 0) & (groups[np.clip(I, 0, None)] != groups[rows][:, None])
        if (keep.sum(1) < k).any():
            raise ConfigError("the index returned fewer candidates than asked; it is approximate (ivf) with too "
                              "small an nprobe: raise retrieval.ivf_nprobe")
        first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        support[rows] = np.take_along_axis(I, first, 1)
    return support


def target_support(xq, xb, k: int, drop_top1: bool = False, index: IndexBuilder | None = None) -> np.ndarray:
    """[m, k] int64: for each target sentence, its k nearest source sentences.

    `drop_top1=True` skips the single most similar source sentence first, as the official code does.
    """
    xq, xb = as_matrix("target embeddings", xq), as_matrix("source embeddings", xb)
    fetch = k + int(drop_top1)
    if k < 1 or fetch > xb.shape[0]:
        raise ConfigError(f"k={k}{' + 1 dropped' if drop_top1 else ''} supports asked of {xb.shape[0]} "
                          "source sentences; lower retrieval.k")
    (_, I), = _search(index or IndexSpec("flat"), xb, [(xq, fetch)])
    return _drop(I, drop_top1)


def _drop(I: np.ndarray, drop_top1: bool) -> np.ndarray:
    if (I < 0).any():
        raise ConfigError("the index returned fewer candidates than asked; raise retrieval.ivf_nprobe")
    return np.ascontiguousarray(I[:, int(drop_top1):])


def target_fetch(k: int, drop_top1: bool) -> int:
    """Candidates to ask each index shard for, so that `merged_target_support` can keep k."""
    return k + int(drop_top1)


def merged_target_support(shard_results: Sequence[tuple[np.ndarray, np.ndarray]], k: int,
                          drop_top1: bool = False) -> np.ndarray:
    """[m, k] int64 support ids of target queries from the (D, I) of every index shard, each asked
    for `target_fetch(k, drop_top1)` candidates: what target_support gives over one index."""
    _, I = merge_topk(shard_results, target_fetch(k, drop_top1))
    return _drop(I, drop_top1)


# ---------------------------------------------------------------- with embedding and the cache


def _embed_function(embed) -> Callable[[Sequence[Any]], np.ndarray]:
    return embed.embed if hasattr(embed, "embed") else embed


def _encoder_key(embed, key: str | None) -> str:
    if key is not None:
        return key
    if hasattr(embed, "key"):
        return embed.key()
    raise ValueError("the embed function has no key(); pass key=... naming encoder, weights, max_length "
                     "and pooling, so that the cache can tell encoders apart")


def embed_cached(sentences: Sequence[Any], embed, cache: RetrievalCache | None, key: str | None = None
                 ) -> tuple[np.ndarray, dict]:
    """Embeddings of `sentences` (from the cache when present) and the key parts that name them."""
    parts = {"encoder": _encoder_key(embed, key), "corpus": corpus_hash(sentences), "rows": len(sentences)}
    fn = _embed_function(embed)

    def compute() -> np.ndarray:
        start = time.perf_counter()
        vectors = fn(sentences)
        logger.info("embedded %d sentences in %.1f s", len(sentences), time.perf_counter() - start)
        return vectors

    if cache is None:
        return as_matrix("embeddings", compute()), parts
    return cache.get_or_compute("embeddings", parts, len(sentences), np.float32, compute), parts


def build_pseudo_tasks(sentences: Sequence[Any], embed, *, k: int, cache: RetrievalCache | None = None,
                       index: IndexBuilder | None = None, key: str | None = None) -> np.ndarray:
    """Support ids [n, k] of the pseudo meta-NER task of every source sentence (see module doc).

    `embed` is an Embedder (or anything with `embed(sentences)` and `key()`), or a plain function
    with `key` given.
    """
    index = index or IndexSpec("flat")
    xb, parts = embed_cached(sentences, embed, cache, key)
    compute = lambda: source_support(xb, sentences, k, index)  # noqa: E731
    if cache is None:
        return compute()
    nbr = {"mode": "source", "embeddings": key_hash(parts), "k": k, "index": index.key(),
           "exclude": "self and duplicate text"}
    return cache.get_or_compute("support", nbr, len(sentences), np.int64, compute)


def retrieve_support(targets: Sequence[Any], sources: Sequence[Any], embed, *, k: int, drop_top1: bool = False,
                     cache: RetrievalCache | None = None, index: IndexBuilder | None = None,
                     key: str | None = None) -> np.ndarray:
    """Support ids [m, k] (into `sources`) of every target sentence; see target_support."""
    index = index or IndexSpec("flat")
    xq, q_parts = embed_cached(targets, embed, cache, key)
    xb, b_parts = embed_cached(sources, embed, cache, key)
    compute = lambda: target_support(xq, xb, k, drop_top1, index)  # noqa: E731
    if cache is None:
        return compute()
    nbr = {"mode": "target", "queries": key_hash(q_parts), "sources": key_hash(b_parts), "k": k,
           "drop_top1": drop_top1, "index": index.key()}
    return cache.get_or_compute("support", nbr, len(targets), np.int64, compute)

"""Ray shell around retrieval: embedding actors over contiguous corpus shards, and FAISS index shards.

The plain classes `retrieval.embed.Embedder` and `retrieval.index.IndexShard` become actors here,
with CPUs and GPUs from cfg.cluster. Ray must already be started (bound to 127.0.0.1 on a single
machine); starting it implicitly would bind the machine's external address.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray

from cluster.runtime import CUDA_CONTEXT_BYTES, FAISS_SCRATCH_BYTES, MIB, gpu_plan_problem, gpu_total_bytes, wait_placed
from retrieval.cache import RetrievalCache
from retrieval.embed import Embedder, as_sentences
from retrieval.index import IndexShard, IndexSpec, as_matrix, merge_topk, shard_bounds
from retrieval.tasks import ReusedIndex, build_pseudo_tasks, retrieve_support
from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)


def _require_ray() -> None:
    if not ray.is_initialized():
        raise RuntimeError("Ray is not started: call ray.init(...) (on one machine bound to 127.0.0.1) "
                           "or connect to a cluster before making retrieval actors")


def _wait_started(actors: list, timeout_s: float | None = None, what: str = "retrieval actors") -> None:
    # Actor construction is asynchronous: waiting here makes a failing constructor (a bad path,
    # bad vectors) raise at construction, and keeps start-up out of the first call's time.
    if timeout_s is not None:
        try:
            wait_placed(actors, timeout_s, what)
        except Exception:
            actors.clear()  # killed by wait_placed
            raise
        return
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors])
    except Exception:
        _kill(actors)
        raise


def _kill(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)
    actors.clear()


class ShardedEmbedder:
    """`embed(sentences)` split into contiguous shards, one Embedder actor each, results in input order."""

    def __init__(self, encoder, tokenizer=None, *, num_actors: int, max_length: int, pooling: str,
                 batch_size: int, num_cpus: float, num_gpus: float, max_restarts: int = 0,
                 start_timeout_s: float | None = None):
        _require_ray()
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1 (cluster.num_embed_actors), got {num_actors}")
        remote = ray.remote(Embedder).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                              max_task_retries=max_restarts)
        device = "cuda" if num_gpus > 0 else "cpu"
        self.actors = [remote.remote(encoder, tokenizer, max_length=max_length, pooling=pooling,
                                     batch_size=batch_size, device=device, progress=False)
                       for _ in range(num_actors)]
        _wait_started(self.actors, start_timeout_s, "embedding actors")
        self._key: str | None = None

    @classmethod
    def from_config(cls, cfg, encoder=None, tokenizer=None, **options) -> "ShardedEmbedder":
        """`options`: max_restarts, start_timeout_s."""
        return cls(encoder if encoder is not None else cfg.model.name_or_path, tokenizer,
                   num_actors=cfg.cluster.num_embed_actors, max_length=cfg.model.max_length,
                   pooling=cfg.retrieval.pooling, batch_size=cfg.retrieval.batch_size,
                   num_cpus=cfg.cluster.cpus_per_actor, num_gpus=cfg.cluster.gpus_per_actor, **options)

    def key(self) -> str:
        if self._key is None:
            keys = set(ray.get([actor.key.remote() for actor in self.actors]))
            if len(keys) != 1:
                raise RuntimeError(f"embedding actors loaded different encoders: {sorted(keys)}")
            self._key = keys.pop()
        return self._key

    def embed(self, sentences: Sequence[Any]) -> np.ndarray:
        sentences = as_sentences(sentences)
        bounds = shard_bounds(len(sentences), len(self.actors))
        refs = [actor.embed.remote(sentences[a:b]) for actor, (a, b) in zip(self.actors, bounds)]
        parts = ray.get(refs)
        # ray.get keeps the order of refs and the bounds are contiguous and ascending; each part must
        # be exactly its shard, so that row i of the concatenation is sentence i.
        for (a, b), part in zip(bounds, parts):
            if part.shape[0] != b - a:
                raise RuntimeError(f"embedding shard {a}:{b} returned {part.shape[0]} vectors, expected {b - a}")
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts)

    __call__ = embed

    def close(self) -> None:
        _kill(self.actors)

    def __enter__(self) -> "ShardedEmbedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedIndex:
    """One IndexShard actor per contiguous slice of xb; each query batch goes to every shard, merged.

    With a flat index the result equals a single index's, ties included (see retrieval.index).
    """

    def __init__(self, xb, *, num_shards: int, spec: IndexSpec, num_cpus: float, num_gpus: float,
                 max_restarts: int = 0, start_timeout_s: float | None = None):
        _require_ray()
        xb = as_matrix("xb", xb)
        self.ntotal = xb.shape[0]
        remote = ray.remote(IndexShard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                                max_task_retries=max_restarts)
        self.bounds = shard_bounds(self.ntotal, num_shards)
        if 0 < num_gpus < 1:
            _check_gpu_plan(xb, self.bounds, num_gpus)
        self.shards = [remote.remote(xb[a:b], a, kind=spec.kind, nlist=spec.nlist, nprobe=spec.nprobe,
                                     device=spec.device) for a, b in self.bounds]
        _wait_started(self.shards, start_timeout_s, "index shards")

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = as_matrix("xq", xq)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be between 1 and the number of source vectors ({self.ntotal}), got {k}")
        ref = ray.put(xq)
        return merge_topk(ray.get([shard.search.remote(ref, k) for shard in self.shards]), k)

    def close(self) -> None:
        _kill(self.shards)

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_gpu_plan(xb: np.ndarray, bounds: list[tuple[int, int]], num_gpus: float) -> None:
    """Fractional-GPU index shards: log what each holds on its GPU, and refuse, before any is
    started, shards that cannot fit together in the GPU's memory where it is known (see
    cluster.runtime.gpu_memory_problems, which counts the shards before their vectors exist)."""
    vectors = max(b - a for a, b in bounds) * xb.shape[1] * xb.itemsize
    each = CUDA_CONTEXT_BYTES + FAISS_SCRATCH_BYTES + vectors
    together = min(int(1 / num_gpus + 1e-9), len(bounds))
    # A local cluster is bound to 127.0.0.1 (cluster.runtime.init_ray): its GPUs are this machine's.
    local = ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    gpu, source = gpu_total_bytes(ray.nodes(), local)
    logger.info("index shards on GPUs: up to %d share a GPU (%g GPU each), each about %.0f MiB (CUDA context %d MiB, "
                "FAISS scratch %d MiB, vectors %.0f MiB); GPU memory %s", together, num_gpus, each / MIB,
                CUDA_CONTEXT_BYTES // MIB, FAISS_SCRATCH_BYTES // MIB, vectors / MIB,
                f"{gpu / MIB:.0f} MiB ({source})" if gpu else f"unknown ({source}): not checked")
    problem = gpu_plan_problem(each, together, gpu)
    if problem:
        raise ConfigError(f"{problem} (index shards of {len(bounds)} x up to {vectors / MIB:.0f} MiB of vectors, "
                          f"GPU memory from {source})")


class ShardedIndexSpec:
    """An index builder for retrieval.tasks that builds a ShardedIndex (closed by the caller)."""

    def __init__(self, spec: IndexSpec, *, num_shards: int, num_cpus: float, num_gpus: float):
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1 (cluster.num_index_shards), got {num_shards}")
        self.spec, self.num_shards, self.num_cpus, self.num_gpus = spec, num_shards, num_cpus, num_gpus

    @classmethod
    def from_config(cls, cfg) -> "ShardedIndexSpec":
        device = "auto" if cfg.cluster.gpus_per_actor > 0 else "cpu"
        return cls(IndexSpec.from_config(cfg.retrieval, device), num_shards=cfg.cluster.num_index_shards,
                   num_cpus=cfg.cluster.cpus_per_actor, num_gpus=cfg.cluster.gpus_per_actor)

    def key(self) -> str:
        # Flat shards merge to the single-index result; approximate shards do not.
        return self.spec.key() if self.spec.kind == "flat" else f"{self.spec.key()}x{self.num_shards}"

    def build(self, xb, **options) -> ShardedIndex:
        """`options`: max_restarts, start_timeout_s."""
        return ShardedIndex(xb, num_shards=self.num_shards, spec=self.spec, num_cpus=self.num_cpus,
                            num_gpus=self.num_gpus, **options)


# --------------------------------------------------------------- support sets of a job


@dataclass
class Supports:
    """Support ids: `source[i]` those of English sentence i's pseudo task, `sets[name][i]` those of
    sentence i of a named set (English dev, a target test set); `sentences` turns ids into the
    support sentences."""
    source: object  # np.ndarray [n_source, K]: the pseudo task of each source sentence
    sets: dict  # name -> np.ndarray [n, K] of source ids

    def sentences(self, name: str, source: list) -> list[list]:
        return [[source[j] for j in row] for row in self.sets[name]]


def build_supports(cfg, source: list, sets: dict[str, list], encoder=None, tokenizer=None,
                   source_tasks: bool = True) -> Supports:
    """Pseudo tasks of the source (unless `source_tasks` is false) and support ids of every named
    set of sentences, on embedding and index actors (cached on disk: a second run encodes nothing)."""
    r = cfg.retrieval
    started = time.perf_counter()
    cache = RetrievalCache(r.cache_dir)
    with ShardedEmbedder.from_config(cfg, encoder, tokenizer) as embedder, \
            ReusedIndex(ShardedIndexSpec.from_config(cfg)) as index:
        support = build_pseudo_tasks(source, embedder, k=r.k, cache=cache, index=index) if source_tasks else None
        out = {name: retrieve_support(q, source, embedder, k=r.k, drop_top1=r.drop_top1_for_targets,
                                      cache=cache, index=index) for name, q in sets.items()}
    logger.info("retrieval: %d support sentences each for %s%s in %.0f s (%s encoder)", r.k,
                "the source's pseudo tasks and " if source_tasks else "", ", ".join(sets) or "no set",
                time.perf_counter() - started, r.encoder, extra={"stage": True})
    return Supports(support, out)

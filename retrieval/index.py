"""FAISS top-k search over source vectors xb for query vectors xq, by inner product, sharded.

Vectors are float32 rows; with unit rows (see retrieval.embed) inner product is cosine. Every
search returns (D, I): scores and GLOBAL ids, best first, and is deterministic: equal scores are
ordered by id, lower first. FAISS alone does not give that (ties come back in any order, and the
same pair can score an ulp apart depending on where it sits in a BLAS block), so the candidates
FAISS proposes are rescored here in float64, rounded to float32 once, and sorted by (-D, I).
Because a rescored score no longer depends on the shard, a merge of per-shard top-k lists equals
the search of one index over all vectors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import faiss
import numpy as np

from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf")
# Extra candidates asked of FAISS beyond k, so that most queries settle in one round.
_MARGIN = 8
# Candidates rescored at once are capped at this many float64 numbers (256 MiB).
_RESCORE_BUDGET = 1 << 25
# FAISS GPU indexes answer at most this many neighbours per query and probe at most this many IVF
# lists (trainer.config refuses a larger retrieval.k or retrieval.ivf_nprobe for GPU index shards;
# the candidate rounds of a search may still ask for more, and take the CPU copy for that round).
_GPU_MAX_K = 2048
_NO_ID = np.iinfo(np.int64).max


def as_matrix(name: str, x, d: int | None = None) -> np.ndarray:
    """A C-contiguous float32 matrix of finite values, or a ValueError naming `name`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [n, d] of vectors, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} has vectors of dimension {x.shape[1]} but the index holds dimension {d}; "
                         "embed queries and sources with the same encoder")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values; check the encoder output")
    return x


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of near-equal size covering 0..n, empty ones left out."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    edges = [round(i * n / num_shards) for i in range(num_shards + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def sort_candidates(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by (-D, I); missing entries (I = -1) last."""
    ids = np.where(I < 0, _NO_ID, I)
    order = np.lexsort((ids, -D.astype(np.float64)), axis=-1)
    return np.take_along_axis(D, order, -1), np.take_along_axis(I, order, -1)


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of per-shard (D, I) results with global ids; equal scores by lower id first."""
    if not results:
        raise ValueError("merge_topk needs at least one (D, I) result")
    rows = {d.shape[0] for d, _ in results}
    if len(rows) != 1:
        raise ValueError(f"shard results cover different numbers of queries: {sorted(rows)}")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in results], axis=1)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    D, I = sort_candidates(D, I)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return np.ascontiguousarray(D[:, :k]), np.ascontiguousarray(I[:, :k])


def brute_force(xq, xb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k by inner product in numpy (float64 products, float32 scores, ties by id)."""
    xq, xb = as_matrix("xq", xq), as_matrix("xb", xb)
    if not 1 <= k <= xb.shape[0]:
        raise ValueError(f"k must be between 1 and the number of source vectors ({xb.shape[0]}), got {k}")
    D = np.empty((xq.shape[0], k), dtype=np.float32)
    I = np.empty((xq.shape[0], k), dtype=np.int64)
    xb64 = xb.astype(np.float64)
    step = max(1, _RESCORE_BUDGET // max(1, xb.shape[0]))
    for start in range(0, xq.shape[0], step):
        S = (xq[start:start + step].astype(np.float64) @ xb64.T).astype(np.float32)
        kth = -np.partition(-S, k - 1, axis=1)[:, k - 1]
        for row, (scores, bound) in enumerate(zip(S, kth)):
            # Everything tied with the k-th score competes for the last places, by id.
            cand = np.flatnonzero(scores >= bound)
            best = cand[np.lexsort((cand, -scores[cand].astype(np.float64)))[:k]]
            D[start + row], I[start + row] = scores[best], best
    return D, I


@dataclass(frozen=True)
class IndexSpec:
    """Which index to build: exact "flat", or approximate "ivf" with nlist lists and nprobe probes."""

    kind: Literal["flat", "ivf"]
    nlist: Optional[int] = None
    nprobe: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind {self.kind!r} is not known; choose one of {', '.join(KINDS)}")
        if self.kind == "ivf" and not (self.nlist and self.nlist >= 1 and self.nprobe and self.nprobe >= 1):
            raise ValueError("an ivf index needs nlist >= 1 and nprobe >= 1 (retrieval.ivf_nlist, retrieval.ivf_nprobe)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not known; choose auto, cpu or cuda")

    @classmethod
    def from_config(cls, retrieval_cfg, device: str = "auto") -> "IndexSpec":
        return cls(retrieval_cfg.index, retrieval_cfg.ivf_nlist, retrieval_cfg.ivf_nprobe, device)

    def key(self) -> str:
        """What decides the neighbours (the device does not)."""
        return "flat" if self.kind == "flat" else f"ivf(nlist={self.nlist},nprobe={self.nprobe})"

    def build(self, xb, offset: int = 0) -> "IndexShard":
        return IndexShard(xb, offset, kind=self.kind, nlist=self.nlist, nprobe=self.nprobe, device=self.device)


class IndexShard:
    """A slice of the source vectors xb (global ids offset..offset+n-1) in one FAISS index."""

    def __init__(self, xb, offset: int = 0, *, kind: str = "flat", nlist: int | None = None,
                 nprobe: int | None = None, device: str = "auto"):
        IndexSpec(kind, nlist, nprobe, device)  # checks the arguments
        self.xb = as_matrix("xb", xb)
        if self.xb.shape[0] == 0:
            raise ValueError("an index shard needs at least one source vector")
        self.offset, self.kind = int(offset), kind
        self.ntotal, self.d = self.xb.shape
        self.cpu_index = self._build_cpu(nlist, nprobe)
        self.index, self._gpu_resources = self._to_device(self.cpu_index, device)
        # Rounds of candidates fetched from the CPU copy because a GPU index cannot answer that many.
        self.cpu_searches = 0
        # The largest norm bounds FAISS's float32 error, which decides when a candidate list is complete.
        self._max_norm = float(np.linalg.norm(self.xb, axis=1).max())

    def _build_cpu(self, nlist, nprobe):
        if self.kind == "flat":
            index = faiss.IndexFlat(self.d, faiss.METRIC_INNER_PRODUCT)
        else:
            # FAISS's k-means wants about 39 training points per list.
            usable = max(1, min(nlist, self.ntotal // 39))
            if usable != nlist:
                logger.warning("ivf: %d source vectors are too few for nlist=%d; using nlist=%d",
                               self.ntotal, nlist, usable)
            self._quantizer = faiss.IndexFlat(self.d, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIVFFlat(self._quantizer, self.d, usable, faiss.METRIC_INNER_PRODUCT)
            index.train(self.xb)
            index.nprobe = min(nprobe, usable)
        index.add(self.xb)
        return index

    def _to_device(self, index, device: str):
        if device == "cpu":
            return index, None
        # Moving to GPU 0 without a GPU fails late and obscurely: ask FAISS first.
        if faiss.get_num_gpus() == 0:
            if device == "cuda":
                raise ValueError("device 'cuda' was asked for but FAISS sees no GPU; use device='cpu' or 'auto'")
            return index, None
        if self.kind == "ivf" and index.nprobe > _GPU_MAX_K:
            # A GPU IVF index refuses to probe more lists, at every search.
            if device == "cuda":
                raise ConfigError(f"nprobe {index.nprobe} is more than FAISS probes on a GPU ({_GPU_MAX_K}); lower "
                                  "retrieval.ivf_nprobe, or build the index on the CPU (cluster.gpus_per_actor=0)")
            logger.warning("ivf: nprobe=%d is more than FAISS probes on a GPU (%d); this shard stays on the CPU",
                           index.nprobe, _GPU_MAX_K)
            return index, None
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) with global ids; rows padded with (-inf, -1) where the shard has fewer than k."""
        xq = as_matrix("xq", xq, self.d)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        kk = min(k, self.ntotal)
        D = np.full((xq.shape[0], k), -np.inf, dtype=np.float32)
        I = np.full((xq.shape[0], k), -1, dtype=np.int64)
        pending = np.arange(xq.shape[0])
        fetch = min(self.ntotal, kk + _MARGIN)
        while pending.size:
            faiss_D, faiss_I = self._faiss_search(xq[pending], fetch)
            Ds, Is = self._rescore(xq[pending], faiss_I)
            done = self._complete(xq[pending], faiss_D, Ds[:, kk - 1], fetch)
            D[pending[done], :kk] = Ds[done, :kk]
            I[pending[done], :kk] = np.where(Is[done, :kk] >= 0, Is[done, :kk] + self.offset, -1)
            pending, fetch = pending[~done], min(self.ntotal, 2 * fetch)
        return D, I

    def _faiss_search(self, xq: np.ndarray, fetch: int):
        if self.on_gpu and fetch > _GPU_MAX_K:
            # The CPU copy holds the same vectors, and the candidates are rescored exactly either
            # way: the result is the GPU's, only slower.
            self.cpu_searches += 1
            if self.cpu_searches == 1:
                logger.info("a search for %d candidates per query is more than FAISS answers on a GPU (%d): "
                            "such rounds search the CPU copy of the index", fetch, _GPU_MAX_K)
            return self.cpu_index.search(xq, fetch)
        return self.index.search(xq, fetch)

    def _complete(self, xq, faiss_D, kth, fetch) -> np.ndarray:
        """Rows whose candidate list surely holds the top-k and everything tied with the k-th.

        A vector FAISS left out scored at most the last candidate's FAISS score, so its exact score
        is at most that plus FAISS's float32 error; it cannot reach the k-th if that is higher still.
        """
        if self.kind != "flat" or fetch >= self.ntotal:
            return np.ones(xq.shape[0], dtype=bool)
        # A generous probabilistic bound of a float32 dot product's rounding error.
        tol = 8 * math.sqrt(self.d) * 2.0 ** -24 * np.linalg.norm(xq, axis=1) * self._max_norm
        return faiss_D[:, -1].astype(np.float64) + tol < kth

    def _rescore(self, xq: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidates (float64 sums rounded once to float32), sorted by (-D, I)."""
        D = np.empty(cand.shape, dtype=np.float32)
        step = max(1, _RESCORE_BUDGET // max(1, cand.shape[1] * self.d))
        for start in range(0, cand.shape[0], step):
            rows = slice(start, start + step)
            vectors = self.xb[np.clip(cand[rows], 0, None)].astype(np.float64)
            D[rows] = np.einsum("qd,qcd->qc", xq[rows].astype(np.float64), vectors).astype(np.float32)
        D[cand < 0] = -np.inf
        return sort_candidates(D, cand.astype(np.int64))


def search(xq, xb_shards: Sequence[np.ndarray], k: int, spec: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the concatenation of `xb_shards`, one index per shard in this process, merged."""
    spec = spec or IndexSpec("flat")
    total = sum(len(x) for x in xb_shards)
    if not 1 <= k <= total:
        raise ValueError(f"k must be between 1 and the number of source vectors ({total}), got {k}")
    results, offset = [], 0
    for xb in xb_shards:
        if len(xb):
            results.append(spec.build(xb, offset).search(xq, k))
        offset += len(xb)
    return merge_topk(results, k)

"""Benchmark: pseudo-task construction on the real corpora, embedding vs search, FAISS vs numpy.

    python benchmarks/retrieval.py [--quick] [--limit N] [--device cpu|cuda] [--data ROOT] [--model PATH]

Embeds the English train set (the queries of the pseudo tasks and the source of every support set)
and every target test set of the default config, then finds the support ids three ways: a FAISS
flat index in this process (1 shard), FAISS flat shards on Ray actors, and numpy brute force. The
three must give the same neighbours (the sharded one exactly; numpy up to float ties within 1e-6).
Prints the machine, `time <name> <seconds>` lines and one `ratio <name> <value>` line per ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Run as a file, this script's folder would come first on sys.path and its own name would hide
# the `retrieval` package; the repository root is what `benchmarks.*` imports need.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402

QUICK_SOURCE, QUICK_TARGET = 3000, 300


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("METANER_DATA", "../shared/data"),
                        help="data root (default: $METANER_DATA or ../shared/data)")
    parser.add_argument("--model", default="../shared/models/bert-tiny-6l")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"first {QUICK_SOURCE} English and {QUICK_TARGET} target sentences of each set")
    parser.add_argument("--limit", type=int, default=0, help="at most this many sentences per corpus (smoke runs)")
    parser.add_argument("--shards", type=int, default=3, help="index actors of the sharded run")
    return parser.parse_args(argv)


def machine(device: str) -> str:
    import faiss

    from benchmarks import common

    return f"{common.machine(device)} faiss={faiss.__version__} faiss_gpus={faiss.get_num_gpus()}"


def load(args, cfg):
    from trainer.data.corpus import read_corpus

    n_source, n_target = (QUICK_SOURCE, QUICK_TARGET) if args.quick else (0, 0)
    if args.limit:
        n_source = n_target = args.limit
    path = lambda rel: os.path.join(args.data, rel) if not os.path.isabs(rel) else rel  # noqa: E731
    source = read_corpus(path(cfg.data.source_train)).sentences
    targets = {lang: read_corpus(path(cfg.data.target_files[lang]), misc_to_o=lang in cfg.data.misc_to_o).sentences
               for lang in cfg.data.targets}
    if n_source:
        source = source[:n_source]
        targets = {lang: s[:n_target] for lang, s in targets.items()}
    return source, targets


def shard_gpus(device: str, shards: int) -> float:
    """GPUs each index actor asks Ray for: an equal share of one GPU with --device cuda, so that
    all shards run on the one GPU a benchmark is given; none on the CPU."""
    return 1.0 / shards if device == "cuda" else 0.0


def timed(times: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return out


def numpy_source_support(xb, sentences, k):
    """Brute-force reference of retrieval.tasks.source_support."""
    from retrieval.index import brute_force
    from retrieval.tasks import duplicate_groups

    groups = duplicate_groups(sentences)
    _, ranked = brute_force(xb, xb, k + int(np.bincount(groups).max()))
    keep = groups[ranked] != groups[:, None]
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ranked, first, 1)


def check_same(name, ids, reference, xq, xb) -> int:
    """Ids must agree except where the two differing ids tie within 1e-6; returns how many tie flips."""
    rows, cols = np.nonzero(ids != reference)
    for r, c in zip(rows, cols):
        scores = xb[[ids[r, c], reference[r, c]]].astype(np.float64) @ xq[r].astype(np.float64)
        if abs(scores[0] - scores[1]) > 1e-6:
            raise AssertionError(f"{name}: query {r} rank {c}: {ids[r, c]} vs {reference[r, c]} are not tied")
    return len(rows)


class _Prebuilt:
    """An index builder handing out one already started index, so actor start-up is timed apart."""

    def __init__(self, index):
        self.index = index

    def build(self, xb):
        return self  # without close(): the caller keeps the actors for the next search

    def search(self, xq, k):
        return self.index.search(xq, k)

    def key(self):
        return "flat"


def run(args) -> dict[str, float]:
    from cluster.retrieval import ShardedIndex
    from cluster.runtime import init_ray
    from retrieval.embed import Embedder
    from retrieval.index import IndexSpec, brute_force
    from retrieval.tasks import source_support, target_support
    from trainer.config import Config

    cfg = Config()
    k = cfg.retrieval.k
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no GPU")
    if args.shards < 1:
        raise SystemExit("--shards must be at least 1")
    print(machine(args.device), flush=True)
    source, targets = load(args, cfg)
    print(f"corpus en={len(source)} " + " ".join(f"{lang}={len(s)}" for lang, s in targets.items()), flush=True)
    times: dict[str, float] = {}
    embedder = timed(times, "load_model", Embedder.from_config, cfg, args.model, device=args.device, progress=False)
    xb = timed(times, "embed", embedder.embed, source)
    xq = {lang: timed(times, "embed", embedder.embed, s) for lang, s in targets.items()}

    flat = IndexSpec("flat", device="cuda" if args.device == "cuda" else "cpu")
    support = timed(times, "search_flat1", source_support, xb, source, k, flat)
    target = {lang: timed(times, "search_flat1", target_support, q, xb, k, False, flat) for lang, q in xq.items()}

    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    # On a GPU the shards share it: without a GPU share Ray would give them no CUDA_VISIBLE_DEVICES.
    index = timed(times, "start_ray_shards", ShardedIndex, xb, num_shards=args.shards, spec=flat,
                  num_cpus=cfg.cluster.cpus_per_actor, num_gpus=shard_gpus(args.device, args.shards))
    try:
        sharded = _Prebuilt(index)
        support_sharded = timed(times, "search_ray_shards", source_support, xb, source, k, sharded)
        target_sharded = {lang: timed(times, "search_ray_shards", target_support, q, xb, k, False, sharded)
                          for lang, q in xq.items()}
    finally:
        index.close()

    support_numpy = timed(times, "search_numpy", numpy_source_support, xb, source, k)
    target_numpy = {lang: timed(times, "search_numpy", lambda q: brute_force(q, xb, k)[1], q) for lang, q in xq.items()}

    np.testing.assert_array_equal(support_sharded, support)
    flips = check_same("source", support, support_numpy, xb, xb)
    for lang in xq:
        np.testing.assert_array_equal(target_sharded[lang], target[lang])
        flips += check_same(lang, target[lang], target_numpy[lang], xq[lang], xb)
    print(f"neighbours identical: flat1 = ray{args.shards} exactly; flat1 = numpy with {flips} tie flips", flush=True)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    times = run(args)
    for name, value in times.items():
        print(f"time {name} {value:.3f}")
    search = times["search_flat1"]
    print(f"ratio embed_over_search_flat1 {times['embed'] / search:.3f}")
    print(f"ratio numpy_over_flat1 {times['search_numpy'] / search:.3f}")
    print(f"ratio ray{args.shards}_over_flat1 {times['search_ray_shards'] / search:.3f}")
    print(f"ratio ray{args.shards}_with_start_over_flat1 "
          f"{(times['search_ray_shards'] + times['start_ray_shards']) / search:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embed the English source and every target test set, build the (sharded) FAISS index, and
store the pseudo tasks and target support sets in the retrieval cache.

    python -m jobs.build_index [--config jobs/configs/build_index.yaml] [section.key=value ...]

Later jobs with the same encoder and corpora find everything in the cache and encode nothing.
"""
from __future__ import annotations

import time

import numpy as np

from cluster.retrieval import build_supports

from .common import load_data, main_guard, parse, start_cluster


def run(argv=None) -> int:
    cfg, args = parse(argv, "build_index")
    start_cluster(cfg, ("retrieval",))
    data = load_data(cfg, cfg.train.seeds[0])
    started = time.perf_counter()
    supports = build_supports(cfg, data.source, {"dev": data.dev, **data.targets})
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "source_support.npy", supports.source)
    for name, ids in supports.sets.items():
        np.save(args.out / f"support.{name}.npy", ids)
    print(f"{len(data.source)} source tasks and the support sets of {sum(len(v) for v in supports.sets.values())} "
          f"dev and target sentences in {time.perf_counter() - started:.1f} s; cache {cfg.retrieval.cache_dir}, "
          f"arrays in {args.out}")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

"""Meta-train (or, with train.mode=base, fine-tune) one model per seed.

    python -m jobs.meta_train [--config jobs/configs/meta_train.yaml] [section.key=value ...]
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from cluster.finetune import run_finetune
from cluster.meta_train import MetaTrainInputs, run_in_process, run_meta_training
from cluster.progress import watching
from cluster.retrieval import Supports, build_supports
from cluster.storage import job_storage
from cluster.tracking import tracking_uri

from .common import (Data, check_record, inputs_record, load_data, main_guard, parse,
                     start_cluster, tracked_run, write_record)
from .console import duration

logger = logging.getLogger(__name__)


def train_one(cfg, seed: int, data: Data, supports: Supports, run, out: Path) -> str:
    """Train with `seed` into `out`; returns the selected checkpoint (best on English dev). A bar
    follows the workers' steps (cluster.progress)."""
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    storage = job_storage(cfg, out)  # what workers on any node write, for this process to fetch
    steps = cfg.train.num_meta_steps
    if cfg.train.mode == "base":
        with watching(run.run_id, steps, "fine-tune"):
            return run_finetune(cfg, data.source, data.dev, seed, str(out), run.run_id, uri, storage=storage)
    inputs = MetaTrainInputs(config=cfg.to_dict(), source=data.source, support=supports.source, dev=data.dev,
                             dev_support=supports.sentences("dev", data.source), seed=seed, run_id=run.run_id,
                             tracking_uri=uri, output_dir=str(out.resolve()))
    with watching(run.run_id, steps, "meta-train"):
        if cfg.cluster.num_workers == 0:
            run_in_process(inputs)
        else:
            result = run_meta_training(inputs, cfg, storage, f"meta-seed{seed}")
            if result.error is not None:
                raise result.error
    best, final = out / "best", out / "final"
    run.set_tags({"final_checkpoint": str(final), "best_checkpoint": str(best if best.is_dir() else final)})
    return str(best if best.is_dir() else final)


def run(argv=None) -> int:
    cfg, args = parse(argv, "meta_train")
    # A seed folder holding another configuration's training is refused before Ray starts.
    records = {seed: inputs_record(cfg, seed, targets=[]) for seed in cfg.train.seeds}
    for seed, record in records.items():
        check_record(args.out / f"seed{seed}", record)
    start_cluster(cfg, ("retrieval", "train"), args.out)
    for seed in cfg.train.seeds:
        write_record(args.out / f"seed{seed}", records[seed])
        data = load_data(cfg, seed, targets=[])
        supports = build_supports(cfg, data.source, {"dev": data.dev})
        started = time.perf_counter()
        logger.info("seed %d: %s", seed, "fine-tuning" if cfg.train.mode == "base" else "meta-training",
                    extra={"stage": True})
        with tracked_run(cfg, f"{cfg.train.mode}-seed{seed}", {"seed": seed}) as tracked:
            checkpoint = train_one(cfg, seed, data, supports, tracked, args.out / f"seed{seed}")
            tracked.set_tags({"checkpoint": checkpoint})
        logger.info("seed %d: done in %s", seed, duration(time.perf_counter() - started), extra={"stage": True})
        print(f"seed {seed}: {checkpoint}")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's Table 3 run: retrieval, meta-training and evaluation of every target, per seed.

    python -m jobs.pipeline [--config jobs/configs/pipeline.yaml] [--variants ours base] [section.key=value ...]

Each variant is one MLflow run (all config values as parameters) with a child run per seed, whose
children are the per-language evaluation runs. Mean ± std over seeds go to the variant's run, to
stdout and to <out>/results.md beside the paper's numbers.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cluster.adapt_pool import ReusedPool
from cluster.report import PAPER
from cluster.retrieval import build_supports
from trainer.config import with_overrides
from trainer.utils.errors import InputError
from trainer.utils.paths import write_atomic

from .common import (
    RECORD,
    check_record,
    inputs_record,
    load_data,
    main_guard,
    parse,
    start_cluster,
    tracked_run,
    write_record,
)
from .console import duration, shown
from .evaluate import evaluate_one
from .meta_train import train_one
from .variants import REUSES, STARTS_FROM, VARIANTS, markdown_table, parent_of, summarize, variant_config, with_parents

logger = logging.getLogger(__name__)


def _done(folder: Path, record: dict) -> dict | None:
    """A finished seed of an interrupted job: {"f1": {lang: F1}, "wall_s": seconds, "inputs": hash,
    "checkpoint": folder, ...},
    reused only when made from the inputs of `record` (checked by check_record beforehand)."""
    path = folder / "scores.json"
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # cut short by a kill while written: the seed's evaluation runs again
    if done.get("inputs") != record["hash"]:
        raise InputError(f"{path} was made from other inputs than {folder / RECORD} records; "
                         f"delete {folder} to run the seed again")
    if "checkpoint" not in done:  # written before scores named their checkpoint
        done["checkpoint"] = str(folder / "best" if (folder / "best").is_dir() else folder / "final")
    return done


def plan(cfg, variants: list[str], out: Path) -> dict:
    """{(variant, seed): (config, record)} for `variants` and the parents they need, every seed
    folder checked against its record before anything starts: a folder holding another
    configuration's work stops the job here."""
    planned = {}
    for name in with_parents(variants):
        vcfg, parent = variant_config(cfg, name), parent_of(name)
        for seed in vcfg.train.seeds:
            scfg = vcfg
            if name in STARTS_FROM:
                best = (out / parent / f"seed{seed}" / "best").resolve()
                scfg = with_overrides(vcfg, [f"model.init_checkpoint={best}"])
            record = inputs_record(scfg, seed, parent=planned[parent, seed][1] if parent else None)
            check_record(out / name / f"seed{seed}", record)
            planned[name, seed] = (scfg, record)
    return planned


def run_variants(cfg, variants: list[str], out: Path) -> dict:
    """Train and evaluate every variant for every seed; returns {variant: {lang: (mean, std)}}.

    Rows in REUSES evaluate their parent's checkpoint; rows in STARTS_FROM train from it; a
    missing parent runs first. Resumable: a finished seed is read back, a training run continues
    from its last checkpoint, an evaluation from its finished units. The tables are rewritten
    after each variant.
    """
    with ReusedPool() as pool:
        return _run_variants(cfg, variants, out, pool)


def _run_variants(cfg, variants: list[str], out: Path, pool: ReusedPool) -> dict:
    """run_variants on the job's adapter pool."""
    started = time.time()
    planned = plan(cfg, variants, out)
    start_cluster(cfg, out=out)
    data = load_data(cfg, cfg.train.seeds[0])  # one sample of dev and targets for every row, so rows compare
    by_retrieval: dict[str, object] = {}  # variants that retrieve alike share their support sets
    finished: dict = {}  # (variant, seed) -> scores.json of the seed
    table, wall = {}, {}
    for name in with_parents(variants):
        vcfg = planned[name, cfg.train.seeds[0]][0]
        key = json.dumps(vcfg.to_dict()["retrieval"], sort_keys=True)
        if key not in by_retrieval:
            pool.close()  # the embedding actors need the CPUs and GPUs that the adapters hold
            by_retrieval[key] = build_supports(vcfg, data.source, {"dev": data.dev, **data.targets})
        with tracked_run(vcfg, name, {"variant": name, "parent": parent_of(name) or ""}) as parent_run:
            for seed in vcfg.train.seeds:
                scfg, record = planned[name, seed]
                folder = out / name / f"seed{seed}"
                done = _done(folder, record)
                if done is None:
                    write_record(folder, record)
                    reused = finished[REUSES[name], seed]["checkpoint"] if name in REUSES else None
                    done = _train_and_evaluate(scfg, name, seed, data, by_retrieval[key], parent_run, folder,
                                               PAPER.get(name), record["hash"], reused, pool)
                else:
                    logger.info("%s, seed %d: finished by an earlier run, read from %s", name, seed,
                                shown(folder / "scores.json"), extra={"stage": True})
                finished[name, seed] = done
            per_seed = {seed: finished[name, seed]["f1"] for seed in vcfg.train.seeds}
            table[name] = summarize(per_seed)
            wall[name] = sum(finished[name, seed]["wall_s"] for seed in vcfg.train.seeds)
            parent_run.log_metrics({f"f1_{k}_{stat}": v[i] for k, v in table[name].items()
                                    for i, stat in enumerate(("mean", "std"))})
            parent_run.log_metrics({"wall_s": wall[name]})
        text = markdown_table(table, {k: PAPER[k] for k in table if k in PAPER}, wall)
        (out / "results.md").write_text(text, encoding="utf-8")
        _write_json(out / "results.json", {"f1": table, "wall_s": wall,
                                           "job_wall_s": time.time() - started, "job_started": started})
    print(text)
    return table


def _write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=1))


def _train_and_evaluate(cfg, name: str, seed: int, data, supports, parent, folder: Path,
                        paper: dict[str, float] | None, inputs: str, checkpoint: str | None = None,
                        pool: ReusedPool | None = None) -> dict:
    """Train (unless given the `checkpoint` to evaluate) and evaluate one seed of a row, on the
    job's adapter `pool` (shut down before training, which needs the resources its actors hold);
    its scores, precision, recall, English-dev curve and wall time go to <folder>/scores.json."""
    # torch, which trainer.training.checkpoint imports, takes seconds: the driver reads a checkpoint's
    # record only, and only once a seed is done.
    from trainer.training.checkpoint import dev_curve

    started = time.perf_counter()
    with parent.child(f"{name}-seed{seed}") as run:
        run.log_params({**cfg.flat(), "seed": seed, "variant": name})
        if checkpoint is None:
            how = "fine-tuning" if cfg.train.mode == "base" else "meta-training"
            logger.info("%s, seed %d: %s", name, seed, how, extra={"stage": True})
            if pool is not None:
                pool.close()
            checkpoint = train_one(cfg, seed, data, supports, run, folder)
            logger.info("%s, seed %d: trained in %s, checkpoint %s", name, seed,
                        duration(time.perf_counter() - started), shown(checkpoint), extra={"stage": True})
        else:
            logger.info("%s, seed %d: evaluating %s", name, seed, shown(checkpoint), extra={"stage": True})
        run.set_tags({"checkpoint": checkpoint})
        label = f"{name}, seed {seed}, {Path(cfg.model.name_or_path).name}"
        results = evaluate_one(cfg, checkpoint, data, supports, run, folder / "eval", paper, label, pool)
        # Wall time of this process's work on the seed; a resumed seed counts only its last part.
        elapsed = time.perf_counter() - started
        run.log_metrics({"wall_s": elapsed})
    average = sum(r["f1"] for r in results.values()) / max(1, len(results))
    logger.info("%s, seed %d: done in %s, F1 %.2f on average over %d languages; predictions in %s", name, seed,
                duration(elapsed), average, len(results), shown(folder / "eval"), extra={"stage": True})
    done = {metric: {lang: r[metric] for lang, r in results.items()} for metric in ("f1", "precision", "recall")}
    done.update(wall_s=elapsed, inputs=inputs, checkpoint=checkpoint, dev_curve=dev_curve(checkpoint))
    _write_json(folder / "scores.json", done)
    return done


def variants_job(job: str, default: list[str]):
    """The `run(argv)` of a job that trains and evaluates rows chosen with --variants."""
    def run(argv=None) -> int:
        def arguments(p):
            p.add_argument("--variants", nargs="+", default=default, choices=list(VARIANTS),
                           help=f"rows to run, in order (default: {' '.join(default)})")

        cfg, args = parse(argv, job, arguments)
        args.out.mkdir(parents=True, exist_ok=True)
        run_variants(cfg, args.variants, args.out)
        logger.info("tables in %s and %s", shown(args.out / "results.md"), shown(args.out / "results.json"),
                    extra={"stage": True})
        return 0
    return run


run = variants_job("pipeline", ["ours"])
main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's Table 3 run: retrieval, meta-training and evaluation of every target, per seed.

    python -m jobs.pipeline [--config jobs/configs/pipeline.yaml] [--variants ours base] [section.key=value ...]

Each variant is one MLflow run (all config values as parameters) with a child run per seed, whose
children are the per-language evaluation runs. Mean ± std over seeds go to the variant's run, to
stdout and to <out>/results.md beside the paper's numbers.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .common import (RECORD, build_supports, check_record, inputs_record, load_data, main_guard, parse, tracked_run,
                     write_record)
from .evaluate import evaluate_one
from .meta_train import train_one
from .variants import VARIANTS, markdown_table, summarize, variant_config

logger = logging.getLogger(__name__)


def _done(folder: Path, record: dict) -> dict | None:
    """A finished seed of an interrupted job: {"f1": {lang: F1}, "wall_s": seconds, "inputs": hash},
    reused only when made from the inputs of `record` (checked by check_record beforehand)."""
    path = folder / "scores.json"
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # cut short by a kill while written: the seed's evaluation runs again
    if done.get("inputs") != record["hash"]:
        raise ValueError(f"{path} was made from other inputs than {folder / RECORD} records; "
                         f"delete {folder} to run the seed again")
    return done


def plan(cfg, variants: list[str], out: Path) -> dict:
    """{(variant, seed): (config, record)}, every seed folder checked against its record before
    anything starts: a folder holding another configuration's work stops the job here."""
    planned = {}
    for name in variants:
        vcfg = variant_config(cfg, name)
        for seed in vcfg.train.seeds:
            record = inputs_record(vcfg, seed)
            check_record(out / name / f"seed{seed}", record)
            planned[name, seed] = (vcfg, record)
    return planned


def run_variants(cfg, variants: list[str], out: Path) -> dict:
    """Train and evaluate every variant for every seed; returns {variant: {lang: (mean, std)}}.

    Resumable: a finished seed is read back, a training run continues from its last checkpoint,
    an evaluation from its finished units. The table is rewritten after each variant.
    """
    from cluster.report import PAPER_TABLE3
    from cluster.runtime import check_resources, init_ray

    planned = plan(cfg, variants, out)
    init_ray(cfg.cluster.address)

    check_resources(cfg)
    data_seed = cfg.train.seeds[0]  # one sample of dev and targets for every run, so rows compare
    data = load_data(cfg, data_seed)
    by_retrieval: dict[str, object] = {}  # variants that retrieve alike share their support sets
    table, wall = {}, {}
    paper = {"ours": PAPER_TABLE3["ours"], "base": PAPER_TABLE3["base"]}
    for name in variants:
        vcfg = planned[name, cfg.train.seeds[0]][0]
        key = json.dumps(vcfg.to_dict()["retrieval"], sort_keys=True)
        if key not in by_retrieval:
            by_retrieval[key] = build_supports(vcfg, data.source, {"dev": data.dev, **data.targets})
        supports = by_retrieval[key]
        per_seed, seconds = {}, []
        with tracked_run(vcfg, name, {"variant": name}) as parent:
            for seed in vcfg.train.seeds:
                folder, record = out / name / f"seed{seed}", planned[name, seed][1]
                done = _done(folder, record)
                if done is None:
                    write_record(folder, record)
                    done = _train_and_evaluate(vcfg, name, seed, data, supports, parent, folder,
                                               PAPER_TABLE3.get(name), record["hash"])
                per_seed[seed] = done["f1"]
                seconds.append(done["wall_s"])
            table[name], wall[name] = summarize(per_seed), sum(seconds)
            parent.log_metrics({f"f1_{k}_{stat}": v[i] for k, v in table[name].items()
                                for i, stat in enumerate(("mean", "std"))})
            parent.log_metrics({"wall_s": wall[name]})
        text = markdown_table(table, paper, wall)
        (out / "results.md").write_text(text, encoding="utf-8")
        (out / "results.json").write_text(json.dumps({"f1": table, "wall_s": wall}, indent=1), encoding="utf-8")
    print(text)
    return table


def _train_and_evaluate(cfg, name: str, seed: int, data, supports, parent, folder: Path,
                        paper: dict[str, float] | None, inputs: str) -> dict:
    started = time.perf_counter()
    with parent.child(f"{name}-seed{seed}") as run:
        run.log_params({**cfg.flat(), "seed": seed, "variant": name})
        checkpoint = train_one(cfg, seed, data, supports, run, folder)
        run.set_tags({"checkpoint": checkpoint})
        results = evaluate_one(cfg, checkpoint, data, supports, run, folder / "eval", paper)
        # Wall time of this process's work on the seed; a resumed seed counts only its last part.
        elapsed = time.perf_counter() - started
        run.log_metrics({"wall_s": elapsed})
    done = {"f1": {lang: r["f1"] for lang, r in results.items()}, "wall_s": elapsed, "inputs": inputs}
    tmp = folder / "scores.json.tmp"
    tmp.write_text(json.dumps(done), encoding="utf-8")
    os.replace(tmp, folder / "scores.json")
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
        return 0
    return run


run = variants_job("pipeline", ["ours"])
main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

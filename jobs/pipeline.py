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

from .common import build_supports, load_data, main_guard, parse, tracked_run
from .evaluate import evaluate_one
from .meta_train import train_one
from .variants import VARIANTS, markdown_table, summarize, variant_config

logger = logging.getLogger(__name__)


def run_variants(cfg, variants: list[str], out: Path) -> dict:
    """Train and evaluate every variant for every seed; returns {variant: {lang: (mean, std)}}."""
    from cluster.report import PAPER_TABLE3
    from cluster.runtime import init_ray

    init_ray(cfg.cluster.address)
    data_seed = cfg.train.seeds[0]  # one sample of dev and targets for every run, so rows compare
    data = load_data(cfg, data_seed)
    supports = build_supports(cfg, data.source, {"dev": data.dev, **data.targets})
    table = {}
    for name in variants:
        vcfg = variant_config(cfg, name)
        per_seed = {}
        with tracked_run(vcfg, name, {"variant": name}) as parent:
            for seed in vcfg.train.seeds:
                folder = out / name / f"seed{seed}"
                done = folder / "scores.json"
                if done.is_file():  # a finished seed of an interrupted job
                    per_seed[seed] = json.loads(done.read_text())
                    continue
                started = time.perf_counter()
                with parent.child(f"{name}-seed{seed}") as run:
                    run.log_params({**vcfg.flat(), "seed": seed, "variant": name})
                    checkpoint = train_one(vcfg, seed, data, supports, run, folder)
                    run.set_tags({"checkpoint": checkpoint})
                    results = evaluate_one(vcfg, checkpoint, data, supports, run, folder / "eval")
                    run.log_metrics({"wall_s": time.perf_counter() - started})
                per_seed[seed] = {lang: r["f1"] for lang, r in results.items()}
                done.write_text(json.dumps(per_seed[seed]))
            table[name] = summarize(per_seed)
            parent.log_metrics({f"f1_{k}_{stat}": v[i] for k, v in table[name].items()
                                for i, stat in enumerate(("mean", "std"))})
    paper = {"ours": PAPER_TABLE3["ours"], "base": PAPER_TABLE3["base"]}
    text = markdown_table(table, paper)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return table


def run(argv=None) -> int:
    def arguments(p):
        p.add_argument("--variants", nargs="+", default=["ours"], choices=list(VARIANTS),
                       help="rows to run (default: ours)")

    cfg, args = parse(argv, "pipeline", arguments)
    args.out.mkdir(parents=True, exist_ok=True)
    run_variants(cfg, args.variants, args.out)
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

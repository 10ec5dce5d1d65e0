"""Tables 3 and 4 in one job: Base Model, Ours (first-token and mean-pooling retrieval), and Ours
without max loss, without masking, without both; every row a run of one MLflow experiment.

    python -m jobs.replicate --config jobs/configs/replicate_cpu.yaml [section.key=value ...]

Started again with the same --out, it continues where it stopped (see jobs.pipeline.run_variants).
"""
from __future__ import annotations

from .common import main_guard, parse
from .pipeline import run_variants
from .variants import VARIANTS

ROWS = ["base", "ours", "ours_mean", "no_max_loss", "no_masking", "no_both"]


def run(argv=None) -> int:
    def arguments(p):
        p.add_argument("--variants", nargs="+", default=ROWS, choices=list(VARIANTS),
                       help="rows to run, in order (default: all of Tables 3 and 4)")

    cfg, args = parse(argv, "replicate", arguments)
    args.out.mkdir(parents=True, exist_ok=True)
    run_variants(cfg, args.variants, args.out)
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

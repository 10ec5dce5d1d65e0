"""The paper's Table 4: full method, without max loss, without masking, without both, base model.

    python -m jobs.ablation [--config jobs/configs/ablation.yaml] [section.key=value ...]

Every variant is a run of the same MLflow experiment with the same parameter names, so that
`mlflow ui` compares them side by side.
"""
from __future__ import annotations

from .common import main_guard, parse
from .pipeline import run_variants
from .variants import TABLE4


def run(argv=None) -> int:
    cfg, args = parse(argv, "ablation")
    args.out.mkdir(parents=True, exist_ok=True)
    run_variants(cfg, TABLE4, args.out)
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

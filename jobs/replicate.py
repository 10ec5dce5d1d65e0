"""Tables 3 and 4 in one job: Base Model, Ours (first-token and mean-pooling retrieval), and Ours
without max loss, without masking, without both; every row a run of one MLflow experiment.

    python -m jobs.replicate --config jobs/configs/replicate_cpu.yaml [--variants ...] [section.key=value ...]

Started again with the same --out, it continues where it stopped (see jobs.pipeline.run_variants).
"""
from __future__ import annotations

from .common import main_guard
from .pipeline import variants_job

# The paper's rows first; the mean-pooling row needs a retrieval pass of its own.
ROWS = ["base", "ours", "no_max_loss", "no_masking", "no_both", "ours_mean"]

run = variants_job("replicate", ROWS)
main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

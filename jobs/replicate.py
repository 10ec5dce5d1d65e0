"""Tables 3 and 4 in one job, and the rows that take the method apart: Base Model (with and
without test-time adaptation), Ours (with and without it), Ours without max loss, without masking,
without both, with the official loss positions, started from the Base Model, and with
mean-pooling retrieval; every row a run of one MLflow experiment.

    python -m jobs.replicate --config jobs/configs/replicate_cpu.yaml [--variants ...] [section.key=value ...]

Started again with the same --out, it continues where it stopped (see jobs.pipeline.run_variants);
started with more seeds (`train.seeds=[95,495,539]`), it adds them and recomputes nothing.
"""
from __future__ import annotations

from .common import main_guard
from .pipeline import variants_job

# The paper's rows first, each row after the parent whose checkpoint it uses; the mean-pooling
# row needs a retrieval pass of its own.
ROWS = ["base", "base_adapt", "ours", "ours_noadapt", "no_max_loss", "no_masking", "no_both", "ours_official",
        "ours_from_base", "ours_mean"]

run = variants_job("replicate", ROWS)
main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

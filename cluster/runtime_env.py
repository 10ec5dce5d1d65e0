"""The runtime environment that `ray job submit` needs for this project's jobs."""
from __future__ import annotations

import json
import os
from pathlib import Path

# Packaging the working directory must leave out what is large or private.
EXCLUDES = [".venv", ".venv-ci", "outputs", "mlruns", "mlflow.db", ".metaner", ".git", "*.egg-info"]
# Passed through to the job's driver when set where the job is submitted. DeepSpeed's accelerator is
# not: the training workers' follows cluster.use_gpu (cluster.meta_train.worker_env).
PASSED = ("METANER_DATA", "METANER_VERBOSE", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
          "HF_HOME", "TORCH_EXTENSIONS_DIR")


def runtime_env(working_dir: str | os.PathLike = ".") -> dict:
    """A runtime_env for JobSubmissionClient / `ray job submit --runtime-env-json`; the cluster's
    image is expected to hold the dependencies (see cluster/cluster.yaml, cluster/kuberay.yaml)."""
    env: dict = {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES,
                 "env_vars": {k: os.environ[k] for k in PASSED if k in os.environ}}
    env["env_vars"].setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


if __name__ == "__main__":  # prints the JSON for --runtime-env-json
    print(json.dumps(runtime_env()))

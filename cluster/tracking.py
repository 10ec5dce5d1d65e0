"""MLflow logging behind a small object: rank 0 gets a real run, every other rank a no-op.

The training loop calls `log_metrics(dict, step)` and never asks which rank it is on.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

from trainer.utils.errors import ConfigError

from .progress import find_board, publish

logger = logging.getLogger(__name__)

# MLflow caps a parameter value's length; longer values (e.g. target file maps) are cut.
_MAX_PARAM = 500


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a sqlite store in the working directory.

    Always explicit: MLflow's own default switches to a file store when ./mlruns exists."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any work when a tracking server is configured but does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = f"cannot be reached ({getattr(err, 'reason', err)})"
    raise ConfigError(f"MLflow tracking server {uri} {problem}; start it (mlflow server --host 127.0.0.1 "
                      f"--port PORT) or set mlflow.tracking_uri / MLFLOW_TRACKING_URI to a reachable store")


class NullLogger:
    """What ranks other than 0 get: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    @contextmanager
    def child(self, name: str) -> Iterator["NullLogger"]:
        yield self


class MlflowLogger(NullLogger):
    """One MLflow run (optionally nested under `parent_run_id`) with the project's logging calls."""

    def __init__(self, uri: str, experiment: str | None = None, run_name: str | None = None,
                 parent_run_id: str | None = None, run_id: str | None = None):
        """A new run in `experiment`, or with `run_id` the existing run (e.g. in a worker, whose
        metrics then also reach the driver's progress bar of that run: cluster.progress)."""
        # MLflow takes seconds to import and jobs.common imports this module for every command:
        # only where a run is logged.
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.board = None
        if run_id is not None:
            self.run_id = run_id
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            self.board = find_board(run_id)
            return
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow deferred: see MlflowLogger.__init__.
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # MLflow deferred: see MlflowLogger.__init__.
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)
        if self.board is not None:
            publish(self.board, step, metrics)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def child(self, name: str) -> Iterator["MlflowLogger"]:
        """A nested run, closed FAILED if the block raises."""
        run = MlflowLogger(self.uri, self.client.get_experiment(self.experiment_id).name, run_name=name,
                           parent_run_id=self.run_id)
        with finishing(run):
            yield run


@contextmanager
def finishing(run: NullLogger) -> Iterator[NullLogger]:
    """Close `run` FINISHED after the block, or FAILED if it raises (Ctrl-C included)."""
    try:
        yield run
    except BaseException:
        run.close("FAILED")
        raise
    run.close()


def make_logger(uri: str | None, experiment: str, run_name: str | None = None, rank: int = 0,
                **kwargs: Any) -> NullLogger:
    """A real run on rank 0, a no-op elsewhere, so that loops never test the rank themselves."""
    if rank != 0:
        return NullLogger()
    uri = tracking_uri(uri)
    check_reachable(uri)
    return MlflowLogger(uri, experiment, run_name=run_name, **kwargs)

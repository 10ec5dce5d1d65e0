"""MLflow logging on a real sqlite store; ranks other than 0 log nothing."""
import pytest

from cluster.tracking import NullLogger, check_reachable, make_logger, tracking_uri
from trainer.utils.errors import ConfigError


def test_rank_zero_logs_and_other_ranks_do_nothing(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rank0 = make_logger(uri, "exp", run_name="train", rank=0)
    rank1 = make_logger(uri, "exp", run_name="train", rank=1)
    assert isinstance(rank1, NullLogger) and rank1.run_id is None
    for logger in (rank0, rank1):
        logger.log_params({"train.meta_lr": 3e-5, "data.targets": ["es", "nl"]})
        logger.log_metrics({"meta_loss": 1.5}, step=3)
        with logger.child("es") as child:
            child.log_metrics({"f1": 42.0})
        logger.close()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 2  # the parent and one child, both from rank 0
    parent = next(r for r in runs if r.info.run_id == rank0.run_id)
    child = next(r for r in runs if r.info.run_id != rank0.run_id)
    assert parent.data.params["train.meta_lr"] == "3e-05" and parent.data.metrics["meta_loss"] == 1.5
    assert child.data.tags["mlflow.parentRunId"] == rank0.run_id and child.data.metrics["f1"] == 42.0
    assert parent.info.status == child.info.status == "FINISHED"


def test_default_uri_is_explicit_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_server_fails_at_start_with_the_uri():
    import socket

    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ConfigError, match=uri.replace(".", r"\.")):
        check_reachable(uri, timeout=2)

"""A meta-training job stopped after a checkpoint and started again with the same --out continues
from that checkpoint and ends where an uninterrupted job ends: through the CLI, on Ray Train's
DeepSpeed workers, the whole job's process group killed (as a dead node or an operator's kill -9
of a job would leave it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")]

STEPS, EVERY = 24, 3


def _job(out: Path, data: Path, model: str, workers: int) -> list[str]:
    settings = [f"model.name_or_path={model}", "model.dropout=0.0", "model.num_frozen_layers=1",
                "model.max_length=32", "model.window_context=4", f"model.prefix_cache_dir={out / 'prefix'}",
                f"data.root={data}", "data.source_train=en.txt", "data.source_dev=dev.txt", "data.dev_sample=0",
                f"retrieval.cache_dir={out / 'cache'}", f"train.num_meta_steps={STEPS}", "train.meta_batch_size=8",
                "train.eval_every=100", f"train.checkpoint_every={EVERY}", "train.inner_lr=1e-3",
                "train.meta_lr=1e-3", "train.seeds=[95]", f"cluster.num_workers={workers}",
                "cluster.cpus_per_worker=0.5", "cluster.task_balance=static", "cluster.num_embed_actors=1",
                "cluster.num_index_shards=1", "cluster.num_adapter_actors=1", "cluster.cpus_per_actor=0.5",
                f"mlflow.tracking_uri=sqlite:///{out.parent / (out.name + '-mlflow.db')}"]
    # The demo's config: CPU workers and actors (meta_train.yaml's is a GPU cluster's).
    return [sys.executable, "-m", "jobs.meta_train", "--config", str(REPO / "jobs/configs/demo.yaml"),
            "--out", str(out), *settings]


def _env() -> dict:
    # The job starts its own local Ray cluster: the session's test cluster must not be joined.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _registered_checkpoint(run_dir: Path) -> Path | None:
    """A complete checkpoint folder that Ray Train has registered (its snapshot names it)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    done = [p for p in sorted(run_dir.glob("checkpoint_*")) if (p / "trainer_state.pt").is_file()]
    if done and snapshot.is_file() and done[0].name in snapshot.read_text():
        return done[0]
    return None


def _step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint / "trainer_state.pt", weights_only=True)["step"])


def test_a_killed_job_started_again_continues_from_its_checkpoint(tiny_bert_no_dropout, toy_corpus, tmp_path):
    from jobs.synthetic import write_corpus

    data = tmp_path / "data"
    write_corpus(data / "en.txt", toy_corpus["en"][:40])
    write_corpus(data / "dev.txt", toy_corpus["en"][40:44])
    out, run_dir = tmp_path / "killed", tmp_path / "killed" / "seed95" / "ray" / "meta-seed95"
    job = _job(out, data, tiny_bert_no_dropout, workers=1)
    first = subprocess.Popen(job, cwd=REPO, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline, checkpoint = time.monotonic() + 420, None
    while checkpoint is None:
        if first.poll() is not None:
            pytest.fail(f"the job ended (rc {first.returncode}) before it could be killed: {first.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(first.pid, signal.SIGKILL)
            pytest.fail("the job wrote no checkpoint in time")
        checkpoint = _registered_checkpoint(run_dir)
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray cluster and the workers
    first.wait(timeout=60)
    killed_at = _step_of(checkpoint)
    assert 0 < killed_at < STEPS and not (out / "seed95" / "final").exists()

    again = subprocess.run(job, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int((out / "seed95" / "workers" / "rank0.resumed").read_text())
    assert killed_at <= resumed < STEPS and resumed % EVERY == 0, "the job did not continue from a checkpoint"

    reference = tmp_path / "uninterrupted"
    done = subprocess.run(_job(reference, data, tiny_bert_no_dropout, workers=0), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(str(out / "seed95" / "final" / "model.safetensors"))
    expected = load_file(str(reference / "seed95" / "final" / "model.safetensors"))
    for name, ref in expected.items():
        torch.testing.assert_close(final[name], ref, atol=1e-6, rtol=0, msg=name)

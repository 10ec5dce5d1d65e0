"""Ray Train + DeepSpeed meta-training equals the single-process trainer core, and resumes."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.meta_train import MetaTrainInputs, deepspeed_config, run_meta_training
from trainer.config import load_config


def _cfg(model_path, **extra):
    overrides = [f"model.name_or_path={model_path}", "model.prefix_cache_dir=", "model.dropout=0.0", "model.num_frozen_layers=1",
                 "model.max_length=32", "model.window_context=4", "train.meta_batch_size=8",
                 "train.num_meta_steps=3", "train.eval_every=100", "train.checkpoint_every=100",
                 "train.inner_lr=1e-3", "train.meta_lr=1e-3", "cluster.cpus_per_worker=0.5"]
    return load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])


def _inputs(cfg, toy_corpus, out, seed=95):
    source = toy_corpus["en"][:40]
    n = len(source)
    support = np.array([[(i + 1) % n, (i + 7) % n] for i in range(n)])
    return MetaTrainInputs(config=cfg.to_dict(), source=source, support=support, dev=toy_corpus["en"][40:44],
                           dev_support=[[source[0], source[1]]] * 4, seed=seed, output_dir=str(out))


def _single_process_weights(inputs, out):
    """The same run in this process (cluster.num_workers=0): the trainer's own loop."""
    from cluster.meta_train import run_in_process

    inputs = copy.copy(inputs)
    inputs.run_id, inputs.output_dir = None, str(out)
    run_in_process(inputs)
    return load_file(str(out / "final" / "model.safetensors"))


def test_deepspeed_config_is_derived():
    cfg = load_config(overrides=["cluster.zero_stage=1", "train.optimizer=adamw"])
    ds = deepspeed_config(cfg, world_size=3)
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_batch_size"] == 3
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    assert deepspeed_config(load_config(), 2)["gradient_clipping"] == 0.0  # BertAdam clips per tensor


@pytest.mark.slow
def test_one_and_two_workers_and_single_process_agree(ray_local, tiny_bert_no_dropout, toy_corpus, tmp_path):
    import mlflow

    from cluster.tracking import MlflowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from trainer.training.checkpoint import dev_curve

    weights, runs, curves = {}, {}, {}
    for workers in (1, 2):
        # Two workers under ZeRO 1 (the meta optimiser's moments partitioned, BertAdam's per-tensor
        # clipping done before DeepSpeed sees the gradient): still the same weights.
        cfg = _cfg(tiny_bert_no_dropout, **{"cluster.num_workers": workers, "cluster.zero_stage": workers - 1,
                                             "model.prefix_cache_dir": str(tmp_path / "prefix")})
        inputs = _inputs(cfg, toy_corpus, tmp_path / f"out{workers}")
        runs[workers] = MlflowLogger(uri, "meta", run_name=f"w{workers}").run_id
        inputs.run_id, inputs.tracking_uri = runs[workers], uri
        result = run_meta_training(inputs, cfg, str(tmp_path / "ray"), f"w{workers}", max_failures=0)
        assert result.error is None
        weights[workers] = load_file(str(tmp_path / f"out{workers}" / "final" / "model.safetensors"))
        curves[workers] = dev_curve(tmp_path / f"out{workers}" / "final")
    # Each rank adapts its share of English dev: the selection scores do not depend on how many.
    assert [step for step, _ in curves[1]] == [step for step, _ in curves[2]] and curves[1]
    for (_, a), (_, b) in zip(curves[1], curves[2]):
        assert a == pytest.approx(b, abs=1e-6)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for workers, run_id in runs.items():
        # Only rank 0 logs: one value per meta-step, whatever the number of workers.
        history = client.get_metric_history(run_id, "meta_loss")
        assert [m.step for m in history] == [1, 2, 3]
        assert {"tasks_per_s", "meta_lr", "inner_lr", "support_loss", "dev_f1", "time_wait_s"} <= set(client.get_run(run_id).data.metrics)
    reference = _single_process_weights(inputs, tmp_path / "single")
    for name, ref in reference.items():
        torch.testing.assert_close(weights[1][name], weights[2][name], atol=1e-6, rtol=0)
        torch.testing.assert_close(weights[1][name], ref, atol=1e-6, rtol=0)
    from trainer.modules.model import build_model

    start = build_model(_cfg(tiny_bert_no_dropout), seed=95).state_dict()
    moved = sum(not torch.equal(start[k], reference[k]) for k in reference)
    assert moved > 0, "the meta-steps changed no weight"


_UNINTERRUPTED: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_killed_worker_is_replaced_and_training_resumes(ray_local, tiny_bert_no_dropout, toy_corpus, tmp_path,
                                                        zero_stage):
    """SIGKILL rank 1 after the first checkpoint: the group restarts from it and ends where the
    same meta-training without the failure ends (run in one process), with the meta optimiser
    whole (ZeRO 0) or partitioned across ranks (ZeRO 2: DeepSpeed's own checkpoint carries each
    rank's part). ZeRO 1 saves and restores through the same code (cluster.meta_train branches on
    stage > 0 only, and DeepSpeed checkpoints stages 1 and 2 with one optimiser class); its
    meta-update is checked against one worker in test_one_and_two_workers_and_single_process_agree."""
    import os
    import signal
    import threading
    import time

    cfg = _cfg(tiny_bert_no_dropout, **{"cluster.num_workers": 2, "train.num_meta_steps": 60,
                                         "train.checkpoint_every": 3, "cluster.zero_stage": zero_stage})
    out = tmp_path / "out"
    inputs = _inputs(cfg, toy_corpus, out)
    killed = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        first = None
        while time.time() < deadline and not killed:
            if first is None and list((tmp_path / "ray" / "killed").glob("checkpoint_*")):
                first = time.time()
            # Ray Train's controller registers reported checkpoints when it polls the workers
            # (every 2 s): a kill before that would restart from scratch, not resume.
            if first is not None and time.time() - first > 3 and (out / "workers" / "rank1.pid").exists():
                pid = int((out / "workers" / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    result = run_meta_training(inputs, cfg, str(tmp_path / "ray"), "killed", max_failures=2)
    watcher.join(timeout=1)
    assert result.error is None
    assert "pid" in killed, "the worker was never killed"
    assert int((out / "workers" / "rank1.pid").read_text()) != killed["pid"], "rank 1 was not replaced"
    resumed = {int((out / "workers" / f"rank{r}.resumed").read_text()) for r in (0, 1)}
    step = resumed.pop()
    assert not resumed and 0 < step < 60 and step % 3 == 0, "the group did not resume from a checkpoint"
    final = load_file(str(out / "final" / "model.safetensors"))
    if "weights" not in _UNINTERRUPTED:
        # One uninterrupted run for every stage, in this process (the trainer's own loop, which
        # 1 and 2 workers equal: test_one_and_two_workers_and_single_process_agree).
        _UNINTERRUPTED["weights"] = _single_process_weights(inputs, tmp_path / "uninterrupted")
    for name, ref in _UNINTERRUPTED["weights"].items():
        torch.testing.assert_close(final[name], ref, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_non_finite_meta_loss_stops_with_step_and_task(ray_local, tiny_bert_no_dropout, toy_corpus, tmp_path):
    cfg = _cfg(tiny_bert_no_dropout, **{"cluster.num_workers": 1, "train.meta_lr": 1e30, "train.inner_lr": 1e30,
                                         "train.optimizer": "adamw", "train.max_grad_norm": 0.0,
                                         "train.warmup_proportion": 0.0})
    inputs = _inputs(cfg, toy_corpus, tmp_path / "out")
    with pytest.raises(Exception) as err:
        result = run_meta_training(inputs, cfg, str(tmp_path / "ray"), "nan", max_failures=0)
        if result.error is not None:
            raise result.error
    message = str(err.value)
    assert "meta-step" in message and "query sentence" in message and "loss is" in message

"""Distributed first-order meta-training: Ray Train workers, each driving a DeepSpeed engine.

Every meta-step samples `meta_batch_size` tasks from (seed, step) and splits them across the
workers. Each worker runs the inner loops of its tasks with the trainer core (outside any gradient
buffer) and sums their query gradients into one buffer. A single `engine.backward` of a surrogate
whose gradient is that buffer hands it to DeepSpeed, which all-reduces across workers (under every
ZeRO stage); `engine.step()` applies the meta optimiser once. DeepSpeed averages gradients over
data-parallel ranks, so the surrogate is scaled by the world size: the meta-gradient stays the
paper's SUM over all tasks of the batch, whatever the number of workers.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from the job config (never written by hand)."""
    return {
        # One "sample" per worker and step: its summed meta-gradient.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        # DeepSpeed clips the global norm at 1.0 unless told otherwise. BertAdam clips each tensor
        # itself (train.max_grad_norm), as the official code does; AdamW gets the global clip.
        "gradient_clipping": cfg.train.max_grad_norm if cfg.train.optimizer == "adamw" else 0.0,
        "zero_optimization": {"stage": cfg.cluster.zero_stage},
        # The meta optimiser is BertAdam, a client optimiser DeepSpeed has not tested with ZeRO.
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class MetaTrainInputs:
    """What every worker needs; put in Ray's object store once, not pickled per worker."""

    config: dict
    source: list  # trainer.corpus.Sentence
    support: np.ndarray  # [num_source, K] support ids of each source sentence's task
    dev: list  # English dev sentences for model selection
    dev_support: list  # their support sentences (retrieved from the source)
    seed: int
    run_id: Optional[str] = None  # MLflow run that rank 0 logs into
    tracking_uri: Optional[str] = None
    output_dir: str = "outputs/meta"


# ------------------------------------------------------------------------------ inside a worker


def _build(inputs: MetaTrainInputs):
    import torch

    from trainer.config import config_from_dict
    from trainer.features import Featurizer
    from trainer.maml import MetaLearner, group_windows
    from trainer.model import build_model, load_tokenizer

    cfg = config_from_dict(inputs.config)
    torch.manual_seed(inputs.seed)
    model = build_model(cfg, seed=inputs.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    featurizer = Featurizer(tokenizer, cfg.model.max_length, cfg.model.window_context, model.labels)
    source = group_windows(featurizer.encode(inputs.source))
    learner = MetaLearner(model, featurizer, cfg, seed=inputs.seed)
    return cfg, model, tokenizer, featurizer, source, learner


def _restore(learner, model, checkpoint) -> tuple[int, float]:
    """Weights, meta optimiser, step and best dev F1 from a Ray Train checkpoint."""
    import torch
    from safetensors.torch import load_file

    from trainer.checkpoint import WEIGHTS, load_trainer_state, set_rng_state

    with checkpoint.as_directory() as folder:
        state = load_file(str(Path(folder) / WEIGHTS))
        with torch.no_grad():
            model.load_state_dict(state)
        trainer_state = load_trainer_state(folder)
    if trainer_state.get("optimizer") is not None:
        learner.meta_optimizer.load_state_dict(trainer_state["optimizer"])
    else:
        logger.warning("checkpoint has no meta optimiser state (ZeRO > 0): its moments restart")
    set_rng_state(trainer_state["rng"])
    learner.step = int(trainer_state["step"])
    return learner.step, float(trainer_state.get("best_f1", -1.0))


def _meta_gradient(learner, source, support, ids, epoch):
    """Sum of the query gradients of tasks `ids` (one buffer) and the summed losses."""
    import torch

    from trainer.maml import Task

    buffer = [torch.zeros_like(p) for p in learner.params]
    losses = torch.zeros(3, dtype=torch.float64)  # support loss, query loss, tasks
    for query in ids:
        grads, stats = learner.task_gradients(Task(tuple(support[query]), int(query)), source, epoch)
        for b, g in zip(buffer, grads):
            b.add_(g)
        losses += torch.tensor([stats["support_loss"], stats["query_loss"], 1.0], dtype=torch.float64)
    return buffer, losses


def _dev_f1(cfg, model, featurizer, inputs: MetaTrainInputs, prefix_cache: dict | None = None) -> float:
    from trainer.adapt import adapt_many, evaluate
    from trainer.scoring import score

    if not inputs.dev:
        return float("nan")
    if not cfg.adapt.enabled:
        return evaluate(model, featurizer, inputs.dev, cfg.adapt.batch_size)["f1"]
    was_training = model.training
    model.eval()
    try:
        tags = adapt_many(model, featurizer, inputs.dev, inputs.dev_support, cfg, prefix_cache=prefix_cache)
    finally:
        model.train(was_training)
    return score([list(s.tags) for s in inputs.dev], tags)["f1"]


def _save(folder: str, model, tokenizer, cfg, learner, step: int, best_f1: float, zero_stage: int) -> None:
    from trainer.checkpoint import rng_state, save_checkpoint

    state = {"step": step, "best_f1": best_f1, "rng": rng_state(),
             # Under ZeRO 1/2 the optimiser state is partitioned across ranks; only stage 0 keeps
             # it whole on rank 0.
             "optimizer": learner.meta_optimizer.state_dict() if zero_stage == 0 else None}
    save_checkpoint(folder, model, tokenizer=tokenizer, config=cfg, meta={"step": step, "best_f1": best_f1},
                    trainer_state=state)


def _write_pid(out: Path, rank: int) -> None:
    """Which process is which rank, for an operator who needs to inspect or stop one."""
    folder = out / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))


def meta_train_worker(loop_config: dict) -> None:
    """The per-worker loop that Ray Train runs (one process per worker)."""
    import deepspeed
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    from trainer.sampling import epoch_of, sample_task_batch, shard_tasks

    from .distributed import all_reduce_sum
    from .tracking import MlflowLogger, NullLogger

    inputs: MetaTrainInputs = ray.get(loop_config["inputs"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _write_pid(Path(inputs.output_dir), rank)
    cfg, model, tokenizer, featurizer, source, learner = _build(inputs)
    engine, *_ = deepspeed.initialize(model=model, optimizer=learner.meta_optimizer,
                                      lr_scheduler=learner.scheduler, config=deepspeed_config(cfg, world))
    step, best_f1 = 0, -1.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        step, best_f1 = _restore(learner, model, checkpoint)
        logger.info("rank %d resumed at meta-step %d", rank, step)
    log = MlflowLogger(inputs.tracking_uri, run_id=inputs.run_id) if rank == 0 and inputs.run_id else NullLogger()
    train = cfg.train
    num_tasks = len(inputs.source)
    out = Path(inputs.output_dir)
    started, done_tasks = time.perf_counter(), 0
    dev_prefix: dict = {}  # the frozen bottom of the dev windows, the same at every evaluation
    while step < train.num_meta_steps:
        batch = sample_task_batch(num_tasks, train.meta_batch_size, inputs.seed, step)
        mine = shard_tasks(batch, rank, world)
        try:
            buffer, losses = _meta_gradient(learner, source, inputs.support, mine,
                                            epoch_of(step, train.meta_batch_size, num_tasks))
        except FloatingPointError as err:
            raise FloatingPointError(f"meta-step {step + 1}, rank {rank}: {err}") from None
        surrogate = world * sum((p * b).sum() for p, b in zip(learner.params, buffer))
        engine.backward(surrogate)
        lrs = {"meta_lr": learner.meta_lr(), "inner_lr": learner.inner_lr()}
        engine.step()
        step += 1
        learner.step = step
        all_reduce_sum(losses)
        done_tasks += int(losses[2])
        metrics = {"support_loss": float(losses[0] / losses[2]), "meta_loss": float(losses[1] / losses[2]),
                   "tasks_per_s": done_tasks / (time.perf_counter() - started), **lrs}
        if step % train.eval_every == 0 or step == train.num_meta_steps:
            f1 = _dev_f1(cfg, model, featurizer, inputs, dev_prefix) if rank == 0 else float("nan")
            metrics["dev_f1"] = f1
            if rank == 0 and f1 > best_f1:
                best_f1 = f1
                # save_checkpoint swaps a finished folder into place: `best` is never half-written.
                _save(str(out / "best"), model, tokenizer, cfg, learner, step, best_f1, cfg.cluster.zero_stage)
        log.log_metrics(metrics, step=step)
        if rank == 0 and (step % 10 == 0 or step == train.num_meta_steps):
            logger.info("meta-step %d/%d  meta_loss %.4f  %.1f tasks/s", step, train.num_meta_steps,
                        metrics["meta_loss"], metrics["tasks_per_s"])
        if step % train.checkpoint_every == 0 or step == train.num_meta_steps:
            metrics["best_f1"] = best_f1
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    _save(tmp, model, tokenizer, cfg, learner, step, best_f1, cfg.cluster.zero_stage)
                    if step == train.num_meta_steps:
                        _save(str(out / "final"), model, tokenizer, cfg, learner, step, best_f1, cfg.cluster.zero_stage)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


# ------------------------------------------------------------------------------ the driver


def latest_checkpoint(storage_path: str, name: str):
    """The newest checkpoint a previous run of this name left, to resume a stopped job from."""
    from ray.train import Checkpoint

    run_dir = Path(storage_path) / name
    found = sorted(run_dir.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
    complete = [p for p in found if (p / "trainer_state.pt").is_file()]
    return Checkpoint.from_directory(str(complete[-1])) if complete else None


def run_meta_training(inputs: MetaTrainInputs, cfg, storage_path: str, name: str, resume: bool = True,
                      max_failures: int = 2):
    """Meta-train on `cfg.cluster.num_workers` Ray Train workers; returns Ray Train's Result.

    A worker that dies is replaced and the group resumes from the last checkpoint (up to
    `max_failures` times); with `resume`, a new run of the same name continues a stopped one.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path = os.path.abspath(storage_path)
    resume_from = latest_checkpoint(storage_path, name) if resume else None
    if resume_from is not None:
        logger.info("resuming %s from %s", name, resume_from.path)
    c = cfg.cluster
    trainer = TorchTrainer(
        meta_train_worker,
        train_loop_config={"inputs": ray.put(inputs)},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker,
                                                           **({"GPU": 1} if c.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": _worker_env()}),
        resume_from_checkpoint=resume_from,
    )
    return trainer.fit()


def _worker_env() -> dict[str, str]:
    """Settings the workers need whatever shell started the driver."""
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "METANER_DATA"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env

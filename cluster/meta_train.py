"""Distributed first-order meta-training: Ray Train workers, each driving a DeepSpeed engine.

Each worker runs the loop of `trainer.training.meta_trainer.MetaTrainer` (the same code that runs in one
process): every meta-step samples `meta_batch_size` tasks from (seed, step), and each worker
computes its share with the vectorised task engine, summed into one buffer. A single
`engine.backward` of a surrogate
whose gradient is that buffer hands it to DeepSpeed, which all-reduces across workers (under every
ZeRO stage); `engine.step()` applies the meta optimiser once. DeepSpeed averages gradients over
data-parallel ranks, so the surrogate is scaled by the world size: the meta-gradient stays the
paper's SUM over all tasks of the batch, whatever the number of workers.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from trainer.config import config_from_dict
from trainer.utils.errors import ConfigError, InputError

from .storage import checkpoint_at, exists, fetch, is_uri, join, list_dirs, publish_written
from .tracking import MlflowLogger, NullLogger

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
        # train.precision=bf16 is torch.autocast over fp32 weights (DeepSpeed's own "bf16" block
        # would cast the module's weights to bf16); with no "lower precision safe" module, no
        # gradient is all-reduced in bf16: the meta-gradient is summed in fp32.
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class MetaTrainInputs:
    """What every worker needs; put in Ray's object store once, not pickled per worker."""

    config: dict
    source: list  # trainer.data.corpus.Sentence
    support: np.ndarray  # [num_source, K] support ids of each source sentence's task
    dev: list  # English dev sentences for model selection
    dev_support: list  # their support sentences (retrieved from the source)
    seed: int
    run_id: Optional[str] = None  # MLflow run that rank 0 logs into
    tracking_uri: Optional[str] = None
    output_dir: str = "outputs/meta"
    # Where rank 0 publishes `best` and `final` for the driver to fetch into output_dir (a folder
    # every node sees, or a URI: cluster.storage); None writes them into output_dir directly, as
    # one process or one node may.
    models: Optional[str] = None


# ------------------------------------------------------------------------------ inside a worker


def build_trainer(inputs: MetaTrainInputs, rank: int = 0, world_size: int = 1, metrics_logger=None):
    """(trainer, tokenizer): the model, featurizer and `trainer.training.meta_trainer.MetaTrainer` of a
    run, the frozen bottom of English train prepared (kept under model.prefix_cache_dir)."""
    cfg, model, tokenizer, featurizer = _model_of(inputs)
    return _trainer(inputs, cfg, model, featurizer, rank, world_size, metrics_logger), tokenizer


def _model_of(inputs: MetaTrainInputs):
    """(config, model, tokenizer, featurizer) of a run, the model on this worker's GPU where asked."""
    # torch and the model code load where a model trains (a Ray Train worker, or run_in_process),
    # not in the job's driver, which imports this module for MetaTrainInputs and run_meta_training.
    import torch

    from trainer.data.features import Featurizer
    from trainer.modules.model import load_tokenizer
    from trainer.training.checkpoint import build_model

    cfg = config_from_dict(inputs.config)
    torch.manual_seed(inputs.seed)
    model = build_model(cfg, seed=inputs.seed)
    if cfg.cluster.use_gpu:
        model = model.cuda(gpu_device())
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    featurizer = Featurizer(tokenizer, cfg.model.max_length, cfg.model.window_context, model.labels)
    return cfg, model, tokenizer, featurizer


def _trainer(inputs: MetaTrainInputs, cfg, model, featurizer, rank: int, world_size: int, metrics_logger,
             optimizer=None, meta_update=None):
    # The model code: deferred, see _model_of.
    from trainer.training.meta_trainer import MetaTrainer

    trainer = MetaTrainer(model, featurizer, cfg, inputs.source, inputs.support, seed=inputs.seed, dev=inputs.dev,
                          dev_support=inputs.dev_support, rank=rank, world_size=world_size,
                          metrics_logger=metrics_logger, optimizer=optimizer, meta_update=meta_update)
    if cfg.model.prefix_cache_dir:
        prepare_source_bottom(trainer, cfg.model.prefix_cache_dir, rank, world_size)
    return trainer


def gpu_device():
    """The GPU Ray gave this worker, or a clear error where it has none (`cluster.use_gpu=true`):
    running on the CPU would hold the GPU and be slower by far, silently."""
    # The model code: deferred, see _model_of.
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"cluster.use_gpu=true, but this worker ({socket.gethostname()}, torch {torch.__version__}) "
                          "sees no GPU: install a CUDA build of torch on every node, or set cluster.use_gpu=false")
    return torch.device("cuda", torch.cuda.current_device())


def prepare_source_bottom(trainer, folder: str, rank: int = 0, world_size: int = 1) -> None:
    """The frozen bottom of every English train window, from disk, or computed (each rank a share,
    merged by rank 0) and saved for every later run with the same frozen weights."""
    # The model code: deferred, see _model_of.
    from trainer.modules.bottom import keep_source

    keep_source(trainer.bottom, folder, [w for group in trainer.windows for w in group], rank, world_size)


def clips_before_engine(optimizer, cfg) -> bool:
    """Whether the meta-update clips the meta-gradient itself (call before deepspeed.initialize).

    Under ZeRO 1/2 DeepSpeed hands the optimiser flat partitions of whole parameter groups, so
    BertAdam's per-tensor clipping would clip partitions instead: the meta-update all-reduces the
    meta-gradient and clips each tensor itself, and the optimiser inside DeepSpeed clips nothing."""
    # The model code: deferred, see _model_of.
    from trainer.training.optim import BertAdam

    clip = cfg.cluster.zero_stage > 0 and isinstance(optimizer, BertAdam)
    if clip:
        for group in optimizer.param_groups:
            group["max_grad_norm"] = 0.0
    return clip


def deepspeed_update(engine, world_size: int, clip_norm: Optional[float] = None):
    """The meta-update through a DeepSpeed engine, which all-reduces the ranks' summed gradients
    (under every ZeRO stage) and steps the meta optimiser once; `clip_norm`: each tensor of the
    all-reduced meta-gradient clipped to it first (see clips_before_engine).

    DeepSpeed averages gradients over data-parallel ranks, so the surrogate is scaled by the world
    size: the meta-gradient stays the paper's SUM over all tasks of the batch, whatever the number
    of workers.
    """
    # The model code: deferred, see _model_of.
    from trainer.training.optim import clip_tensor_grad
    from trainer.utils.distributed import all_reduce_sum

    def update(params, buffer) -> None:
        scale = world_size
        if clip_norm is not None:
            # Every rank then holds the same clipped sum, which DeepSpeed's average leaves as it is.
            buffer = [clip_tensor_grad(all_reduce_sum(b), clip_norm) for b in buffer]
            scale = 1
        surrogate = scale * sum((p * b).sum() for p, b in zip(params, buffer))
        engine.backward(surrogate)
        engine.step()
    return update


DS_FOLDER, DS_TAG = "deepspeed", "state"


def _save(folder: str, trainer, engine, tokenizer, zero_stage: int) -> None:
    """Rank 0's checkpoint folder; under ZeRO 1/2 the optimiser state is partitioned across ranks
    and every rank adds its part through DeepSpeed's own checkpointing (call on every rank)."""
    if zero_stage > 0:
        engine.save_checkpoint(str(Path(folder) / DS_FOLDER), tag=DS_TAG, exclude_frozen_parameters=True)
    if trainer.rank == 0:
        if zero_stage > 0:  # keep what DeepSpeed wrote beside the metaner files
            kept = Path(folder).with_name(Path(folder).name + ".ds")
            os.replace(Path(folder) / DS_FOLDER, kept)
        trainer.save(folder, tokenizer, with_optimizer=zero_stage == 0)
        if zero_stage > 0:
            os.replace(kept, Path(folder) / DS_FOLDER)


def _restore(trainer, engine, checkpoint, zero_stage: int) -> None:
    """Weights, meta optimiser (DeepSpeed's partitions under ZeRO 1/2), step, best dev F1, RNG."""
    with checkpoint.as_directory() as folder:
        ds = Path(folder) / DS_FOLDER
        trainer.load(folder, optimizer_elsewhere=zero_stage > 0 and ds.is_dir())
        if zero_stage > 0 and ds.is_dir():
            engine.load_checkpoint(str(ds), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)


def _write_pid(out: Path, rank: int) -> None:
    """Which process is which rank, for an operator who needs to inspect or stop one."""
    folder = out / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))


def deepspeed_engine_trainer(inputs: MetaTrainInputs, rank: int, world_size: int, metrics_logger=None):
    """(trainer, tokenizer, engine) of one data-parallel rank: the DeepSpeed engine over the model
    and its meta optimiser, and the trainer whose meta-update goes through it; call on every rank
    once the process group is up (Ray Train's, or any env:// launcher's)."""
    # DeepSpeed only in the process that drives an engine (a Ray Train worker, a benchmark's rank);
    # the model code as in _model_of.
    import deepspeed

    from trainer.training.meta_trainer import meta_optimizer

    cfg, model, tokenizer, featurizer = _model_of(inputs)
    optimizer, scheduler = meta_optimizer(model, cfg)
    clip = clips_before_engine(optimizer, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world_size))
    update = deepspeed_update(engine, world_size, cfg.train.max_grad_norm if clip else None)
    trainer = _trainer(inputs, cfg, model, featurizer, rank, world_size, metrics_logger, (optimizer, scheduler),
                       update)
    if cfg.cluster.task_balance == "dynamic":
        # The model code: deferred, see _model_of.
        from trainer.utils.distributed import chunk_claims

        trainer.claims = chunk_claims()
    return trainer, tokenizer, engine


def deepspeed_trainer(inputs: MetaTrainInputs, rank: int, world_size: int, metrics_logger=None):
    """(trainer, tokenizer) of `deepspeed_engine_trainer`, for a caller that keeps no checkpoint of
    DeepSpeed's own (the engine lives on in the trainer's meta-update)."""
    trainer, tokenizer, _ = deepspeed_engine_trainer(inputs, rank, world_size, metrics_logger)
    return trainer, tokenizer


def meta_train_worker(loop_config: dict) -> None:
    """The per-worker loop that Ray Train runs (one process per worker): the trainer's own loop,
    with DeepSpeed's meta-update and Ray Train's checkpoints."""
    # Ray Train and the model code only in its workers (see _model_of).
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    inputs: MetaTrainInputs = ray.get(loop_config["inputs"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One torch thread per CPU this worker was given: more oversubscribes the node.
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    out = Path(inputs.output_dir)
    _write_pid(out, rank)
    log = MlflowLogger(inputs.tracking_uri, run_id=inputs.run_id) if rank == 0 and inputs.run_id else NullLogger()
    trainer, tokenizer, engine = deepspeed_engine_trainer(inputs, rank, world, log)
    cfg = trainer.cfg
    zero = cfg.cluster.zero_stage
    # Ray Train hands over the group's last checkpoint after a worker failure, and, under Train V2,
    # the last one it registered when a job is started again with the same run name and storage;
    # the driver's find covers a checkpoint written but not yet registered when the job stopped.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = checkpoint_at(loop_config["resume_from"])
    if checkpoint is not None:
        _restore(trainer, engine, checkpoint, zero)
        logger.info("rank %d resumed at meta-step %d", rank, trainer.step)
        (out / "workers" / f"rank{rank}.resumed").write_text(str(trainer.step))

    def keep(t, kind: str) -> None:
        """`best` or `final` where the driver finds it: published to the models' storage, or
        (without one) written into the output folder, swapped into place whole either way."""
        if inputs.models is None:
            t.save(str(out / kind), tokenizer, with_optimizer=False)
            return

        publish_written(lambda folder: t.save(str(folder), tokenizer, with_optimizer=False), join(inputs.models, kind))

    def on_checkpoint(t, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _save(tmp, t, engine, tokenizer, zero)
            if t.rank == 0 and t.step == cfg.train.num_meta_steps:
                keep(t, "final")
            has_files = t.rank == 0 or zero > 0
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if has_files else None)

    on_best = lambda t: keep(t, "best")  # noqa: E731
    trainer.fit(on_best=on_best, on_checkpoint=on_checkpoint)


# ------------------------------------------------------------------------------ the driver


def run_in_process(inputs: MetaTrainInputs) -> None:
    """Meta-train in this process (`cluster.num_workers=0`): the trainer's loop as it is, no Ray
    Train, no DeepSpeed; `<out>/last` holds the state to resume from, written every
    `train.checkpoint_every` steps."""
    # The model code: deferred, see _model_of.
    import torch

    cfg = config_from_dict(inputs.config)
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    out = Path(inputs.output_dir)
    log = MlflowLogger(inputs.tracking_uri, run_id=inputs.run_id) if inputs.run_id else NullLogger()
    trainer, tokenizer = build_trainer(inputs, metrics_logger=log)
    last = out / "last"
    if (last / "trainer_state.pt").is_file():
        trainer.load(last)
        logger.info("resumed at meta-step %d from %s", trainer.step, last)

    def on_checkpoint(t, metrics: dict) -> None:
        t.save(last, tokenizer)
        if t.step == cfg.train.num_meta_steps:
            t.save(out / "final", tokenizer, with_optimizer=False)

    trainer.fit(on_best=lambda t: t.save(out / "best", tokenizer, with_optimizer=False), on_checkpoint=on_checkpoint)


def latest_checkpoint(storage_path: str, name: str):
    """Where the newest complete checkpoint that a previous run of this name left lies (a path or
    URI), to resume a stopped job from; None if there is none."""
    found = [p for p in list_dirs(join(storage_path, name)) if p.rsplit("/", 1)[-1].startswith("checkpoint_")]
    # Ray Train names them checkpoint_<date>_<time>: the name orders them.
    complete = [p for p in found if exists(join(p, "trainer_state.pt"))]
    return complete[-1] if complete else None


def run_meta_training(inputs: MetaTrainInputs, cfg, storage_path: str, name: str, resume: bool = True,
                      max_failures: Optional[int] = None):
    """Meta-train on `cfg.cluster.num_workers` Ray Train workers; returns Ray Train's Result.

    `storage_path` (a folder every node sees, or a URI) keeps Ray Train's checkpoints and the
    models rank 0 publishes, which the driver then fetches into `inputs.output_dir` (`best`,
    `final`). A worker that dies is replaced and the group resumes from the last checkpoint (up to
    `max_failures` times, default cluster.train_max_failures); with `resume`, a new run of the same name continues a stopped one.
    """
    # Ray Train only where it runs: cluster.num_workers=0 meta-trains in the job's process
    # without it (run_in_process).
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path = storage_path if is_uri(storage_path) else os.path.abspath(storage_path)
    if inputs.config["model"]["prefix_cache_dir"]:  # workers run in a working directory of their own
        inputs.config["model"]["prefix_cache_dir"] = os.path.abspath(inputs.config["model"]["prefix_cache_dir"])
    if not resume and exists(join(storage_path, name)):
        # Ray Train V2 restores a run of the same name and storage whatever it is told.
        raise InputError(f"{join(storage_path, name)} holds an earlier run of {name}; remove it or give "
                         "another name to start afresh")
    resume_from = latest_checkpoint(storage_path, name) if resume else None
    if resume_from is not None:
        logger.info("resuming %s from %s", name, resume_from)
    inputs = dataclasses.replace(inputs, models=join(storage_path, f"{name}-models"))
    c = cfg.cluster
    # No resume_from_checkpoint: Ray Train V2 (ray 2.60's default) refuses it. The same
    # RunConfig(name, storage_path) restores the run, and the checkpoint found on disk goes to the
    # workers in their loop config.
    trainer = TorchTrainer(
        meta_train_worker,
        train_loop_config={"inputs": ray.put(inputs), "threads": c.cpus_per_worker,
                           "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker,
                                                           **({"GPU": 1} if c.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.cluster.checkpoints_kept),
                             failure_config=FailureConfig(
                                 max_failures=cfg.cluster.train_max_failures if max_failures is None else max_failures),
                             worker_runtime_env={"env_vars": worker_env(c.use_gpu)}),
    )
    result = trainer.fit()
    for kind in ("best", "final"):  # what rank 0 published, wherever it ran
        fetch(join(inputs.models, kind), Path(inputs.output_dir) / kind)
    return result


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Settings the workers need whatever shell started the driver. DeepSpeed's accelerator follows
    `cluster.use_gpu`, not the submitter's shell: left to detection or to an exported
    DS_ACCELERATOR=cpu, `deepspeed.initialize` would move a GPU worker's model back to the CPU,
    and NCCL would then refuse its tensors."""
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "METANER_DATA"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env

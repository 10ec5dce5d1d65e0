"""The "Base Model" (direct transfer): plain fine-tuning on English, as one Ray task; and a
student on a teacher's soft labels (jobs.distill), on the same task.

Fine-tuning is one process of the trainer core; it runs as a Ray task so that on a cluster it
lands on a GPU worker rather than on the head node where the job's driver runs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import ray

from trainer.config import config_from_dict

from .meta_train import gpu_device
from .storage import fetch, join, publish_written
from .tracking import MlflowLogger, NullLogger

logger = logging.getLogger(__name__)


def _finetune(config: dict, source, dev, seed: int, out_dir: str, run_id: str | None, uri: str | None,
              init_checkpoint: str | None = None, num_steps: int | None = None, threads: int = 1,
              models: str | None = None, teacher=None) -> str:
    # torch and the model code load in the task, not in the driver that imports this module to
    # submit it.
    import torch

    torch.set_num_threads(threads)

    # The model code, as torch above: in the task (its threads set first).
    from trainer.data.features import Featurizer
    from trainer.modules.bottom import FrozenBottom
    from trainer.modules.model import load_tokenizer
    from trainer.training.checkpoint import build_model, load_model, save_checkpoint
    from trainer.training.finetune import finetune

    cfg = config_from_dict(config)
    torch.manual_seed(seed)
    if init_checkpoint:  # continue from a trained model (e.g. on a few target-language sentences)
        model = load_model(init_checkpoint)[0].set_precision(cfg.train.precision)
    else:
        model = build_model(cfg, seed=seed)
    if cfg.cluster.use_gpu:
        model = model.cuda(gpu_device())
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    featurizer = Featurizer(tokenizer, cfg.model.max_length, cfg.model.window_context, model.labels)
    log = MlflowLogger(uri, run_id=run_id) if run_id else NullLogger()
    bottom = FrozenBottom(model, featurizer) if cfg.model.prefix_cache_dir else None
    stats = finetune(model, featurizer, source, cfg, seed=seed, num_steps=num_steps, dev=dev or None,
                     metrics_logger=log, bottom=bottom, bottom_store=cfg.model.prefix_cache_dir, teacher=teacher)
    meta = {"mode": "base" if teacher is None else "student", **stats}
    logger.info("%s model: %s", meta["mode"], stats)
    if models is None:  # this task runs where the driver reads
        return str(save_checkpoint(Path(out_dir) / "best", model.cpu(), tokenizer=tokenizer, config=cfg, meta=meta))

    return publish_written(lambda folder: save_checkpoint(folder, model.cpu(), tokenizer=tokenizer, config=cfg,
                                                          meta=meta), join(models, "best"))


def finetune_cpus(cluster, node_cpus: Sequence[float]) -> float:
    """CPUs of the fine-tuning task. On CPUs it takes what the training phase gives its workers
    (it replaces them in that phase; one worker's share would leave the others idle), capped at
    the largest node, since one process runs on one node. On GPUs the work is the GPU's."""
    if cluster.use_gpu:
        return cluster.cpus_per_worker
    want = cluster.num_workers * cluster.cpus_per_worker
    return max(cluster.cpus_per_worker, min(want, max(node_cpus, default=want)))


def run_finetune(cfg, source, dev, seed: int, out_dir: str, run_id: str | None = None,
                 tracking_uri: str | None = None, init_checkpoint: str | None = None,
                 num_steps: int | None = None, storage: str | None = None, teacher=None) -> str:
    """Fine-tune on a worker with the job's training resources (on `teacher`'s soft labels of
    `source`, a `trainer.data.features.Soft` per sentence, where given); returns the checkpoint
    folder, `<out_dir>/best`. The task may run on another node: it publishes the model into
    `storage` (a folder every node sees, or a URI; default `<out_dir>/ray`) and this process
    fetches it."""
    c = cfg.cluster
    cpus = finetune_cpus(c, [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]])
    task = ray.remote(_finetune).options(num_cpus=cpus, num_gpus=1 if c.use_gpu else 0,
                                         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    config = cfg.to_dict()
    if config["model"]["prefix_cache_dir"]:  # the task may run in another working directory
        config["model"]["prefix_cache_dir"] = os.path.abspath(config["model"]["prefix_cache_dir"])
    kind = "base" if teacher is None else "student"
    models = join(storage or os.path.join(os.path.abspath(out_dir), "ray"), f"{kind}-seed{seed}-models")
    published = ray.get(task.remote(config, source, dev, seed, os.path.abspath(out_dir), run_id, tracking_uri,
                                    init_checkpoint, num_steps, max(1, int(cpus)), models, teacher))
    return str(fetch(published, Path(out_dir) / "best"))

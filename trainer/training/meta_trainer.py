"""The meta-training loop, in one place: sample tasks → task gradients → meta-update, with dev
selection and checkpoint cadences, and a state that resumes exactly.

`MetaTrainer` runs in one process with nothing but PyTorch (a laptop, a debugger,
`cluster.num_workers=0`). A distributed caller (cluster/meta_train.py) builds the same trainer
with its rank and world size, so that each rank computes its share of every meta-batch with the
same code, and gives it a meta-update of its own that all-reduces and steps (DeepSpeed's). Which
tasks a step uses depends on (seed, step) alone, so any number of ranks, and a resumed run, see
the same meta-batches.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from trainer.config import affects
from trainer.data.corpus import Sentence
from trainer.data.features import Featurizer, group_windows
from trainer.data.sampling import Task, epoch_of, sample_task_batch, shard_tasks
from trainer.data.scoring import score
from trainer.modules.bottom import FrozenBottom
from trainer.modules.model import NerModel, evaluating
from trainer.training.adapt import adapt_many
from trainer.training.checkpoint import WEIGHTS, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from trainer.training.engine import TaskEngine
from trainer.training.optim import BertAdam, make_optimizer, optimizer_step, ordered_groups, schedule_factor
from trainer.training.predict import predict
from trainer.utils.digest import values_sha256
from trainer.utils.distributed import agree_min, all_gather_object, all_reduce_sum
from trainer.utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def config_fingerprint(cfg) -> dict:
    """The settings a run's weights depend on, as dotted keys (JSON values)."""
    values = {k: v for k, v in cfg.flat().items() if affects(k, "resume")}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _changes_weights(key: str) -> bool:
    try:
        return affects(key, "resume")
    except KeyError:
        return False


def fingerprint_hash(values: dict) -> str:
    return values_sha256(values)


class NullLogger:
    def log_metrics(self, metrics: dict, step: int) -> None:
        pass


# A meta-update: applies the ranks' summed meta-gradient (one tensor per parameter, in the order of
# `ordered_groups`) to those parameters, as one step of the meta optimiser.
MetaUpdate = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


def meta_optimizer(model: NerModel, cfg):
    """(meta optimiser, scheduler) over the model's trainable weights in `ordered_groups` order, as
    `cfg.train` says."""
    groups, _, _ = ordered_groups(model, cfg)
    return make_optimizer(groups, cfg, cfg.train.meta_lr, cfg.train.num_meta_steps)


class MetaTrainer:
    """Owns the model's meta optimiser, the task sampling, the step count and the best dev score.

    `source` are the English sentences whose pseudo tasks are trained on, `support[i]` the ids of
    sentence i's support set; `dev`/`dev_support` select the model (adapted as at test time).
    `metrics_logger` is any object with `log_metrics(dict, step)`.

    `optimizer`: the (meta optimiser, scheduler) of `meta_optimizer(model, cfg)`, made by a caller
    that hands them to an engine before the trainer exists (default: made here). `meta_update`:
    how a summed meta-gradient is applied (default: the meta optimiser's step, `optimizer_update`);
    a distributed caller passes one that all-reduces over the ranks first.
    """

    def __init__(self, model: NerModel, featurizer: Featurizer, cfg, source: Sequence[Sentence],
                 support: np.ndarray, *, seed: int, dev: Sequence[Sentence] = (),
                 dev_support: Sequence[Sequence[Sentence]] = (), rank: int = 0, world_size: int = 1,
                 metrics_logger=None, bottom: Optional[FrozenBottom] = None, optimizer=None,
                 meta_update: Optional[MetaUpdate] = None):
        self.model, self.featurizer, self.cfg, self.seed = model, featurizer, cfg, seed
        self.rank, self.world_size = rank, world_size
        support = np.asarray(support)
        if support.ndim != 2 or len(support) != len(source):
            raise ValueError(f"support must give each of the {len(source)} source sentences its support ids "
                             f"([{len(source)}, K]); got shape {support.shape}")
        self.source, self.support = source, support
        self.windows = group_windows(featurizer.encode(source))
        self.dev, self.dev_support = list(dev), list(dev_support)
        _, self.params, self.names = ordered_groups(model, cfg)
        self.meta_optimizer, self.scheduler = optimizer or meta_optimizer(model, cfg)
        self.meta_update: MetaUpdate = meta_update or self.optimizer_update
        self.bottom = FrozenBottom(model, featurizer) if bottom is None else bottom
        self.engine = TaskEngine(model, featurizer, cfg, self.bottom, seed, self.names)
        self.log = metrics_logger or NullLogger()
        self.step, self.best_f1, self.best_step = 0, -1.0, -1
        self.curve: list[tuple[int, float]] = []  # (step, English-dev F1) of every selection
        self._done_tasks, self._seconds, self._warm = 0, 0.0, False
        # Set by a distributed caller for `cluster.task_balance=dynamic`: step -> a claim of the
        # next chunk, shared by the ranks (trainer.utils.distributed.ChunkClaims).
        self.claims: Optional[Callable[[int], Callable[[], int]]] = None

    # ------------------------------------------------------------------ one meta-step

    def inner_lr(self) -> float:
        train = self.cfg.train
        if not train.schedule_inner_lr:
            return train.inner_lr
        return train.inner_lr * schedule_factor(self.step, train.num_meta_steps, train.warmup_proportion)

    def meta_lr(self) -> float:
        if isinstance(self.meta_optimizer, BertAdam):
            return self.meta_optimizer.current_lr()[0]
        return self.meta_optimizer.param_groups[0]["lr"]

    def batch(self, step: int) -> list[Task]:
        """Meta-step `step`'s tasks, all of them."""
        batch = sample_task_batch(len(self.source), self.cfg.train.meta_batch_size, self.seed, step)
        return [Task(tuple(int(i) for i in self.support[q]), int(q)) for q in batch]

    def tasks(self, step: int) -> list[Task]:
        """This rank's share of meta-step `step`'s tasks, placed by cost (`claims` unset)."""
        batch = self.batch(step)
        return [batch[i] for i in self.share(step, batch)]

    def share(self, step: int, batch: Optional[list[Task]] = None) -> list[int]:
        """Positions in meta-step `step`'s batch of this rank's tasks (`claims` unset)."""
        batch = self.batch(step) if batch is None else batch
        if self.world_size == 1:
            return list(range(len(batch)))
        epoch = epoch_of(step, self.cfg.train.meta_batch_size, len(self.source))
        cost = [self.engine.task_cost(task, self.windows, epoch) for task in batch]
        return sorted(shard_tasks(np.arange(len(batch)), self.rank, self.world_size, cost).tolist())

    def meta_gradient(self, step: int) -> tuple[list[torch.Tensor], dict]:
        """This rank's summed query gradients for meta-step `step` (one tensor per `names`), the
        summed losses and task count, and `summed`: the batch positions whose tasks it summed."""
        epoch = epoch_of(step, self.cfg.train.meta_batch_size, len(self.source))
        if self.engine.capacity is None:
            # Chunks sized to the smallest rank's memory, once: under shared claims every rank
            # must cut the batch into the same chunks, and a size read per step would drift.
            self.engine.capacity = agree_min(self.engine.machine_capacity())
        try:
            batch = self.batch(step)
            if self.claims is not None:  # the ranks share the batch's chunks as each comes free
                return self.engine.meta_gradient(batch, self.windows, epoch, self.inner_lr(),
                                                 claim=self.claims(step), step=step)
            mine = self.share(step, batch)
            buffer, totals = self.engine.meta_gradient([batch[i] for i in mine], self.windows, epoch,
                                                       self.inner_lr())
            totals["summed"] = [mine[i] for i in totals["summed"]]
            return buffer, totals
        except FloatingPointError as err:
            raise FloatingPointError(f"meta-step {step + 1}, rank {self.rank}: {err}") from None

    def _check_summed(self, counts: torch.Tensor) -> None:
        """Every task of the meta-batch summed exactly once over the ranks, or a clear error: a
        task summed twice or skipped changes the meta-gradient without any other sign."""
        twice = (counts > 1).nonzero().flatten().tolist()
        never = (counts == 0).nonzero().flatten().tolist()
        if twice or never:
            raise RuntimeError(
                f"meta-step {self.step + 1}: the ranks summed the query gradients of batch positions {twice} more "
                f"than once and of {never} never (of {len(counts)}); every rank must cut the batch into the same "
                "chunks (the same config, code and train.task_chunk_size on every worker)")

    def optimizer_update(self, params: Sequence[torch.Tensor], buffer: Sequence[torch.Tensor]) -> None:
        """One meta-optimiser step on the summed meta-gradient: the meta-update of one process."""
        for p, g in zip(params, buffer):
            p.grad = g
        optimizer_step(self.meta_optimizer, self.scheduler, self.cfg.train.max_grad_norm)
        self.meta_optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> dict:
        """Meta-step `self.step + 1`: gradients, the update, and the batch's mean losses; the
        seconds of this rank's tasks, of its wait for the other ranks and of the update."""
        started = time.perf_counter()
        buffer, totals = self.meta_gradient(self.step)
        computed = time.perf_counter()
        size = min(self.cfg.train.meta_batch_size, len(self.source))  # the batch's length (sample_task_batch)
        counts = torch.bincount(torch.tensor(totals["summed"], dtype=torch.long), minlength=size).double()
        # Also where every rank waits for the slowest: `time_wait_s` is this rank's idle share.
        stats = all_reduce_sum(torch.cat([torch.tensor([totals["support_loss"], totals["meta_loss"], totals["tasks"]],
                                                       dtype=torch.float64), counts]))
        self._check_summed(stats[3:])
        reduced = time.perf_counter()
        lrs = {"meta_lr": self.meta_lr(), "inner_lr": self.inner_lr()}
        self.meta_update(self.params, buffer)
        self.step += 1
        done = time.perf_counter()
        seconds = done - started
        times = {"time_tasks_s": computed - started, "time_wait_s": reduced - computed, "time_update_s": done - reduced}
        # The first step of a process pays one-time work (compiling, filling the bottom of windows
        # not kept yet): the running rate starts after it.
        if self._warm:
            self._seconds += seconds
            self._done_tasks += int(stats[2])
        self._warm = True
        rate = self._done_tasks / self._seconds if self._seconds else int(stats[2]) / max(seconds, 1e-9)
        return {"support_loss": float(stats[0] / stats[2]), "meta_loss": float(stats[1] / stats[2]),
                "tasks_per_s": rate, **lrs, **times}

    # ------------------------------------------------------------------ selection and the loop

    def evaluate(self) -> float:
        """English-dev F1 of the current weights, adapted to each sentence as at test time.

        Every rank adapts its share of dev (call on every rank): selection costs 1/world_size of
        its single-process time instead of keeping the other ranks waiting. The F1 is the same on
        every rank.
        """
        if not self.dev:
            return float("nan")
        mine = list(range(self.rank, len(self.dev), self.world_size))
        sentences = [self.dev[i] for i in mine]
        with evaluating(self.model):
            if not self.cfg.adapt.enabled:
                tags = predict(self.model, self.featurizer, sentences, self.cfg.adapt.batch_size)
            else:
                tags = adapt_many(self.model, self.featurizer, sentences, [self.dev_support[i] for i in mine],
                                  self.cfg, bottom=self.bottom)
        merged: list = [None] * len(self.dev)
        for r, part in enumerate(all_gather_object(tags)):
            merged[r::self.world_size] = part
        return score([list(s.tags) for s in self.dev], merged)["f1"]

    def prepare(self, progress: bool = False) -> None:
        """The frozen bottom of every source window, computed now (a no-op for those kept already).

        All of them at once rather than as meta-batches need them: the states then do not depend
        on which steps ran before, so that a resumed run continues exactly.
        """
        self.bottom.fill([w for group in self.windows for w in group], progress=progress)

    def fit(self, on_best: Optional[Callable[["MetaTrainer"], None]] = None,
            on_checkpoint: Optional[Callable[["MetaTrainer", dict], None]] = None) -> dict:
        """Meta-train from `self.step` to `train.num_meta_steps`; dev selection every `eval_every`
        steps (every rank adapts its share of dev), `on_best` (rank 0) when the dev score improves, `on_checkpoint` every
        `checkpoint_every` steps and at the end. Returns the last metrics."""
        train = self.cfg.train
        metrics: dict = {}
        self.prepare(progress=self.rank == 0)
        while self.step < train.num_meta_steps:
            metrics = self.train_step()
            last = self.step == train.num_meta_steps
            if self.step % train.eval_every == 0 or last:
                metrics["dev_f1"] = self.evaluate()
                self.curve.append((self.step, float(metrics["dev_f1"])))
                if metrics["dev_f1"] > self.best_f1:
                    self.best_f1, self.best_step = float(metrics["dev_f1"]), self.step
                    if on_best is not None and self.rank == 0:
                        on_best(self)
            self.log.log_metrics(metrics, step=self.step)
            if self.rank == 0 and (self.step % train.log_every == 0 or last):
                logger.info("meta-step %d/%d  meta_loss %.4f  %.1f tasks/s", self.step, train.num_meta_steps,
                            metrics["meta_loss"], metrics["tasks_per_s"])
            if on_checkpoint is not None and (self.step % train.checkpoint_every == 0 or last):
                on_checkpoint(self, {**metrics, "best_f1": self.best_f1})
        return metrics

    # ------------------------------------------------------------------ resume

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """Everything a run needs to continue exactly: trainable weights, meta optimiser and
        scheduler, step, best dev score, RNG states, and the seed and settings it was made with."""
        values = config_fingerprint(self.cfg)
        return {"step": self.step, "best_f1": self.best_f1, "best_step": self.best_step, "seed": self.seed,
                "curve": [list(point) for point in self.curve],
                "config": json.dumps(values, sort_keys=True), "config_hash": fingerprint_hash(values),
                "model": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.meta_optimizer.state_dict() if with_optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": rng_state()}

    def check_resumable(self, state: dict, where: str = "the checkpoint") -> None:
        """Refuse a state written with another seed or other settings, naming the first difference."""
        redo = "start a new run (another --out), or pass force=True to resume anyway"
        if int(state.get("seed", self.seed)) != self.seed:
            raise CheckpointError(f"{where} was written with seed {state['seed']}, this run has seed {self.seed}; "
                                  f"{redo}")
        now = config_fingerprint(self.cfg)
        if "config_hash" not in state or state["config_hash"] == fingerprint_hash(now):
            return
        # A state written by another version may record settings that no longer change the weights
        # (tag.*, before tagging's settings were marked so) or no longer exist: only those that do count.
        then = {k: v for k, v in json.loads(state["config"]).items() if _changes_weights(k)}
        changed = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        if changed:
            key = changed[0]
            raise CheckpointError(f"{where} was written with {key}={then.get(key)!r}, this run has {now.get(key)!r}"
                                  f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; {redo}")

    def load_state_dict(self, state: dict, force: bool = False, where: str = "the checkpoint",
                        optimizer_elsewhere: bool = False) -> None:
        """Continue from `state`; `optimizer_elsewhere`: the caller restores the meta optimiser
        itself (DeepSpeed's partitions under ZeRO 1/2)."""
        if not force:
            self.check_resumable(state, where)
        if state.get("model") is not None:
            by_name = dict(zip(self.names, self.params))
            with torch.no_grad():
                for name, value in state["model"].items():
                    by_name[name].copy_(value)
        if state.get("optimizer") is not None:
            self.meta_optimizer.load_state_dict(state["optimizer"])
        elif not optimizer_elsewhere:
            logger.warning("%s holds no meta optimiser state: its moments restart", where)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        self.step, self.best_f1 = int(state["step"]), float(state.get("best_f1", -1.0))
        self.best_step = int(state.get("best_step", -1))
        self.curve = [(int(step), float(f1)) for step, f1 in state.get("curve", [])]

    def save(self, folder, tokenizer=None, with_optimizer: bool = True) -> Path:
        """A checkpoint folder: the whole model (safetensors), tokenizer, config, and the trainer state."""
        state = self.state_dict(with_optimizer)
        state.pop("model")  # the weights file holds them
        return save_checkpoint(folder, self.model, tokenizer=tokenizer, config=self.cfg,
                               meta={"step": self.step, "best_f1": self.best_f1, "best_step": self.best_step,
                                     "mode": "meta", "dev_curve": [list(p) for p in self.curve]}, trainer_state=state)

    def load(self, folder, force: bool = False, optimizer_elsewhere: bool = False) -> None:
        """Continue from a folder written by `save` (weights and trainer state)."""
        folder = Path(folder)
        state = load_trainer_state(folder)
        if state is None:
            raise CheckpointError(f"{folder} holds no trainer state; give a checkpoint written by meta-training")
        weights = load_file(str(folder / WEIGHTS))
        state["model"] = {n: weights[n] for n in self.names}
        self.load_state_dict(state, force=force, where=str(folder), optimizer_elsewhere=optimizer_elsewhere)
        with torch.no_grad():
            self.model.load_state_dict(weights)

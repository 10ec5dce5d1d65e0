"""First-order MAML over pseudo meta-NER tasks, one task at a time, in place on one model: the
reference implementation that the vectorised engine (trainer/training/engine.py, used by
trainer/training/meta_trainer.py) is tested and benchmarked against.

For each task the trainable parameters are saved (a copy of those tensors only), adapted by
`num_inner_steps` BertAdam steps on the support sentences, the query loss gradient is taken at the
adapted weights, and the meta weights are restored exactly. The meta-gradient of a batch of tasks
is the sum of the per-task query gradients, accumulated in the parameters' `.grad` (one buffer for
the whole batch). All gradients are taken with `torch.autograd.grad`, so inner steps never touch
`.grad`. A distributed caller uses `task_gradients` and places the result in its own buffers.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import torch

from trainer.data.features import Featurizer, Window
from trainer.data.masking import mask_batch, mask_generator, masked_sides
from trainer.data.sampling import Task
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel, in_mode
from trainer.training.inner import adapting
from trainer.training.optim import (
    BertAdam,
    make_optimizer,
    optimizer_step,
    ordered_groups,
    param_groups,
    schedule_factor,
)

logger = logging.getLogger(__name__)

Source = Sequence[Union[Window, Sequence[Window]]]


class MetaLearner:
    """Holds the model, its meta optimiser and the meta-step count."""

    def __init__(self, model: NerModel, featurizer: Featurizer, cfg, seed: int = 0):
        self.model, self.featurizer, self.cfg, self.seed = model, featurizer, cfg, seed
        train = cfg.train
        groups, self.params, self.names = ordered_groups(model, cfg)
        self.meta_optimizer, self.scheduler = make_optimizer(groups, cfg, train.meta_lr, train.num_meta_steps)
        self.mask_support, self.mask_query = masked_sides(train.mask_on)
        self.step = 0

    # ------------------------------------------------------------------ one task

    def inner_lr(self) -> float:
        train = self.cfg.train
        if not train.schedule_inner_lr:
            return train.inner_lr
        return train.inner_lr * schedule_factor(self.step, train.num_meta_steps, train.warmup_proportion)

    def _batch(self, ids: Sequence[int], source: Source, generator: Optional[torch.Generator]):
        windows: list[Window] = []
        for i in ids:
            if not 0 <= i < len(source):
                raise ValueError(f"sentence index {i} is outside the source set of {len(source)} sentences")
            item = source[i]
            windows.extend([item] if isinstance(item, Window) else item)
        batch = self.featurizer.collate(windows)
        batch = {k: v.to(self.params[0].device) for k, v in batch.items()}
        if generator is not None:
            batch = mask_batch(batch, self.featurizer.mask_id, self.cfg.train.mask_ratio, generator,
                               self.featurizer.label2id.get("O", 0))
        return batch

    def _loss(self, batch, task: Task, side: str) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch["attention_mask"])
        loss = token_loss(logits, self.featurizer.loss_labels(batch), self.cfg.train.lambda_max)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"task with query sentence {task.query} (support {list(task.support)}): "
                                     f"the {side} loss is {loss.item()}; lower train.inner_lr/meta_lr or check "
                                     "the sentences")
        return loss

    def task_gradients(self, task: Task, source: Source, epoch: int = 0) -> tuple[list[torch.Tensor], dict]:
        """Query-loss gradient at the support-adapted weights, one tensor per `self.params` entry
        (zeros for a parameter the loss does not reach); the meta weights are restored bit-exactly."""
        generator = mask_generator(self.seed, epoch, task.query)
        support = self._batch(task.support, source, generator if self.mask_support else None)
        query = self._batch([task.query], source, generator if self.mask_query else None)
        train = self.cfg.train
        groups = param_groups(zip(self.names, self.params), train.weight_decay, train.classifier_lr_scale)
        # A fresh optimiser per task, constant rate, as the official inner update.
        with in_mode(self.model, True), adapting(groups, self.inner_lr(), train.max_grad_norm) as adapt:
            for _ in range(train.num_inner_steps):
                support_loss = self._loss(support, task, "support")
                adapt(support_loss)
            query_loss = self._loss(query, task, "query")
            grads = torch.autograd.grad(query_loss, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        return grads, {"support_loss": support_loss.item(), "meta_loss": query_loss.item()}

    def accumulate(self, grads: Sequence[torch.Tensor]) -> None:
        """Add one task's gradients into the parameters' `.grad`."""
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)

    # ------------------------------------------------------------------ a batch of tasks

    def meta_gradient(self, tasks: Sequence[Task], source: Source, epoch: int = 0) -> dict:
        """Add the sum of the tasks' query gradients to `.grad`; mean losses of the batch."""
        if not tasks:
            raise ValueError("meta_gradient needs at least one task")
        totals = {"support_loss": 0.0, "meta_loss": 0.0}
        for task in tasks:
            grads, stats = self.task_gradients(task, source, epoch)
            self.accumulate(grads)
            for key in totals:
                totals[key] += stats[key]
        return {key: value / len(tasks) for key, value in totals.items()}

    def meta_lr(self) -> float:
        if isinstance(self.meta_optimizer, BertAdam):
            return self.meta_optimizer.current_lr()[0]
        return self.meta_optimizer.param_groups[0]["lr"]

    def meta_step(self, tasks: Sequence[Task], source: Source, epoch: int = 0) -> dict:
        """Zero `.grad`, accumulate the batch's meta-gradient, take one meta-optimiser step."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        stats = self.meta_gradient(tasks, source, epoch)
        stats.update(meta_lr=self.meta_lr(), inner_lr=self.inner_lr())
        optimizer_step(self.meta_optimizer, self.scheduler, self.cfg.train.max_grad_norm)
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.meta_optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.meta_optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

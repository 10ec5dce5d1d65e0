"""The adapt verb, in place: steps from the current weights, then the weights back exactly.

Meta-training's inner loop (`MetaLearner.task_gradients`) and test-time adaptation
(`adapt._adapted_sequential`) both take a few BertAdam steps on support sentences from the meta
weights with a fresh optimiser, use the adapted weights once, and must leave the model as it
was. learn2learn does this with `clone()` + `adapt(loss)`; cloning a BERT per task costs a model's
worth of memory, so here the trainable tensors alone are saved and copied back. The vectorised
form of the same verb, over many tasks or sentences at once, is `optim.batched_bertadam_step`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from trainer.training.optim import BertAdam


@contextmanager
def adapting(groups: list[dict], lr: float, max_grad_norm: float) -> Iterator[Callable[[torch.Tensor], None]]:
    """Yields `adapt(loss)`: one step of a fresh BertAdam (constant rate, per-tensor clipping) over
    the parameter `groups` (`optim.param_groups`) along the loss's gradient, taken with
    `torch.autograd.grad` so that `.grad` is never touched. On exit, also on error, every parameter
    of the groups holds its entry value again, bit for bit."""
    params = [p for group in groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer = BertAdam(groups, lr=lr, max_grad_norm=max_grad_norm)

    def adapt(loss: torch.Tensor) -> None:
        optimizer.step_with(torch.autograd.grad(loss, params, allow_unused=True))

    try:
        yield adapt
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

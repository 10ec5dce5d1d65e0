"""Plain fine-tuning on the source language: the paper's "Base Model" row; and a student trained
on a teacher's soft labels (`teacher`), on the same loop.

As in the official code's no-meta scheme: shuffled minibatches of `train.base_batch_size` windows,
the same optimiser and schedule as meta-training over `num_steps`, the loss and entity masking of
`train.lambda_max` / `train.mask_ratio` (masks redrawn every pass over the data; a Base Model
recipe sets both to 0 for plain cross-entropy), and model selection on dev F1. A student's loss is
`soft_loss` against its teacher's probabilities instead (the max term does not apply).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

from trainer.config import EVAL_BATCH_SIZE
from trainer.data.corpus import Sentence
from trainer.data.features import Featurizer, Soft, Window, soft_targets
from trainer.data.masking import mask_batch, mask_generator
from trainer.modules.batched import PACK_FROM, stack_packed
from trainer.modules.bottom import FrozenBottom, keep_source
from trainer.modules.losses import soft_loss, token_loss
from trainer.modules.model import NerModel, trainable_parameters
from trainer.training.optim import make_optimizer, optimizer_step, param_groups
from trainer.training.predict import evaluate

logger = logging.getLogger(__name__)

# Positions per row when a batch's windows go end to end (train.pack_support): English train
# windows average 21 positions on e5-small, and a batch of 32 padded to its longest runs 2.7 times
# the positions it holds; rows of 128 cut that to a few percent, while the attention each row
# computes across its windows' blocks (and masks) stays about a tenth of a layer's work.
PACK_ROW = 128


def _batches(num_windows: int, batch_size: int, seed: int):
    """Endless (epoch, indices) minibatches; each epoch a new permutation fixed by (seed, epoch)."""
    epoch = 0
    while True:
        order = torch.randperm(num_windows, generator=mask_generator(seed, epoch, salt=1)).tolist()
        for start in range(0, num_windows, batch_size):
            yield epoch, order[start:start + batch_size]
        epoch += 1


def _logits(model: NerModel, batch: dict, windows, bottom: Optional[FrozenBottom]) -> torch.Tensor:
    """The whole model's logits, or the trainable top's over the kept frozen bottom."""
    if bottom is None:
        return model(batch["input_ids"], batch["attention_mask"])
    hidden = bottom.gather(windows, batch["input_ids"].shape[1])
    return model(None, model.attention_mask_4d(batch["attention_mask"]), hidden_states=hidden,
                 start_layer=bottom.num_layers)


def pack_rows(lengths: Sequence[int], width: int = PACK_ROW) -> list[list[int]]:
    """Indices of windows of these lengths in rows of at most `width` positions (a longer window
    alone in its row): first fit, longest first, so the same batch always packs alike."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(width, n) - n)
    return rows


def packs(model: NerModel, bottom: Optional[FrozenBottom], train) -> bool:
    """Whether fine-tuning batches go end to end in rows: as `train.pack_support` packs a task's
    support in meta-training (the same layout, exact where `stack_packed` applies)."""
    return (bottom is not None and bool(bottom.num_layers) and model.can_keep()
            and (train.pack_support == "always" or (train.pack_support == "auto" and bottom.hidden_size >= PACK_FROM)))


def _packed_loss(model: NerModel, featurizer: Featurizer, bottom: FrozenBottom, windows: Sequence[Window],
                 lambda_max: float) -> torch.Tensor:
    """The batch's loss with its windows end to end in rows of PACK_ROW (block-diagonal attention,
    the last layer at the loss's positions, the max term per window): the loss of the padded
    batch, on a third of the positions."""
    groups = [[windows[i] for i in row] for row in pack_rows([len(w) for w in windows])]
    s = stack_packed(model, featurizer, bottom, groups, [featurizer.collate(g) for g in groups])
    logits = model(None, s.mask4d[:, 0], hidden_states=s.hidden[:, 0], start_layer=bottom.num_layers,
                   keep=s.keep[:, 0])
    return token_loss(logits, s.kept_targets[:, 0], lambda_max, rows=s.rows[:, 0])


def _train_step(model: NerModel, optimizer, scheduler, batch: dict, targets, train, windows=None,
                bottom: Optional[FrozenBottom] = None, featurizer: Optional[Featurizer] = None,
                teacher: Optional[torch.Tensor] = None) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if teacher is not None:
        loss = soft_loss(_logits(model, batch, windows, bottom), batch["labels"], teacher)
    elif featurizer is not None and packs(model, bottom, train):
        loss = _packed_loss(model, featurizer, bottom, windows, train.lambda_max)
    else:
        loss = token_loss(_logits(model, batch, windows, bottom), targets, train.lambda_max)
    if math.isfinite(loss.item()):
        loss.backward()
        optimizer_step(optimizer, scheduler, train.max_grad_norm)
    return loss.item()


def finetune(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence], cfg, *, seed: int,
             num_steps: Optional[int] = None, dev: Optional[Sequence[Sentence]] = None, metrics_logger=None,
             eval_batch_size: int = EVAL_BATCH_SIZE, bottom: Optional[FrozenBottom] = None,
             bottom_store: Optional[str] = None, teacher: Optional[Sequence[Soft]] = None) -> dict:
    """Train in place; with `dev`, evaluate every `train.eval_every` steps and end on the best weights.

    `teacher`: soft labels of each sentence (a student's training set; the sentences' tags then
    only say which words there are), learnt with `soft_loss`.

    `bottom`: the frozen bottom of the source windows, kept (`trainer.modules.bottom.keep_source`), so that
    each step runs only the trainable top, as meta-training does (frozen layers then run without
    dropout, as in meta-training). Unused when masking changes the inputs (train.mask_ratio > 0).
    `bottom_store`: a folder (model.prefix_cache_dir) where those states are read or saved for
    every later run with the same frozen weights.

    Returns {"steps", "last_loss", "best_f1", "best_step", "dev_curve": [[step, F1], ...]}; `metrics_logger` is any object with
    `log_metrics(dict, step)`.
    """
    train = cfg.train
    num_steps = train.num_meta_steps if num_steps is None else num_steps
    windows = featurizer.encode(sentences)
    if not windows:
        raise ValueError("finetune got no sentences to train on")
    if teacher is not None and len(teacher) != len(sentences):
        raise ValueError(f"{len(sentences)} sentences but soft labels of {len(teacher)}")
    targets = soft_targets(windows, teacher) if teacher is not None else None
    if bottom is not None and (not bottom.num_layers or train.mask_ratio > 0):
        bottom = None
    if bottom is not None and bottom_store:
        keep_source(bottom, bottom_store, windows)
    elif bottom is not None:
        bottom.fill(windows, progress=True)
    named = trainable_parameters(model)
    # The official no-meta scheme trains with the meta learning rate and schedule.
    optimizer, scheduler = make_optimizer(param_groups(named, train.weight_decay, train.classifier_lr_scale), cfg,
                                          train.meta_lr, num_steps)
    device = next(model.parameters()).device
    best = {"best_f1": -1.0, "best_step": -1}
    best_state = None
    curve: list = []
    loss_value = float("nan")
    batches = _batches(len(windows), train.base_batch_size, seed)
    for step in range(num_steps):
        epoch, idx = next(batches)
        chosen = [windows[i] for i in idx]
        batch = featurizer.collate(chosen)
        batch = mask_batch(batch, featurizer.mask_id, train.mask_ratio, mask_generator(seed, epoch, salt=step + 2),
                           featurizer.label2id.get("O", 0))
        batch = {k: v.to(device) for k, v in batch.items()}
        soft = torch.cat([targets[i] for i in idx]).to(device) if targets is not None else None
        loss_value = _train_step(model, optimizer, scheduler, batch, featurizer.loss_labels(batch), train, chosen, bottom,
                                 featurizer, soft)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"fine-tuning step {step}: loss is {loss_value}; lower train.meta_lr")
        if metrics_logger is not None:
            metrics_logger.log_metrics({"train_loss": loss_value}, step + 1)
        if (step + 1) % train.log_every == 0 or step + 1 == num_steps:
            logger.info("fine-tuning step %d/%d  loss %.4f", step + 1, num_steps, loss_value)
        # Selection after every eval_every-th update, counted as meta-training counts its steps,
        # so that English-dev curves of both modes share their x axis.
        if dev and ((step + 1) % train.eval_every == 0 or step == num_steps - 1):
            f1 = evaluate(model, featurizer, dev, eval_batch_size)["f1"]
            curve.append([step + 1, f1])
            if metrics_logger is not None:
                metrics_logger.log_metrics({"dev_f1": f1}, step + 1)
            if f1 > best["best_f1"]:
                best = {"best_f1": f1, "best_step": step + 1}
                best_state = {n: p.detach().clone() for n, p in named}
    if best_state is not None:
        with torch.no_grad():
            for n, p in named:
                p.copy_(best_state[n])
    model.eval()
    return {"steps": num_steps, "last_loss": loss_value, **best, "dev_curve": curve}

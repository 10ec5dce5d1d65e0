"""The baseline: the official Meta-Cross loop (microsoft/vert-papers, papers/Meta-Cross/learner.py),
re-implemented on this project's model, features and BertAdam, so that a ratio measured against it
isolates the loop's structure.

Faithful to the official code:
- every window is padded to `max_seq_len` = 128 subwords (the official features are tensors of
  that fixed width; no dynamic padding);
- test-time adaptation runs one sentence at a time (its `get_batch_meta(batch_size=1)`): a fresh
  BertAdam on the trainable groups (decay 0.01 / none for biases and LayerNorm) for every
  sentence, `zero_grad` / `backward` / `step` through `.grad` with the model in train mode
  (dropout on), then an eval-mode forward of the sentence, then a restore of the trainable weights;
- the restore is the official `load_weights`: a `copy.deepcopy` of the trainable parameters taken
  once per pass, copied back per sentence (per task in meta-training) through a fresh
  `model.state_dict()` lookup;
- meta-training keeps one tuple of query gradients per task (`meta_grad.append(grad)`), 32 of
  them for a meta-batch of 32, and only then sums them into `.grad` (`load_gradients`) for one
  meta BertAdam step with warm-up; the inner learning rate follows the same warm-up schedule;
- entity masking of the query, max loss (lambda) in meta-training, plain CE at test time.

Simplified or changed:
- the encoder is trainer.modules.model.NerModel (any Hugging Face encoder + linear head), not the
  official BertForTokenClassification_ with segment ids and its extra "X" label;
- long sentences are cut into windows by trainer.data.features (the official code truncates them),
  and each window is padded to 128, so a 2-window sentence is a batch of 2 rows;
- sentences are featurised from `Sentence` objects inside the timed region for the adaptation
  pass (the official code featurises whole corpora at load time; the contender pays the same
  cost, so the comparison is like for like), and once up front for meta-training, as both the
  official code and trainer.training.reference do;
- no per-step logging, no conlleval subprocess, no GPU-specific code path (tensors are moved to
  the model's device).
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch

from trainer.data.features import Featurizer, Window, labelled_predictions
from trainer.data.masking import mask_batch, mask_generator
from trainer.data.sampling import Task
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel
from trainer.training.optim import BertAdam, param_groups, schedule_factor

logger = logging.getLogger(__name__)

MAX_SEQ_LEN = 128


def pad_to(featurizer: Featurizer, windows: Sequence[Window], length: int) -> dict[str, torch.Tensor]:
    """A batch of windows each padded to `length` (the official fixed-width features)."""
    if any(len(w) > length for w in windows):
        raise ValueError(f"a window is longer than {length}; build the featurizer with max_length <= {length}")
    return featurizer.collate(windows, width=length)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (nested lists/tuples allowed; None skipped)."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if x is None:
            return
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
            return
        key = x.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += x.untyped_storage().nbytes()

    walk(tensors)
    return total


class OfficialLearner:
    """The official Learner's loops around a NerModel (see the module docstring)."""

    def __init__(self, model: NerModel, featurizer: Featurizer, cfg, seed: int = 0, max_seq_len: int = MAX_SEQ_LEN):
        self.model, self.featurizer, self.cfg, self.seed = model, featurizer, cfg, seed
        self.max_seq_len = max_seq_len
        train = cfg.train
        self.opt = BertAdam(self._grouped(), lr=train.meta_lr, warmup=train.warmup_proportion,
                            t_total=train.num_meta_steps, weight_decay=train.weight_decay,
                            max_grad_norm=train.max_grad_norm)
        self.step = 0
        self.last_grad_bytes = 0
        self.last_grad_copies = 0

    # ------------------------------------------------------------------ as the official Learner

    def _grouped(self) -> list[dict]:
        return param_groups(self.model.named_parameters(), self.cfg.train.weight_decay)

    def get_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def get_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def load_weights(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        state = self.model.state_dict()
        for n, p in zip(names, params):
            state[n].data.copy_(p.data)

    def load_gradients(self, names: Sequence[str], grads: Sequence[torch.Tensor]) -> None:
        state = self.model.state_dict(keep_vars=True)
        for n, g in zip(names, grads):
            state[n].grad.data.add_(g.data)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _padded(self, windows: Sequence[Window]) -> dict[str, torch.Tensor]:
        return {k: v.to(self._device()) for k, v in pad_to(self.featurizer, windows, self.max_seq_len).items()}

    def _loss(self, batch: dict, lambda_max: float) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch["attention_mask"])
        return token_loss(logits, self.featurizer.loss_labels(batch), lambda_max)

    def inner_update(self, support: dict, lr: float, steps: int, lambda_max: float) -> float:
        inner = BertAdam(self._grouped(), lr=lr, weight_decay=self.cfg.train.weight_decay,
                         max_grad_norm=self.cfg.train.max_grad_norm)
        self.model.train()
        loss = torch.zeros(())
        for _ in range(steps):
            inner.zero_grad(set_to_none=False)
            loss = self._loss(support, lambda_max)
            loss.backward()
            inner.step()
        return loss.item()

    # ------------------------------------------------------------------ meta-training

    def inner_lr(self) -> float:
        train = self.cfg.train
        if not train.schedule_inner_lr:
            return train.inner_lr
        return train.inner_lr * schedule_factor(self.step, train.num_meta_steps, train.warmup_proportion)

    def task_batches(self, task: Task, source: Sequence[Sequence[Window]], epoch: int) -> tuple[dict, dict]:
        """(query, support) of a task at fixed width; the query's entities masked as trainer.training.reference does."""
        support = self._padded([w for i in task.support for w in source[i]])
        query = self._padded(list(source[task.query]))
        generator = mask_generator(self.seed, epoch, task.query)
        query = mask_batch(query, self.featurizer.mask_id, self.cfg.train.mask_ratio, generator,
                           self.featurizer.label2id.get("O", 0))
        return query, support

    def meta_gradients(self, tasks: Sequence[Task], source: Sequence[Sequence[Window]], epoch: int = 0):
        """One query-gradient tuple per task, as the official `forward_meta` collects them."""
        train = self.cfg.train
        names, params = self.get_names(), self.get_params()
        weights = copy.deepcopy(params)
        lr_inner = self.inner_lr()
        meta_grad, meta_loss = [], []
        for task in tasks:
            query, support = self.task_batches(task, source, epoch)
            self.inner_update(support, lr_inner, train.num_inner_steps, train.lambda_max)
            loss = self._loss(query, train.lambda_max)
            meta_grad.append(torch.autograd.grad(loss, params))
            meta_loss.append(loss.item())
            self.load_weights(names, weights)
        return names, meta_grad, meta_loss

    def meta_step(self, tasks: Sequence[Task], source: Sequence[Sequence[Window]], epoch: int = 0) -> dict:
        names, meta_grad, meta_loss = self.meta_gradients(tasks, source, epoch)
        # What is held at the meta-update: every task's copy plus `.grad` that receives their sum.
        self.last_grad_copies = len(meta_grad) + 1
        self.last_grad_bytes = tensor_bytes(meta_grad) + tensor_bytes([p.grad for p in self.get_params()])
        self.opt.zero_grad(set_to_none=False)
        for g in meta_grad:
            self.load_gradients(names, g)
        self.opt.step()
        self.step += 1
        return {"meta_loss": sum(meta_loss) / len(meta_loss)}

    # ------------------------------------------------------------------ test-time adaptation

    def adapt_and_predict(self, sentences, supports, adapt_lr: float, num_adapt_steps: int,
                          lambda_max: float = 0.0) -> list[list[str]]:
        """The official `evaluate_meta` loop: per sentence adapt on its support, tag it, restore."""
        if len(sentences) != len(supports):
            raise ValueError(f"{len(sentences)} sentences but {len(supports)} support sets")
        names, params = self.get_names(), self.get_params()
        weights = copy.deepcopy(params)
        was_training = self.model.training
        out = []
        try:
            for sentence, support in zip(sentences, supports):
                if num_adapt_steps > 0 and support:
                    self.inner_update(self._padded(self.featurizer.encode(support)), adapt_lr, num_adapt_steps,
                                      lambda_max)
                windows = self.featurizer.encode([sentence])
                query = self._padded(windows)
                self.model.eval()
                with torch.no_grad():
                    logits = self.model(query["input_ids"], query["attention_mask"])
                out.append(self.featurizer.merge([sentence], windows,
                                                 labelled_predictions(logits, query["labels"]))[0])
                self.load_weights(names, weights)
        finally:
            self.model.train(was_training)
        return out


def grad_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of the `.grad` buffers of `params` (what a single accumulated meta-gradient holds)."""
    return tensor_bytes([p.grad for p in params])


def trainable_bytes(model: torch.nn.Module, dtype_bytes: Optional[int] = None) -> int:
    """Bytes of one copy of the trainable parameters (= one gradient copy)."""
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in model.parameters() if p.requires_grad)

"""Vectorised first-order MAML: the inner loops of many tasks at once, over the trainable top only.

For a chunk of tasks, every support and query set is stacked into [tasks, windows, length]
tensors (filler windows attend to their first position and carry no label), or, packed
(`train.pack_support`), each task's windows end to end in one row with a block-diagonal mask; the
last layer runs only at the positions the loss reads. The frozen bottom comes from `FrozenBottom`
(a masked window, whose input changed, has its own bottom computed afresh). Chunks of a
meta-batch are as even as can be. Then, with torch.func, each task gets its own copy of the
trainable weights (kept buffers, see `_weight_copies`):
`num_inner_steps` vmapped gradients on the supports, each followed by a BertAdam step for every
task at once (`batched_bertadam_step`: fresh state, constant rate, per-tensor clipping per task),
then the vmapped query gradient at the adapted weights, summed over the chunk. The result equals
`MetaLearner.task_gradients` summed over the tasks (tests/test_engine.py), without the bottom's
forward per inner step and without a Python loop over tasks.

Differences from the per-task path, both deliberate: the frozen bottom runs in eval mode (no
dropout in layers that never change); dropout in the trainable top draws independently per task
(vmap randomness="different") rather than from one sequential stream.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.func import grad_and_value, vmap

from trainer.data.features import Featurizer
from trainer.data.masking import mask_batch, mask_generator, masked_sides
from trainer.data.sampling import Task
from trainer.modules.batched import PACK_FROM, VMAP_ATTENTION, Stacked, Top, quiet_vmap, stack, stack_packed
from trainer.modules.bottom import FrozenBottom, available_bytes
from trainer.modules.model import NerModel, attention, encoder_layers, in_mode
from trainer.training.optim import batched_bertadam_step

logger = logging.getLogger(__name__)

CPU_CHUNK_BYTES = 64 * 2 ** 20
# Fewest tasks per chunk on a CPU, memory allowing: with larger weight copies the byte budget
# above would leave one task per chunk, whose per-task matmuls are too small to run fast. On
# e5-small with 4 of 12 layers frozen (14.2 M trainable weights, 57 MB per copy), one thread:
# 1.29 tasks/s at 1 task per chunk, 2.22 at 4, 2.19 at 8 (AMD EPYC, 2026-12-02).
CPU_MIN_CHUNK = 4
COMPILE_FROM = 1_000_000  # trainable weights per copy from which train.compile_updates=auto compiles


def even_chunks(count: int, size: int) -> list[slice]:
    """`count` items in as few chunks of at most `size` as can hold them, as even as can be: at
    most two chunk sizes, one apart, so that a chunk of one (a size torch compiles apart) is left
    only where chunks of two or one must be."""
    chunks = -(-count // size)
    base, extra = divmod(count, chunks) if chunks else (0, 0)
    out, start = [], 0
    for i in range(chunks):
        stop = start + base + (i < extra)
        out.append(slice(start, stop))
        start = stop
    return out


class TaskEngine:
    """Summed query gradients of batches of pseudo tasks, vectorised (see module doc)."""

    def __init__(self, model: NerModel, featurizer: Featurizer, cfg, bottom: FrozenBottom, seed: int,
                 names: Sequence[str]):
        self.model, self.featurizer, self.cfg, self.bottom, self.seed = model, featurizer, cfg, bottom, seed
        params = dict(model.named_parameters())
        # The order of the meta optimiser; the pooler never reaches the loss (NerModel reads the
        # last hidden states), so it gets a zero gradient without being copied per task.
        self.names = list(names)
        self.used = [n for n in self.names if not n.startswith("encoder.pooler.")]
        self._used = set(self.used)
        self.params = [params[n] for n in self.names]
        self.top = Top(model, bottom.num_layers)
        one_copy = sum(p.numel() for n, p in zip(self.names, self.params) if n in self._used)
        mode = cfg.train.compile_updates
        self.compiled = mode == "always" or (mode == "auto" and one_copy >= COMPILE_FROM)
        self.mask_support, self.mask_query = masked_sides(cfg.train.mask_on)
        pack = cfg.train.pack_support
        self.packed = bool(bottom.num_layers) and model.can_keep() and (
            pack == "always" or (pack == "auto" and bottom.hidden_size >= PACK_FROM))
        self._copies: dict[int, dict[str, torch.Tensor]] = {}
        # Tasks per chunk (see machine_capacity): None until the first chunk is formed, or set by
        # a distributed caller to what every rank agrees on; `budget_bytes` overrides the memory
        # budget the machine's capacity is read from.
        self.capacity: Optional[int] = None
        self.budget_bytes: Optional[int] = None

    # ------------------------------------------------------------------ chunks

    def chunk_size(self, num_tasks: int) -> int:
        """Tasks per vectorised chunk: `train.task_chunk_size`, or `capacity` (sized to the
        machine once, see `machine_capacity`), at most `num_tasks`."""
        if self.cfg.train.task_chunk_size:
            return min(self.cfg.train.task_chunk_size, num_tasks)
        if self.capacity is None:
            self.capacity = self.machine_capacity()
        return max(1, min(self.capacity, num_tasks))

    def machine_capacity(self) -> int:
        """Tasks per chunk that this process's memory budget holds.

        On a GPU, a quarter of the memory PyTorch can have (free plus what its allocator caches
        unused: `mem_get_info` alone counts the cache as used, and would shrink after the first
        step) at about eight copies of the trainable weights per task (weights, moments, gradients,
        temporaries). On a CPU, chunks whose weight copies stay within CPU_CHUNK_BYTES: every pass
        over larger fresh tensors pays page faults, and measured on e5-small (3.5 M trainable) 4
        tasks per chunk ran twice as fast as 32; but at least CPU_MIN_CHUNK where a quarter of the
        free memory holds their eight copies each. `budget_bytes`, where set, replaces either
        budget (bytes of a chunk's weight copies).

        Computed once per engine: the ranks of a distributed meta-step must map the shared chunk
        claims onto the same chunks, so a caller with several ranks agrees on the smallest of
        theirs and sets `capacity` (MetaTrainer does, before its first step).
        """
        one_copy = max(1, sum(p.numel() * p.element_size() for n, p in zip(self.names, self.params) if n in self._used))
        fits = int(self.chunk_budget() // one_copy)
        if self.budget_bytes is None and self.bottom.device.type == "cpu":
            free = available_bytes(self.bottom.device)
            room = CPU_MIN_CHUNK if free is None else int(0.25 * free / 8 // one_copy)
            fits = max(fits, min(CPU_MIN_CHUNK, room))
        return max(1, fits)

    def chunk_budget(self) -> int:
        """Bytes that one chunk's copies of the trainable weights may take (see machine_capacity)."""
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        device = self.bottom.device
        if device.type == "cuda":
            usable = available_bytes(device) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(0.25 * usable / 8)
        return CPU_CHUNK_BYTES

    def _support_width(self, task: Task, source) -> int:
        """What a task's support is padded to: chunks are formed of tasks of similar width."""
        lengths = [len(w) for i in task.support for w in source[i]]
        return sum(lengths) if self.packed else max(lengths)

    def task_cost(self, task: Task, source, epoch: int) -> float:
        """A task's work, in positions that the trainable layers run forward and backward: its
        inner steps over the support, its query, and the frozen bottom of its masked windows (a
        forward of the frozen layers, against about three forwards of the trainable ones per
        position). What a distributed meta-step places each rank's share by."""
        def positions(ids) -> int:
            return sum(len(w) for i in ids for w in source[i])

        cost = float(self.cfg.train.num_inner_steps * positions(task.support) + positions((task.query,)))
        frozen = self.bottom.num_layers
        if frozen and (self.mask_support or self.mask_query) and self.cfg.train.mask_ratio > 0:
            masked = sum(len(windows[i]) for windows, _, rows in self._prepare(task, source, epoch) for i in rows)
            trainable = max(1, len(encoder_layers(self.model.encoder)) - frozen)
            cost += masked * frozen / (3 * trainable)
        return cost

    def _weight_copies(self, count: int) -> dict[str, torch.Tensor]:
        """Buffers for `count` tasks' copies of the trainable weights, kept from chunk to chunk: the
        first inner step writes them and later ones update them in place (see batched_bertadam_step).
        One set per chunk size, whole tensors rather than slices of a larger set: the compiled
        steps would be compiled again for views of another size (20 s a time on e5-small)."""
        copies = self._copies.get(count)
        if copies is None:
            if len(self._copies) >= 2:  # even_chunks makes at most two sizes per meta-batch
                self._copies.pop(next(iter(self._copies)))
            copies = self._copies[count] = {n: torch.empty(count, *p.shape, dtype=p.dtype, device=p.device)
                                            for n, p in self.params_dict().items()}
        return copies

    def params_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params) if n in self._used}

    def _prepare(self, task: Task, source, epoch: int) -> tuple[tuple, tuple]:
        """(support, query) of a task, each (windows, collated batch, rows changed by masking); the
        masks come from one generator per task, support first, as in MetaLearner."""
        generator = mask_generator(self.seed, epoch, task.query)
        sides = []
        for ids, masked in ((task.support, self.mask_support), ((task.query,), self.mask_query)):
            windows = [w for i in ids for w in source[i]]
            batch = self.featurizer.collate(windows)
            rows: list[int] = []
            if masked:
                plain = batch["input_ids"]
                batch = mask_batch(batch, self.featurizer.mask_id, self.cfg.train.mask_ratio, generator,
                                   self.featurizer.label2id.get("O", 0))
                rows = (batch["input_ids"] != plain).any(dim=1).nonzero().flatten().tolist()
            sides.append((windows, batch, rows))
        return sides[0], sides[1]

    def _masked_states(self, prepared) -> dict:
        """The bottom of every masked window of a meta-batch, computed together (in batches of
        similar length rather than a few rows per chunk)."""
        rows = {tuple(batch["input_ids"][i, : len(windows[i])].tolist())
                for side in prepared for windows, batch, changed in side for i in changed}
        return self.bottom.compute_windows(sorted(rows, key=len))

    def _stack(self, sides, fresh: dict) -> Stacked:
        args = ([w for w, _, _ in sides], [b for _, b, _ in sides], [c for _, _, c in sides], fresh)
        if self.packed:
            return stack_packed(self.model, self.featurizer, self.bottom, *args)
        return stack(self.model, self.featurizer, self.bottom, *args, keep=True)

    def _keep(self, step: int) -> bool | str:
        """What the inner step `step` keeps of BertAdam's state for the next (see batched_bertadam_step)."""
        left = self.cfg.train.num_inner_steps - step - 1
        if left == 0:
            return False
        return "second_last" if left == 1 and step == 0 else True

    def _check(self, losses: torch.Tensor, tasks, side: str) -> None:
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            task = tasks[bad[0]]
            raise FloatingPointError(f"task with query sentence {task.query} (support {list(task.support)}): the "
                                     f"{side} loss is {losses[bad[0]].item()}; lower train.inner_lr/meta_lr or "
                                     "check the sentences")

    def chunk_gradient(self, tasks, prepared, fresh: dict, inner_lr: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(summed query gradients by name, support losses [C], query losses [C]) of one chunk;
        `prepared` are its tasks' `_prepare`d sides, `fresh` the states of masked windows."""
        train = self.cfg.train
        support = self._stack([p[0] for p in prepared], fresh)
        query = self._stack([p[1] for p in prepared], fresh)
        loss = self.top.loss_fn(train.lambda_max)
        randomness = "different" if self.model.training else "error"
        params, state = self.params_dict(), None
        with quiet_vmap():
            for step in range(train.num_inner_steps):
                grads, support_loss = vmap(grad_and_value(loss), in_dims=support.loss_dims(None if step == 0 else 0),
                                           randomness=randomness)(params, *support.loss_args())
                self._check(support_loss, tasks, "support")
                params, state = batched_bertadam_step(
                    params, grads, state, lr=inner_lr, weight_decay=train.weight_decay,
                    max_grad_norm=train.max_grad_norm, classifier_lr_scale=train.classifier_lr_scale,
                    keep_state=self._keep(step), compiled=self.compiled,
                    out=self._weight_copies(len(tasks)) if step == 0 else None)
                del grads
            grads, query_loss = vmap(grad_and_value(loss), in_dims=query.loss_dims(0), randomness=randomness)(
                params, *query.loss_args())
        self._check(query_loss, tasks, "query")
        return {n: g.sum(0) for n, g in grads.items()}, support_loss.detach(), query_loss.detach()

    def meta_gradient(self, tasks, source, epoch: int, inner_lr: float,
                      claim: Optional[Callable[[], int]] = None, step: int = 0) -> tuple[list[torch.Tensor], dict]:
        """Sum over `tasks` of the query gradients at the support-adapted weights, one tensor per
        name in `names` order, and the summed losses {"support_loss", "meta_loss", "tasks"}.

        With `claim` (a counter shared by the ranks of a distributed meta-step: each call gives
        the next chunk's index), `tasks` is the whole meta-batch, and this rank computes the chunks
        it claims until none is left (the widest first): a rank that the machine slows down takes
        fewer, instead of keeping the others waiting at the all-reduce. A claimed chunk's dropout
        is drawn from (seed, step, chunk), whichever rank runs it.
        """
        buffer = {n: torch.zeros_like(p) for n, p in zip(self.names, self.params)}
        totals = {"support_loss": 0.0, "meta_loss": 0.0, "tasks": 0.0}
        summed: list[int] = []  # which of `tasks` (by index) this call summed, for the caller to check
        if tasks:
            order = sorted(range(len(tasks)), key=lambda i: self._support_width(tasks[i], source))
            parts = even_chunks(len(order), self.chunk_size(len(order)))
            with in_mode(self.model, True), attention(self.model, VMAP_ATTENTION):
                if claim is None:
                    prepared = [self._prepare(tasks[i], source, epoch) for i in order]
                    fresh = self._masked_states(prepared)
                    for part in parts:
                        chunk = [tasks[i] for i in order[part]]
                        self._add(buffer, totals, self.chunk_gradient(chunk, prepared[part], fresh, inner_lr))
                        summed += order[part]
                else:
                    # Widest chunks first: the last ones claimed, which decide how long the others
                    # wait at the all-reduce, are then the shortest.
                    while (i := claim()) < len(parts):
                        ids = order[parts[len(parts) - 1 - i]]
                        chunk = [tasks[j] for j in ids]
                        prepared = [self._prepare(task, source, epoch) for task in chunk]
                        with self._seeded(step, i):
                            self._add(buffer, totals, self.chunk_gradient(
                                chunk, prepared, self._masked_states(prepared), inner_lr))
                        summed += ids
        if not all(math.isfinite(v) for v in totals.values()):
            raise FloatingPointError("a loss of the meta-batch is not finite")
        totals["summed"] = summed
        return [buffer[n] for n in self.names], totals

    @staticmethod
    def _add(buffer: dict, totals: dict, chunk: tuple[dict, torch.Tensor, torch.Tensor]) -> None:
        grads, support_loss, query_loss = chunk
        for n, g in grads.items():
            buffer[n].add_(g)
        totals["support_loss"] += float(support_loss.sum())
        totals["meta_loss"] += float(query_loss.sum())
        totals["tasks"] += len(support_loss)

    @contextmanager
    def _seeded(self, step: int, chunk: int) -> Iterator[None]:
        """The global generators seeded from (seed, step, chunk) inside, restored after."""
        device = self.bottom.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(((self.seed * 1_000_003 + step) * 65_537 + chunk) % (2 ** 63 - 1))
            yield

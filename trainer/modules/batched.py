"""The batched pieces that meta-training (trainer.training.engine) and test-time adaptation
(trainer.training.adapt) share: many tasks' (or sentences') windows stacked into [tasks, windows,
length] tensors, or packed end to end in one row per task with a block-diagonal mask, over the
kept frozen bottom; and the trainable top as a pure function of its weights, for torch.func's
vmap over per-task weight copies.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.func import functional_call

from trainer.data.features import IGNORE, Featurizer, Window
from trainer.modules.bottom import FrozenBottom
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel

# Attention under vmap: torch has no batching rule for the fused CPU attention kernel (SDPA) and
# runs it once per task; the plain matmul/softmax form batches, several times faster on small models.
VMAP_ATTENTION = "eager"
PACK_FROM = 256  # hidden size from which train.pack_support=auto packs


@dataclass
class Stacked:
    """Groups of windows as [B, W, T] tensors on the model's device (W is 1 when packed)."""

    ids: torch.Tensor
    mask4d: torch.Tensor  # [B, W, 1, T, T] additive
    labels: torch.Tensor  # first-subword labels (what predictions are read at)
    targets: torch.Tensor  # what the loss is taken against (featurizer.loss_labels)
    hidden: Optional[torch.Tensor]  # [B, W, T, H] frozen-bottom states, None without a frozen bottom
    keep: Optional[torch.Tensor] = None  # [B, W, S] the positions the loss reads (see loss_positions)
    kept_targets: Optional[torch.Tensor] = None  # targets at `keep`
    rows: Optional[torch.Tensor] = None  # [B, W, R, S] packed: which kept positions are each window's

    @property
    def hidden_dim(self) -> Optional[int]:
        return None if self.hidden is None else 0

    def loss_args(self) -> tuple:
        """(ids, mask4d, hidden, keep, rows, targets) as `Top.loss_fn` takes them."""
        targets = self.targets if self.keep is None else self.kept_targets
        return self.ids, self.mask4d, self.hidden, self.keep, self.rows, targets

    def loss_dims(self, params_dim: Optional[int]) -> tuple:
        """vmap's in_dims for (params, *loss_args())."""
        return (params_dim, 0, 0, self.hidden_dim, None if self.keep is None else 0,
                None if self.rows is None else 0, 0)


def loss_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([..., S] positions, targets there): each row's labelled positions first, in order, S the
    most any row has; the rest of a row points at unlabelled positions (target IGNORE)."""
    labelled = (targets != IGNORE).to(torch.int32)
    width = max(1, int(labelled.sum(-1).max()))
    keep = torch.sort(labelled, dim=-1, descending=True, stable=True).indices[..., :width]
    return keep, targets.gather(-1, keep)


def _changed_rows(groups: Sequence[Sequence[Window]], batches: Sequence[dict],
                  changed: Optional[Sequence[Sequence[int]]]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(group, row, ids) of every window whose ids its batch changed (entity masking)."""
    rows = []
    for b, (group, batch) in enumerate(zip(groups, batches)):
        for i in range(len(group)) if changed is None else changed[b]:
            row = tuple(batch["input_ids"][i, : len(group[i])].tolist())
            if row != group[i].input_ids:
                rows.append((b, i, row))
    return rows


def _bottom_states(bottom: FrozenBottom, groups: Sequence[Sequence[Window]], rows, fresh: Optional[dict]):
    """states(b, i): the frozen bottom of window i of group b; a changed window's (`rows`, from
    `_changed_rows`) from `fresh` (ids -> states) or computed and not kept, every other's from
    (and added to) `bottom`."""
    changed = {(b, i): row for b, i, row in rows}
    bottom.fill([w for b, g in enumerate(groups) for i, w in enumerate(g) if (b, i) not in changed])
    fresh = dict(fresh or {})
    fresh.update(bottom.compute_windows([row for row in changed.values() if row not in fresh]))

    def states(b: int, i: int) -> torch.Tensor:
        row = changed.get((b, i))
        return bottom.states[groups[b][i].input_ids] if row is None else fresh[row]
    return states


def stack(model: NerModel, featurizer: Featurizer, bottom: FrozenBottom, groups: Sequence[Sequence[Window]],
          batches: Optional[Sequence[dict]] = None, changed: Optional[Sequence[Sequence[int]]] = None,
          fresh: Optional[dict] = None, keep: bool = False) -> Stacked:
    """Stack groups of windows; `batches` are the groups' collated (possibly masked) batches, and
    `changed[b]` the rows of group b whose ids its batch changed (entity masking), if known.

    A changed window's bottom is taken from `fresh` (ids -> states, computed by the caller) or
    computed here, and not kept; every other window's bottom comes from (and is added to) `bottom`.
    With `keep` (and a model that `can_keep`), the loss's positions are gathered: the last layer then
    runs only there, which a loss needs and predictions at every position do not.
    """
    batches = [featurizer.collate(g) for g in groups] if batches is None else batches
    count, width = max(len(g) for g in groups), max(b["input_ids"].shape[1] for b in batches)
    ids = torch.full((len(groups), count, width), featurizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    targets = torch.full_like(ids, IGNORE)
    mask[:, :, 0] = 1
    for b, (group, batch) in enumerate(zip(groups, batches)):
        n, t = batch["input_ids"].shape
        ids[b, :n, :t], mask[b, :n, :t] = batch["input_ids"], batch["attention_mask"]
        labels[b, :n, :t], targets[b, :n, :t] = batch["labels"], featurizer.loss_labels(batch)
    device = bottom.device
    mask4d = model.attention_mask_4d(mask.view(-1, width).to(device))
    mask4d = mask4d.view(len(groups), count, *mask4d.shape[1:])
    hidden = None
    if bottom.num_layers:
        states = _bottom_states(bottom, groups, _changed_rows(groups, batches, changed), fresh)
        hidden = torch.zeros(len(groups), count, width, bottom.hidden_size, device=device, dtype=bottom.top_dtype)
        for b, group in enumerate(groups):
            for i, w in enumerate(group):
                hidden[b, i, : len(w)] = states(b, i)
    kept = kept_targets = None
    if keep and model.can_keep():
        kept, kept_targets = (t.to(device) for t in loss_positions(targets))
    return Stacked(ids.to(device), mask4d, labels.to(device), targets.to(device), hidden, kept, kept_targets)


def stack_packed(model: NerModel, featurizer: Featurizer, bottom: FrozenBottom, groups: Sequence[Sequence[Window]],
                 batches: Sequence[dict], changed: Optional[Sequence[Sequence[int]]] = None,
                 fresh: Optional[dict] = None) -> Stacked:
    """Each group's windows end to end in one row ([B, 1, L]), each window attending to its own
    positions only (a block-diagonal mask), the loss's positions kept (as `stack(keep=True)`) and
    its max term taken per window (`rows`). The same loss as `stack`'s layout, with padding only
    between groups rather than up to the longest window of all: a group's windows (a task's
    support) differ in length. Exact where the layers above the frozen bottom see no positions
    (absolute position embeddings), which `model.can_keep()` checks; the bottom is required."""
    if not (bottom.num_layers and model.can_keep()):
        raise ValueError("stack_packed needs a frozen bottom and a model that can_keep; use stack")
    lengths = [[len(w) for w in g] for g in groups]
    count, width = max(len(g) for g in groups), max(sum(n) for n in lengths)
    ids = torch.full((len(groups), width), featurizer.pad_id, dtype=torch.long)
    labels, targets = torch.full_like(ids, IGNORE), torch.full_like(ids, IGNORE)
    segment = torch.full_like(ids, -1)  # which window of its group a position belongs to
    for b, batch in enumerate(batches):
        inside = batch["attention_mask"].bool()  # row-major: window 0's positions, then window 1's...
        n = sum(lengths[b])
        ids[b, :n], labels[b, :n] = batch["input_ids"][inside], batch["labels"][inside]
        targets[b, :n] = featurizer.loss_labels(batch)[inside]
        segment[b, :n] = torch.arange(len(lengths[b])).repeat_interleave(torch.tensor(lengths[b]))
    device, dtype = bottom.device, next(model.parameters()).dtype
    states = _bottom_states(bottom, groups, _changed_rows(groups, batches, changed), fresh)
    hidden = torch.zeros(len(groups), 1, width, bottom.hidden_size, device=device, dtype=bottom.top_dtype)
    for b, group in enumerate(groups):
        hidden[b, 0, : sum(lengths[b])] = torch.cat([states(b, i) for i in range(len(group))])
    allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    allowed[:, :, 0] |= segment < 0  # padding attends to the first position, as stack's fillers do
    mask4d = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    kept, kept_targets = loss_positions(targets)
    rows = segment.gather(-1, kept)[:, None, :] == torch.arange(count)[None, :, None]
    return Stacked(ids[:, None].to(device), mask4d[:, None, None].to(device), labels[:, None].to(device),
                   targets[:, None].to(device), hidden, kept[:, None].to(device), kept_targets[:, None].to(device),
                   rows[:, None].to(device))


class Top:
    """The trainable top as a function of its weights, for torch.func (vmap over weight copies)."""

    def __init__(self, model: NerModel, start_layer: int):
        self.model, self.start = model, start_layer

    def logits(self, params: dict, ids, mask4d, hidden, keep=None):
        kwargs = {} if keep is None else {"keep": keep}
        if hidden is None:
            return functional_call(self.model, params, (ids, mask4d), kwargs)
        return functional_call(self.model, params, (None, mask4d),
                               {"hidden_states": hidden, "start_layer": self.start, **kwargs})

    def loss_fn(self, lambda_max: float):
        """loss(params, *Stacked.loss_args()): the token loss of one group of windows."""
        def loss(params, ids, mask4d, hidden, keep, rows, targets):
            return token_loss(self.logits(params, ids, mask4d, hidden, keep), targets, lambda_max, check=False,
                              rows=rows)
        return loss


@contextmanager
def quiet_vmap() -> Iterator[None]:
    """torch has no batching rule for the CPU fused attention kernel and loops over it instead,
    and warns so at every call: known, and not actionable here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        yield



"""Entity masking: entity words' labelled subwords replaced by [MASK], redrawn every epoch.

Which side of a pseudo task is masked is `train.mask_on`. The paper says "each training example"
is masked; the official code masks only the query sentences (its support features are built
without masks), which is the default here ("query"); "support" and "both" are the alternatives.
"""
from __future__ import annotations

import torch

from trainer.data.features import IGNORE
from trainer.utils.errors import ConfigError

_MIX = (1_000_003, 998_244_353)


def mask_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator fixed by (seed, epoch, salt): the same draw for the same triple, a new one per epoch.

    The salt (a task's query id) makes a task's mask independent of the order and of the process
    in which tasks are handled.
    """
    value = ((seed * _MIX[0] + epoch) * _MIX[1] + salt) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(value)


def mask_entities(input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int, ratio: float,
                  generator: torch.Generator, outside_id: int = 0) -> torch.Tensor:
    """New input ids where each entity position (label not O, not -100) is `mask_id` with probability
    `ratio`. Labels are unchanged: only a word's first subword carries a label, so that is what
    gets masked."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1]")
    if mask_id is None:
        raise ConfigError("the tokenizer has no mask token; entity masking needs one (set train.mask_ratio=0)")
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    entity = (labels != IGNORE) & (labels != outside_id)
    draw = (torch.rand(input_ids.shape, generator=generator) < ratio).to(input_ids.device)
    return torch.where(entity & draw, torch.full_like(input_ids, mask_id), input_ids)


def mask_batch(batch: dict[str, torch.Tensor], mask_id: int, ratio: float, generator: torch.Generator,
               outside_id: int = 0) -> dict[str, torch.Tensor]:
    """A copy of a collated batch with entities masked (the batch itself is left as it is)."""
    if ratio == 0.0:
        return batch
    out = dict(batch)
    out["input_ids"] = mask_entities(batch["input_ids"], batch["labels"], mask_id, ratio, generator, outside_id)
    return out


def masked_sides(mask_on: str) -> tuple[bool, bool]:
    """(mask support?, mask query?) for `train.mask_on`."""
    sides = {"query": (False, True), "support": (True, False), "both": (True, True)}
    if mask_on not in sides:
        raise ConfigError(f"train.mask_on={mask_on!r}: choose one of {', '.join(sides)}")
    return sides[mask_on]

"""The paper's max loss: mean token cross-entropy plus lambda times the mean per-sentence maximum."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from trainer.data.features import IGNORE


def token_loss(logits: torch.Tensor, labels: torch.Tensor, lambda_max: float = 0.0,
               check: bool = True, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean CE over labelled positions + lambda_max * mean over rows of the row's largest token CE.

    Rows without a labelled position take no part in the max term. Where a row holds several
    windows end to end, `rows` [..., R, T] (bool) says which of its positions belong to each of its
    R windows, and the max term is taken per window, as if each were a row of its own. Written
    without boolean indexing so that it also runs under torch.func.vmap; pass check=False there,
    since the emptiness check reads a tensor value.
    """
    labelled = labels != IGNORE
    if check and not bool(labelled.any()):
        raise ValueError("the batch has no labelled position (every label is -100); "
                         "give at least one sentence with words")
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="none").view(labels.shape)
    count = labelled.sum().clamp(min=1)
    loss = per_token.sum() / count
    if lambda_max == 0.0:
        return loss
    if rows is not None:
        labelled = rows & labelled.unsqueeze(-2)
        per_token = per_token.unsqueeze(-2)
    row_max = per_token.masked_fill(~labelled, float("-inf")).max(dim=-1).values
    has_label = labelled.any(dim=-1)
    row_max = torch.where(has_label, row_max, torch.zeros_like(row_max))
    return loss + lambda_max * row_max.sum() / has_label.sum().clamp(min=1)

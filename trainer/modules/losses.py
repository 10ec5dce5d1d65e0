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


def soft_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's distributions at the labelled
    positions, averaged over positions and labels: the loss of the teacher-student code of Wu et
    al. (ACL 2020, microsoft/vert-papers SingleMulti-TS: MSELoss on softmax outputs). `teacher`
    holds one row per labelled position of `labels`, in row-major order.

    Why MSE and not KL: it is what their code trains with and reports; it is bounded, so a
    confidently wrong teacher row costs a student at most a constant, where KL would grow without
    bound."""
    at = labels != IGNORE
    if int(at.sum()) != teacher.shape[0]:
        raise ValueError(f"{int(at.sum())} labelled positions but {teacher.shape[0]} teacher rows")
    return F.mse_loss(torch.softmax(logits[at].float(), dim=-1), teacher.float())

"""The max loss against a hand computation, and entity masking's rate, scope and reproducibility."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.data.features import IGNORE
from trainer.data.masking import mask_batch, mask_entities, mask_generator, masked_sides
from trainer.modules.losses import token_loss

MASK_ID = 4


def _ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_token_loss_equals_a_hand_computation():
    logits = torch.tensor([
        [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 0.0]],
        [[1.0, 1.0, 1.0], [-2.0, 0.0, 2.0], [0.0, 0.0, 0.0]],
        [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ], dtype=torch.float64)
    labels = torch.tensor([[0, 2, IGNORE], [1, 0, IGNORE], [IGNORE, IGNORE, IGNORE]])
    ces = [[_ce([2.0, 0.0, -1.0], 0), _ce([0.5, 0.5, 0.0], 2)], [_ce([1.0, 1.0, 1.0], 1), _ce([-2.0, 0.0, 2.0], 0)]]
    mean = sum(sum(r) for r in ces) / 4
    max_term = (max(ces[0]) + max(ces[1])) / 2  # the third row has no label and is skipped
    assert token_loss(logits, labels, 2.0).item() == pytest.approx(mean + 2.0 * max_term, rel=1e-12)
    assert token_loss(logits, labels, 0.0).item() == pytest.approx(mean, rel=1e-12)


def test_windows_end_to_end_in_one_row_take_the_max_term_per_window():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 4), torch.randint(0, 4, (3, 5))
    labels[1, 3:] = IGNORE
    labels[2] = IGNORE  # a window without a label takes no part in the max term
    # the same windows end to end in one row, padded, and which positions are whose
    row_logits = torch.cat([logits.reshape(15, 4), torch.randn(2, 4)])[None]
    row_labels = torch.cat([labels.reshape(15), torch.full((2,), IGNORE)])[None]
    rows = (torch.arange(17) // 5)[None, None, :] == torch.arange(3)[None, :, None]
    expected = token_loss(logits, labels, lambda_max=2.0)
    torch.testing.assert_close(token_loss(row_logits, row_labels, lambda_max=2.0, rows=rows), expected)
    assert not torch.allclose(token_loss(row_logits, row_labels, lambda_max=2.0), expected)


def test_lambda_zero_is_plain_cross_entropy_and_gradients_flow():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 9, requires_grad=True)
    labels = torch.randint(0, 9, (4, 7))
    labels[:, 0] = IGNORE
    ours = token_loss(logits, labels, 0.0)
    ref = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(ours, ref)
    token_loss(logits, labels, 2.0).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 0].abs().sum() == 0


def test_a_batch_with_no_label_is_refused():
    with pytest.raises(ValueError, match="no labelled position"):
        token_loss(torch.zeros(1, 3, 2), torch.full((1, 3), IGNORE))


def _entity_batch(n_entity: int, seed: int = 0):
    """Rows of ids labelled about one third each entity (1..8), O (0) and IGNORE."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 3, (n_entity * 3,), generator=g)
    labels = torch.where(kinds == 0, torch.randint(1, 9, kinds.shape, generator=g),
                         torch.where(kinds == 1, torch.zeros_like(kinds), torch.full_like(kinds, IGNORE)))
    ids = torch.randint(10, 500, labels.shape, generator=g)
    return ids.view(-1, 30), labels.view(-1, 30)


def test_mask_rate_is_the_ratio_within_three_sigma_and_only_entities_are_masked():
    ids, labels = _entity_batch(10_000)
    entity = (labels != IGNORE) & (labels != 0)
    n = int(entity.sum())
    assert n > 9_000
    out = mask_entities(ids, labels, MASK_ID, 0.2, mask_generator(95, 0))
    masked = out != ids
    assert torch.equal(masked & ~entity, torch.zeros_like(masked))
    assert (out[masked] == MASK_ID).all()
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(int(masked.sum()) - 0.2 * n) < 3 * sigma


def test_same_seed_and_epoch_same_draw_other_epoch_other_draw():
    ids, labels = _entity_batch(2_000)
    a = mask_entities(ids, labels, MASK_ID, 0.2, mask_generator(7, 3))
    b = mask_entities(ids, labels, MASK_ID, 0.2, mask_generator(7, 3))
    c = mask_entities(ids, labels, MASK_ID, 0.2, mask_generator(7, 4))
    d = mask_entities(ids, labels, MASK_ID, 0.2, mask_generator(8, 3))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_mask_batch_copies_and_keeps_labels():
    ids, labels = _entity_batch(100)
    batch = {"input_ids": ids.clone(), "labels": labels.clone(), "attention_mask": torch.ones_like(ids)}
    out = mask_batch(batch, MASK_ID, 1.0, mask_generator(0, 0))
    assert torch.equal(batch["input_ids"], ids) and torch.equal(out["labels"], labels)
    entity = (labels != IGNORE) & (labels != 0)
    assert torch.equal(out["input_ids"] == MASK_ID, entity)
    assert mask_batch(batch, MASK_ID, 0.0, mask_generator(0, 0)) is batch


def test_masked_sides_and_bad_values():
    assert masked_sides("query") == (False, True)
    assert masked_sides("support") == (True, False)
    assert masked_sides("both") == (True, True)
    with pytest.raises(ValueError, match="train.mask_on"):
        masked_sides("all")
    with pytest.raises(ValueError, match="ratio"):
        mask_entities(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), MASK_ID, 1.5,
                      mask_generator(0, 0))

"""Fine-tuning batches end to end in rows (train.pack_support): the loss and gradients of the
padded batch, on fewer positions."""
from __future__ import annotations

import pytest
import torch
from conftest import set_dropout

from trainer.config import load_config
from trainer.data.features import Featurizer
from trainer.modules.bottom import FrozenBottom
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel, freeze, trainable_parameters
from trainer.training.finetune import _logits, _packed_loss, pack_rows, packs


def test_rows_hold_every_window_once_within_the_width():
    lengths = [5, 120, 60, 70, 3, 130, 64, 64, 1]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 or len(row) == 1 for row in rows)
    assert [5] in rows  # 130 positions: a row of its own
    assert len(rows) == 5 and rows == pack_rows(lengths, 128)


@pytest.mark.parametrize("lambda_max", [0.0, 2.0])
def test_packed_batch_gives_the_padded_loss_and_gradient(tiny_bert, tiny_tokenizer, toy_corpus, lambda_max):
    model = NerModel.from_pretrained(tiny_bert, dropout=0.0, seed=0)
    freeze(model, 1)
    set_dropout(model, 0.0)
    model = model.double().train()
    featurizer = Featurizer(tiny_tokenizer, max_length=16, context=4, labels=model.labels)
    windows = featurizer.encode(toy_corpus["en"][:12])
    bottom = FrozenBottom(model, featurizer)
    bottom.fill(windows)
    named = trainable_parameters(model)

    def loss_and_grads(packed: bool):
        model.zero_grad(set_to_none=True)
        if packed:
            loss = _packed_loss(model, featurizer, bottom, windows, lambda_max)
        else:
            batch = featurizer.collate(windows)
            loss = token_loss(_logits(model, batch, windows, bottom), featurizer.loss_labels(batch), lambda_max)
        loss.backward()
        return loss.detach(), [p.grad.clone() for _, p in named]

    padded, padded_grads = loss_and_grads(False)
    packed, packed_grads = loss_and_grads(True)
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(named, packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)
    assert len(pack_rows([len(w) for w in windows])) < len(windows)  # several windows share a row


def test_packing_follows_the_setting(tiny_bert, tiny_tokenizer):
    model = NerModel.from_pretrained(tiny_bert, seed=0)
    freeze(model, 1)
    bottom = FrozenBottom(model, Featurizer(tiny_tokenizer, 16, 4, model.labels))
    train = load_config(None, ["train.pack_support=always"]).train
    assert packs(model, bottom, train) and not packs(model, None, train)
    # auto: from hidden 256 (the tiny model's is 64)
    assert not packs(model, bottom, load_config().train)
    assert not packs(model, bottom, load_config(None, ["train.pack_support=never"]).train)

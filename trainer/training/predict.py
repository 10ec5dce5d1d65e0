"""Labelling without adaptation: a model's tags for sentences (eval mode, windows merged back into
words), and their conlleval scores. Training (selection on dev) and test time share it."""
from __future__ import annotations

from typing import Sequence

import torch

from trainer.config import EVAL_BATCH_SIZE
from trainer.data.corpus import Sentence
from trainer.data.features import Featurizer, Soft, Window, labelled_predictions
from trainer.data.scoring import score
from trainer.modules.model import NerModel, evaluating


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _window_logits(model: NerModel, featurizer: Featurizer, windows: Sequence[Window], batch_size: int):
    """(logits, collated batch) of each batch of windows, in eval mode."""
    with evaluating(model), torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = to_device(featurizer.collate(windows[start:start + batch_size]), device_of(model))
            yield model(batch["input_ids"], batch["attention_mask"]), batch


def _window_predictions(model: NerModel, featurizer: Featurizer, windows: Sequence[Window],
                        batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for logits, batch in _window_logits(model, featurizer, windows, batch_size):
        out.extend(labelled_predictions(logits, batch["labels"]))
    return out


def predict(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
            batch_size: int = EVAL_BATCH_SIZE) -> list[list[str]]:
    """Tags of each sentence in eval mode, windows merged back into words."""
    if not sentences:
        return []
    windows = featurizer.encode(sentences)
    return featurizer.merge(sentences, windows, _window_predictions(model, featurizer, windows, batch_size))


def predict_soft(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
                 batch_size: int = EVAL_BATCH_SIZE) -> list[tuple[list[str], Soft]]:
    """(tags, `Soft`) of each sentence in eval mode: `predict`'s tags and the probabilities they are
    the argmax of."""
    if not sentences:
        return []
    windows = featurizer.encode(sentences)
    predicted, rows = [], []
    for logits, batch in _window_logits(model, featurizer, windows, batch_size):
        predicted.extend(labelled_predictions(logits, batch["labels"]))
        rows.extend(logits)
    tags = featurizer.merge(sentences, windows, predicted)
    return list(zip(tags, featurizer.merge_soft(sentences, windows, rows)))


def evaluate(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
             batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """conlleval-style scores of the model's predictions on gold-tagged sentences."""
    predicted = predict(model, featurizer, sentences, batch_size)
    return score([list(s.tags) for s in sentences], predicted)

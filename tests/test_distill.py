"""A student trained on a teacher's soft labels: the loss, the teacher's rows per window, and the
fine-tuning loop learning the teacher's outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.data.corpus import LABELS, Sentence
from trainer.data.features import Featurizer, Soft, soft_targets
from trainer.modules.losses import soft_loss
from trainer.modules.model import NerModel, freeze
from trainer.training.finetune import finetune
from trainer.training.predict import predict, predict_soft


def test_soft_loss_is_the_mean_squared_error_of_the_distributions_at_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9)
    labels = torch.tensor([[-100, 0, 3, -100, -100], [-100, 1, -100, -100, -100]])
    teacher = torch.softmax(torch.randn(3, 9), -1)
    expected = ((torch.softmax(logits[labels != -100], -1) - teacher) ** 2).mean()
    torch.testing.assert_close(soft_loss(logits, labels, teacher), expected)
    same = soft_loss(logits, labels, torch.softmax(logits[labels != -100], -1))
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="3 labelled positions but 2 teacher rows"):
        soft_loss(logits, labels, teacher[:2])


def test_each_window_gets_its_sentences_rows_and_other_units_are_refused(tiny_tokenizer, toy_corpus):
    en = toy_corpus["en"]
    long = Sentence(tuple(w for s in en[:6] for w in s.words), tuple(t for s in en[:6] for t in s.tags))
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    sentences = [long, en[7]]
    windows = featurizer.encode(sentences)
    assert len(windows) > 3
    teacher = [Soft(np.arange(len(s.words), dtype=np.int32),
                    np.tile(np.arange(len(s.words), dtype=np.float16)[:, None], (1, 9))) for s in sentences]
    rows = soft_targets(windows, teacher)
    for w, r in zip(windows, rows):
        assert r.dtype == torch.float16 and r[:, 0].tolist() == list(w.words)  # row i is word i's here
    short = [Soft(t.firsts[:-1], t.probs[:-1]) for t in teacher]
    with pytest.raises(ValueError, match="the teacher labelled no unit starting at word"):
        soft_targets(windows, short)


def test_a_student_learns_its_teachers_outputs(tiny_bert, tiny_tokenizer, toy_corpus):
    """From another random start, fine-tuning on the teacher's soft labels of target-language
    text brings the student's tags towards the teacher's and lowers the soft loss."""
    teacher_model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0).eval()
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    text = [Sentence(s.words, ("O",) * len(s.words)) for lang in ("es", "de") for s in toy_corpus[lang][:12]]
    labelled = predict_soft(teacher_model, featurizer, text)
    teacher_tags = [t for t, _ in labelled]
    sentences = [Sentence(s.words, tuple(t)) for s, t in zip(text, teacher_tags)]
    student = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=1)
    freeze(student, 1)

    def agreement():
        tags = predict(student, featurizer, text)
        return np.mean([a == b for x, y in zip(tags, teacher_tags) for a, b in zip(x, y)])

    before = agreement()
    cfg = load_config(None, ["train.meta_lr=0.003", "train.base_batch_size=8", "train.warmup_proportion=0.0",
                             "train.lambda_max=0", "train.mask_ratio=0"])
    stats = finetune(student, featurizer, sentences, cfg, seed=3, num_steps=40, teacher=[s for _, s in labelled])
    assert before < 0.3 and agreement() > 0.8, (before, agreement())  # measured: 0.14 before, 0.89 after
    assert stats["last_loss"] < 0.01
    with pytest.raises(ValueError, match="soft labels of 1"):
        finetune(student, featurizer, sentences, cfg, seed=3, num_steps=1, teacher=[labelled[0][1]])

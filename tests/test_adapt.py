"""Test-time adaptation: exact restoring, batched == sequential, independence, the Adapter unit."""
from __future__ import annotations

import pytest
import torch

from trainer.config import load_config
from trainer.data.corpus import LABELS, Sentence
from trainer.data.features import Featurizer
from trainer.modules.model import NerModel, freeze, trainable_parameters
from trainer.training.adapt import (
    Adapter,
    AdaptItem,
    AdaptSettings,
    _adapted_batched,
    _adapted_sequential,
    _encode_groups,
    adapt_many,
)
from trainer.training.checkpoint import save_checkpoint
from trainer.training.optim import BertAdam, batched_bertadam_step, param_groups
from trainer.training.predict import predict

# A large step so that adaptation visibly changes predictions of the random tiny model.
SETTINGS = AdaptSettings(adapt_lr=1e-2, num_adapt_steps=1, weight_decay=0.01, max_grad_norm=1.0)
CFG = ["adapt.adapt_lr=0.01", "adapt.batch_size=3"]


def adapt_and_predict(model, featurizer, sentence, support_sentences, adapt_lr, num_adapt_steps, *,
                      weight_decay, max_grad_norm, lambda_max=0.0):
    """One sentence adapted in place on its support set and tagged, the weights restored: the
    sequential reference the batched path is checked against."""
    settings = AdaptSettings(adapt_lr, num_adapt_steps, weight_decay, max_grad_norm, lambda_max)
    return _adapted_sequential(model, featurizer, sentence, support_sentences, settings)[0]


@pytest.fixture()
def featurizer(tiny_tokenizer):
    return Featurizer(tiny_tokenizer, max_length=32, context=8)


@pytest.fixture()
def model(tiny_bert):
    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0)
    freeze(model, 1)
    return model.eval()


@pytest.fixture()
def items(toy_corpus):
    en = toy_corpus["en"]
    targets = toy_corpus["es"][:3] + toy_corpus["de"][:2]
    return targets, [[en[2 * i], en[2 * i + 1]] for i in range(len(targets))]


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_adaptation_restores_weights_bit_exactly_and_changes_predictions(model, featurizer, items):
    sentences, supports = items
    before = _weights(model)
    plain = predict(model, featurizer, sentences)
    adapted = [adapt_and_predict(model, featurizer, s, sup, 1e-2, 1, weight_decay=0.01, max_grad_norm=1.0)
               for s, sup in zip(sentences, supports)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    assert all(p.grad is None for p in model.parameters())
    assert adapted != plain
    assert [len(t) for t in adapted] == [len(s.words) for s in sentences]
    assert not model.training


def _assert_batched_equals_sequential(model, featurizer, sentences, supports, settings):
    sequential = [_adapted_sequential(model, featurizer, s, sup, settings) for s, sup in zip(sentences, supports)]
    batched = _adapted_batched(model, featurizer, sentences, supports, settings)
    for (tags_s, logits_s, _), (tags_b, logits_b, _) in zip(sequential, batched):
        assert tags_s == tags_b
        for a, b in zip(logits_s, logits_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batched_adaptation_equals_sequential(model, featurizer, items):
    sentences, supports = items
    before = _weights(model)
    _assert_batched_equals_sequential(model, featurizer, sentences, supports, SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))


def test_closed_form_first_step_equals_bertadam(model):
    torch.manual_seed(0)
    named = trainable_parameters(model)
    grads = {n: torch.randn(2, *p.shape) * (5.0 if i % 2 else 0.01) for i, (n, p) in enumerate(named)}
    consumed = {n: g.clone() for n, g in grads.items()}  # the step is written into its gradients
    adapted, state = batched_bertadam_step(
        {n: p.detach() for n, p in named}, consumed, None, lr=SETTINGS.adapt_lr, weight_decay=SETTINGS.weight_decay,
        max_grad_norm=SETTINGS.max_grad_norm, keep_state=False)
    assert state is None
    for b in range(2):
        copies = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
        opt = BertAdam(param_groups(copies, SETTINGS.weight_decay), lr=SETTINGS.adapt_lr)
        order = {id(p): n for n, p in copies}
        opt.step_with([grads[order[id(p)]][b] for p in opt.ordered_params()])
        for n, p in copies:
            torch.testing.assert_close(adapted[n][b], p.detach(), rtol=1e-6, atol=1e-7, msg=n)


def test_adapting_one_sentence_never_changes_another_processed_after(model, featurizer, items):
    sentences, supports = items
    alone = [adapt_and_predict(model, featurizer, s, sup, 1e-2, 1, weight_decay=0.01, max_grad_norm=1.0)
             for s, sup in zip(sentences, supports)]
    for a in range(len(sentences)):
        for b in range(len(sentences)):
            adapt_and_predict(model, featurizer, sentences[a], supports[a], 1e-2, 1, weight_decay=0.01,
                              max_grad_norm=1.0)
            after = adapt_and_predict(model, featurizer, sentences[b], supports[b], 1e-2, 1, weight_decay=0.01,
                                      max_grad_norm=1.0)
            assert after == alone[b], (a, b)
    # in a batch, each sentence's neighbours do not matter either
    cfg = load_config(None, CFG)
    assert adapt_many(model, featurizer, sentences, supports, cfg, batched=True) == alone
    reordered = adapt_many(model, featurizer, sentences[::-1], supports[::-1], cfg, batched=True)
    assert reordered == alone[::-1]


def test_adapt_many_falls_back_to_sequential_for_several_steps(model, featurizer, items):
    sentences, supports = items
    cfg = load_config(None, CFG + ["adapt.num_adapt_steps=2"])
    settings = AdaptSettings.from_config(cfg)
    expected = [_adapted_sequential(model, featurizer, s, sup, settings)[0] for s, sup in zip(sentences, supports)]
    assert adapt_many(model, featurizer, sentences, supports, cfg) == expected
    with pytest.raises(ValueError, match="exactly one"):
        _adapted_batched(model, featurizer, sentences, supports, settings)


def test_long_sentences_and_empty_supports(model, featurizer, toy_corpus):
    en = toy_corpus["en"]
    long = Sentence(tuple(w for s in en[:6] for w in s.words), tuple(t for s in en[:6] for t in s.tags))
    assert len(featurizer.encode([long])) > 1
    cfg = load_config(None, CFG)
    sentences, supports = [long, en[7], en[8]], [[en[9]], [], [en[10], en[11]]]
    tags = adapt_many(model, featurizer, sentences, supports, cfg)
    assert [len(t) for t in tags] == [len(s.words) for s in sentences]
    assert tags[1] == predict(model, featurizer, [en[7]])[0]  # no support: no adaptation
    settings = AdaptSettings.from_config(cfg)
    assert tags[0] == _adapted_sequential(model, featurizer, long, [en[9]], settings)[0]


def test_adapter_from_a_checkpoint_and_baseline_mode(model, featurizer, tiny_tokenizer, items, tmp_path):
    sentences, supports = items
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tiny_tokenizer)
    cfg = load_config(None, CFG + ["model.max_length=32", "model.window_context=8"])
    adapter = Adapter(str(folder), cfg=cfg)
    unit = [AdaptItem(f"s{i}", s, tuple(sup)) for i, (s, sup) in enumerate(zip(sentences, supports))]
    result = adapter.run(unit)
    assert list(result) == [f"s{i}" for i in range(len(sentences))]
    assert list(result.values()) == adapt_many(model, featurizer, sentences, supports, cfg, batched=False)
    baseline = Adapter(model, featurizer, load_config(None, ["adapt.enabled=false"])).run(
        [(i, s, tuple(sup)) for i, (s, sup) in enumerate(zip(sentences, supports))])
    assert list(baseline.values()) == predict(model, featurizer, sentences)
    with pytest.raises(ValueError, match="featurizer"):
        Adapter(model, None, cfg)


@pytest.mark.parametrize("num_frozen", [0, 2])
def test_frozen_prefix_then_top_equals_full_forward(tiny_bert, featurizer, items, num_frozen):
    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0).eval()
    freeze(model, num_frozen)
    assert model.num_frozen_prefix() == num_frozen
    batch = featurizer.collate(featurizer.encode(items[0]))
    mask4d = model.attention_mask_4d(batch["attention_mask"])
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"])
        split = model(None, mask4d, hidden_states=model.prefix(batch["input_ids"], mask4d, num_frozen),
                      start_layer=num_frozen)
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)
    freeze(model, 2, freeze_embeddings=False)
    assert model.num_frozen_prefix() == 0  # trainable embeddings: nothing below the top is shared


def test_batched_equals_sequential_without_a_frozen_prefix(tiny_bert, featurizer, items):
    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0).eval()
    freeze(model, 0, freeze_embeddings=False)
    sentences, supports = items
    sequential = [_adapted_sequential(model, featurizer, s, sup, SETTINGS)[0] for s, sup in zip(sentences, supports)]
    assert [r.tags for r in _adapted_batched(model, featurizer, sentences, supports, SETTINGS)] == sequential


def test_prefix_store_is_shared_by_checkpoints_with_the_same_frozen_bottom(model, featurizer, items, tiny_bert,
                                                                           tmp_path):
    sentences, supports = items
    unit = [AdaptItem(i, s, tuple(sup)) for i, (s, sup) in enumerate(zip(sentences, supports))]
    cfg = load_config(None, CFG)
    plain = Adapter(model, featurizer, cfg).run(unit)
    first = Adapter(model, featurizer, cfg, prefix_dir=tmp_path)
    assert first.run(unit) == plain
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1
    # Another checkpoint: same frozen bottom, different top. It reads the stored bottom and still
    # gives exactly what it computes on its own.
    other = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=1)
    freeze(other, 1)
    other.eval()
    second = Adapter(other, featurizer, cfg, prefix_dir=tmp_path)
    assert second.store.folder == first.store.folder
    assert second.store.load(Adapter.content(unit))
    assert second.run(unit) == Adapter(other, featurizer, cfg).run(unit)
    # A different bottom is stored apart.
    with torch.no_grad():
        other.encoder.embeddings.word_embeddings.weight.add_(0.1)
    assert Adapter(other, featurizer, cfg, prefix_dir=tmp_path).store.folder != first.store.folder


def test_classifier_lr_scale_reaches_the_batched_step_and_the_optimiser(model, featurizer, items):
    import dataclasses

    sentences, supports = items
    scaled = dataclasses.replace(SETTINGS, adapt_lr=1e-4, classifier_lr_scale=50.0)
    _assert_batched_equals_sequential(model, featurizer, sentences, supports, scaled)
    # Only the classifier moves faster: one fresh BertAdam step is ~3.16 * lr * sign(g) per weight.
    named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in trainable_parameters(model)]
    before = {n: p.detach().clone() for n, p in named}
    opt = BertAdam(param_groups(named, 0.0, classifier_lr_scale=50.0), lr=1e-4, max_grad_norm=0)
    opt.step_with([torch.ones_like(p) for p in opt.ordered_params()])
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in named}
    assert moved["classifier.weight"] == pytest.approx(50 * 3.162e-4, rel=1e-3)
    assert max(v for n, v in moved.items() if not n.startswith("classifier.")) == pytest.approx(3.162e-4, rel=1e-3)


def test_one_tokenizer_call_gives_each_group_its_own_windows(featurizer, toy_corpus):
    groups = [toy_corpus["en"][0:2], toy_corpus["es"][3:4], [], toy_corpus["de"][5:8]]
    assert _encode_groups(featurizer, groups) == [featurizer.encode(g) if g else [] for g in groups]


def test_batched_adaptation_equals_sequential_on_unspaced_chinese(e5_tokenizer, tiny_encoder_e5_vocab, toy_corpus):
    import copy

    from conftest import zh_sentences

    model = NerModel(copy.deepcopy(tiny_encoder_e5_vocab), LABELS, dropout=0.0, seed=0)
    freeze(model, 1)
    model.eval()
    featurizer = Featurizer(e5_tokenizer, max_length=32, context=8)
    zh = zh_sentences(200)
    joined = [s for s in zh if max(featurizer.units([s])[0].widths) > 1]
    sentences = [max(zh, key=lambda s: len(s.words))] + joined[:4]
    windows = featurizer.encode(sentences)
    assert len(windows) > len(sentences) and any(max(w.widths) > 1 for w in windows)
    en = toy_corpus["en"]
    supports = [[en[2 * i], en[2 * i + 1]] for i in range(len(sentences))]
    _assert_batched_equals_sequential(model, featurizer, sentences, supports, SETTINGS)
    tags = adapt_many(model, featurizer, sentences, supports, load_config(None, CFG))
    assert [len(t) for t in tags] == [len(s.words) for s in sentences]


def _argmax_tags(featurizer, sentence, soft):
    tags = ["?"] * len(sentence.words)
    for first, row in zip(soft.firsts, soft.probs):
        tags[first] = featurizer.tag(int(row.argmax()))
    return tags


def test_soft_labels_are_the_probabilities_the_tags_are_the_argmax_of(model, featurizer, toy_corpus):
    """The soft path gives the same tags, and per labelled unit (every word here, a long sentence's
    windows merged) float16 probabilities that sum to 1, equal on the batched and sequential paths."""
    en = toy_corpus["en"]
    long = Sentence(tuple(w for s in en[:6] for w in s.words), tuple(t for s in en[:6] for t in s.tags))
    sentences, supports = [long, en[7], toy_corpus["es"][0]], [[en[9]], [], [en[10], en[11]]]
    cfg = load_config(None, CFG)
    hard = adapt_many(model, featurizer, sentences, supports, cfg)
    for batched in (True, False):
        soft = adapt_many(model, featurizer, sentences, supports, cfg, batched=batched, soft=True)
        assert [tags for tags, _ in soft] == hard
        for sentence, (tags, s) in zip(sentences, soft):
            assert s.probs.dtype.name == "float16" and s.probs.shape == (len(sentence.words), len(LABELS))
            assert s.firsts.tolist() == list(range(len(sentence.words)))
            assert abs(s.probs.astype("float32").sum(-1) - 1).max() < 2e-3
            assert _argmax_tags(featurizer, sentence, s) == tags
        if batched:
            first = soft
    for (_, a), (_, b) in zip(first, soft):
        assert abs(a.probs.astype("float32") - b.probs.astype("float32")).max() < 2e-3
    # Without adaptation: predict's tags and their probabilities.
    plain = Adapter(model, featurizer, load_config(None, ["adapt.enabled=false"])).run(
        [(i, s) for i, s in enumerate(sentences)], soft=True)
    assert [t for t, _ in plain.values()] == predict(model, featurizer, sentences)
    assert all(_argmax_tags(featurizer, s, p) == t for s, (t, p) in zip(sentences, plain.values()))

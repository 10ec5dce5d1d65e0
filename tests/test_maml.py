"""First-order MAML against an independent computation, plus restoring, accumulation and learning."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import set_dropout

from trainer.config import load_config
from trainer.data.corpus import LABELS
from trainer.data.features import Featurizer, group_windows
from trainer.data.sampling import Task
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel, build_model, freeze, trainable_parameters
from trainer.training.finetune import finetune
from trainer.training.reference import MetaLearner

BASE = ["train.schedule_inner_lr=false", "train.warmup_proportion=0.0", "train.num_inner_steps=2",
        "train.inner_lr=0.001", "train.meta_lr=0.002", "train.lambda_max=2.0", "train.mask_ratio=0.0",
        "train.num_meta_steps=50"]
TASKS = [Task([1, 2], 0), Task([3, 0], 4), Task([5, 6], 2)]


@pytest.fixture()
def featurizer(tiny_tokenizer):
    return Featurizer(tiny_tokenizer, max_length=32, context=8)


@pytest.fixture()
def source(featurizer, toy_corpus):
    return group_windows(featurizer.encode(toy_corpus["en"][:8]))


def _model(tiny_bert, frozen=1, freeze_pooler=True, double=True):
    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0)
    freeze(model, frozen, freeze_pooler=freeze_pooler)
    set_dropout(model, 0.0)
    return model.double() if double else model


def _reference_meta_gradient(model, featurizer, tasks, source, train, mask_query_entities=False):
    """Sum over tasks of the query gradient at weights after BertAdam inner steps, written out by hand."""
    total = {n: torch.zeros_like(p) for n, p in trainable_parameters(model)}
    for task in tasks:
        clone = copy.deepcopy(model)
        clone.train()
        named = trainable_parameters(clone)
        m = {n: torch.zeros_like(p) for n, p in named}
        v = {n: torch.zeros_like(p) for n, p in named}
        support = featurizer.collate([w for i in task.support for w in source[i]])
        for _ in range(train.num_inner_steps):
            clone.zero_grad()
            token_loss(clone(support["input_ids"], support["attention_mask"]), support["labels"],
                       train.lambda_max).backward()
            with torch.no_grad():
                for n, p in named:
                    if p.grad is None:
                        continue
                    g = p.grad
                    norm = g.norm()
                    if norm > train.max_grad_norm:
                        g = g * train.max_grad_norm / (norm + 1e-6)
                    m[n] = 0.9 * m[n] + 0.1 * g
                    v[n] = 0.999 * v[n] + 0.001 * g * g
                    decay = 0.0 if ("bias" in n or "LayerNorm" in n) else train.weight_decay
                    p -= train.inner_lr * (m[n] / (v[n].sqrt() + 1e-6) + decay * p)
        query = featurizer.collate(list(source[task.query]))
        ids = query["input_ids"]
        if mask_query_entities:
            entity = (query["labels"] != -100) & (query["labels"] != 0)
            ids = torch.where(entity, torch.full_like(ids, featurizer.mask_id), ids)
        clone.zero_grad()
        token_loss(clone(ids, query["attention_mask"]), query["labels"], train.lambda_max).backward()
        for n, p in named:
            if p.grad is not None:
                total[n] += p.grad
    return total


def test_meta_gradient_equals_the_first_order_maml_gradient(tiny_bert, featurizer, source):
    cfg = load_config(None, BASE)
    model = _model(tiny_bert)
    expected = _reference_meta_gradient(model, featurizer, TASKS, source, cfg.train)
    learner = MetaLearner(model, featurizer, cfg, seed=0)
    learner.meta_gradient(TASKS, source)
    for name, p in zip(learner.names, learner.params):
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in learner.params)


def test_query_masking_follows_mask_on(tiny_bert, featurizer, source):
    # ratio 1 makes the draw certain, so the reference can mask by hand.
    cfg = load_config(None, BASE + ["train.mask_ratio=1.0", "train.mask_on=query"])
    model = _model(tiny_bert)
    expected = _reference_meta_gradient(model, featurizer, TASKS[:1], source, cfg.train, mask_query_entities=True)
    unmasked = _reference_meta_gradient(model, featurizer, TASKS[:1], source, cfg.train)
    learner = MetaLearner(model, featurizer, cfg)
    learner.meta_gradient(TASKS[:1], source)
    for name, p in zip(learner.names, learner.params):
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.allclose(expected["classifier.weight"], unmasked["classifier.weight"])


def test_meta_step_is_one_bertadam_step_on_the_summed_gradient(tiny_bert, featurizer, source):
    cfg = load_config(None, BASE)
    model = _model(tiny_bert)
    total = _reference_meta_gradient(model, featurizer, TASKS, source, cfg.train)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    learner = MetaLearner(model, featurizer, cfg)
    stats = learner.meta_step(TASKS, source)
    assert stats["meta_lr"] == pytest.approx(cfg.train.meta_lr) and learner.step == 1
    for n, p in trainable_parameters(model):
        g = total[n]
        norm = g.norm()
        if norm > 1.0:
            g = g / (norm + 1e-6)
        decay = 0.0 if ("bias" in n or "LayerNorm" in n) else cfg.train.weight_decay
        update = 0.1 * g / ((0.001 * g * g).sqrt() + 1e-6) + decay * before[n]
        torch.testing.assert_close(p.detach(), before[n] - cfg.train.meta_lr * update, rtol=1e-9, atol=1e-12, msg=n)


def test_restoring_is_bit_exact_and_inner_steps_never_touch_grad(tiny_bert, featurizer, source):
    cfg = load_config(None, BASE + ["train.mask_ratio=0.5", "train.mask_on=both"])
    model = _model(tiny_bert, double=False)
    learner = MetaLearner(model, featurizer, cfg)
    before = [p.detach().clone() for p in learner.params]
    grads, stats = learner.task_gradients(TASKS[0], source, epoch=1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(learner.params, before))
    assert stats["meta_loss"] > 0
    # the same task and epoch draw the same masks: the same gradient
    again, _ = learner.task_gradients(TASKS[0], source, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    other, _ = learner.task_gradients(TASKS[0], source, epoch=2)
    assert not all(torch.equal(a, b) for a, b in zip(grads, other))
    # meta_gradient adds into .grad: one buffer, the sum of task gradients
    learner.meta_gradient(TASKS[:2], source, epoch=1)
    second, _ = learner.task_gradients(TASKS[1], source, epoch=1)
    for p, a, b in zip(learner.params, grads, second):
        torch.testing.assert_close(p.grad, a + b)
    assert all(torch.equal(p, b) for p, b in zip(learner.params, before))


def test_unused_trainable_pooler_gets_a_zero_gradient(tiny_bert, featurizer, source):
    cfg = load_config(None, BASE)
    model = _model(tiny_bert, frozen=0, freeze_pooler=False, double=False)
    learner = MetaLearner(model, featurizer, cfg)
    learner.meta_step(TASKS[:1], source)
    grads, _ = learner.task_gradients(TASKS[0], source)
    pooler = [g for n, g in zip(learner.names, grads) if "pooler" in n]
    assert pooler and all(torch.count_nonzero(g) == 0 for g in pooler)


def test_non_finite_loss_names_the_task(tiny_bert, featurizer, source):
    model = _model(tiny_bert, double=False)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    learner = MetaLearner(model, featurizer, load_config(None, BASE))
    with pytest.raises(FloatingPointError, match="query sentence 4"):
        learner.meta_gradient([TASKS[1]], source)


def test_bad_task_indices_are_refused(tiny_bert, featurizer, source):
    learner = MetaLearner(_model(tiny_bert, double=False), featurizer, load_config(None, BASE))
    with pytest.raises(ValueError, match="outside the source set"):
        learner.task_gradients(Task([1, 99], 0), source)
    with pytest.raises(ValueError, match="empty support"):
        Task([], 0)


def test_official_schedules_start_at_zero(tiny_bert, featurizer, source):
    cfg = load_config(None, ["train.num_meta_steps=10"])
    model = _model(tiny_bert, double=False)
    learner = MetaLearner(model, featurizer, cfg)
    assert learner.inner_lr() == 0.0 and learner.meta_lr() == 0.0
    before = [p.detach().clone() for p in learner.params]
    learner.meta_step(TASKS[:1], source)
    assert all(torch.equal(p, b) for p, b in zip(learner.params, before))
    assert learner.inner_lr() == pytest.approx(cfg.train.inner_lr)


def test_meta_training_lowers_the_query_loss(tiny_bert, featurizer, toy_corpus):
    torch.manual_seed(0)
    cfg = load_config(None, ["train.schedule_inner_lr=false", "train.warmup_proportion=0.0",
                             "train.inner_lr=0.003", "train.meta_lr=0.003", "train.num_meta_steps=10",
                             "train.num_inner_steps=1"])
    source = group_windows(featurizer.encode(toy_corpus["en"][:24]))
    tasks = [Task([(i + 1) % 24, (i + 2) % 24], i) for i in range(24)]
    model = _model(tiny_bert, double=False)
    learner = MetaLearner(model, featurizer, cfg, seed=1)
    first = learner.meta_gradient(tasks[:8], source)["meta_loss"]
    for step in range(10):
        learner.meta_step([tasks[(3 * step + j) % 24] for j in range(3)], source, epoch=step // 4)
    last = learner.meta_gradient(tasks[:8], source)["meta_loss"]
    assert last < 0.9 * first


def test_finetune_learns_and_ends_on_the_best_dev_weights(tiny_bert, featurizer, toy_corpus):
    torch.manual_seed(0)
    cfg = load_config(None, ["train.warmup_proportion=0.1", "train.meta_lr=0.002", "train.base_batch_size=8",
                             "train.eval_every=10", "train.mask_ratio=0.2"])
    model = _model(tiny_bert, double=False)
    from trainer.training.predict import evaluate

    dev = toy_corpus["en"][40:60]
    start = evaluate(model, featurizer, dev)["f1"]
    logged = []

    class Recorder:
        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    result = finetune(model, featurizer, toy_corpus["en"][:40], cfg, seed=5, num_steps=40, dev=dev,
                      metrics_logger=Recorder())
    # Selection after every 10th update (and the last), counted as meta-training counts its steps.
    assert [s for s, m in logged if "dev_f1" in m] == [10, 20, 30, 40]
    assert [step for step, _ in result["dev_curve"]] == [10, 20, 30, 40]
    assert result["best_f1"] > start + 20.0
    assert evaluate(model, featurizer, dev)["f1"] == pytest.approx(result["best_f1"])


def test_resuming_from_saved_trainer_state_continues_identically(tiny_bert, featurizer, source, tmp_path):
    from trainer.training.checkpoint import load_model, load_trainer_state, save_checkpoint

    cfg = load_config(None, BASE + ["train.num_inner_steps=1"])
    model = _model(tiny_bert, double=False)
    learner = MetaLearner(model, featurizer, cfg)
    learner.meta_step(TASKS[:1], source)
    folder = save_checkpoint(tmp_path / "ckpt", model, trainer_state=learner.state_dict())
    restored, _, _ = load_model(folder, load_tokenizer=False)
    set_dropout(restored, 0.0)
    resumed = MetaLearner(restored, featurizer, cfg)
    resumed.load_state_dict(load_trainer_state(folder))
    assert resumed.step == 1
    learner.meta_step(TASKS[1:2], source)
    resumed.meta_step(TASKS[1:2], source)
    for a, b in zip(learner.params, resumed.params):
        assert torch.equal(a, b)


def test_finetune_over_the_kept_frozen_bottom_trains_as_the_whole_model(tiny_bert_no_dropout, toy_corpus):
    """Without dropout the kept bottom changes nothing but the cost: the same losses and weights."""
    from trainer.modules.bottom import FrozenBottom
    from trainer.modules.model import load_tokenizer

    cfg = load_config(None, ["train.meta_lr=0.002", "train.base_batch_size=8", "train.mask_ratio=0",
                             "model.dropout=0", "model.num_frozen_layers=1"])
    featurizer = Featurizer(load_tokenizer(tiny_bert_no_dropout), 32, 4)
    runs = []
    for kept in (False, True):
        model = build_model(load_config(None, [f"model.name_or_path={tiny_bert_no_dropout}", "model.dropout=0",
                                               "model.num_frozen_layers=1"]), seed=1)
        bottom = FrozenBottom(model, featurizer) if kept else None
        stats = finetune(model, featurizer, toy_corpus["en"][:40], cfg, seed=5, num_steps=6, bottom=bottom)
        runs.append((stats["last_loss"], [p.detach().clone() for p in model.parameters()]))
        if kept:
            assert len(bottom) == len({w.input_ids for w in featurizer.encode(toy_corpus["en"][:40])})
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

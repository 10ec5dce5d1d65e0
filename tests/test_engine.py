"""The vectorised task engine equals the per-task reference (MetaLearner) on every parameter."""
from __future__ import annotations

import pytest
import torch
from conftest import set_dropout

from trainer.config import load_config, with_overrides
from trainer.data.features import IGNORE, Featurizer, Window, group_windows, labels_for
from trainer.data.sampling import Task
from trainer.modules.batched import Top, stack, stack_packed
from trainer.modules.bottom import FrozenBottom
from trainer.modules.model import NerModel, freeze
from trainer.training.engine import TaskEngine, even_chunks
from trainer.training.reference import MetaLearner

BASE = ["train.schedule_inner_lr=false", "train.warmup_proportion=0.0", "train.num_inner_steps=2",
        "train.inner_lr=0.001", "train.meta_lr=0.002", "train.lambda_max=2.0", "train.num_meta_steps=50",
        "train.classifier_lr_scale=3.0"]
TASKS = [Task([1, 2], 0), Task([3, 0], 4), Task([5, 6], 2), Task([7, 1], 3), Task([2, 4], 6)]


def _setup(tiny_bert, tiny_tokenizer, toy_corpus, overrides, frozen=1):
    cfg = load_config(None, BASE + overrides)
    labels = labels_for(cfg.train.loss_positions)
    model = NerModel.from_pretrained(tiny_bert, labels, dropout=0.0, seed=0)
    freeze(model, frozen)
    set_dropout(model, 0.0)
    model = model.double()
    # A short window so that long sentences span several windows (left context included).
    featurizer = Featurizer(tiny_tokenizer, max_length=16, context=4, labels=labels)
    source = group_windows(featurizer.encode(toy_corpus["en"][:8]))
    return cfg, model, featurizer, source


def _reference(model, featurizer, cfg, source, epoch):
    learner = MetaLearner(model, featurizer, cfg, seed=7)
    learner.meta_gradient(TASKS, source, epoch)
    grads = {n: p.grad.detach().clone() for n, p in zip(learner.names, learner.params)}
    learner.meta_optimizer.zero_grad(set_to_none=True)
    return learner.names, grads


@pytest.mark.parametrize("overrides,frozen", [
    (["train.mask_ratio=0.5", "train.mask_on=query", "train.pack_support=always"], 1),
    (["train.mask_ratio=0.5", "train.mask_on=both", "train.task_chunk_size=2", "train.pack_support=always"], 1),
    (["train.mask_ratio=0.0", "train.loss_positions=all", "train.pack_support=always"], 1),
    (["train.mask_ratio=0.5", "train.mask_on=query", "train.pack_support=always"], 0),
    (["train.mask_ratio=0.5", "train.compile_updates=always"], 1),
    (["train.mask_ratio=0.5", "train.compile_updates=always", "train.num_inner_steps=3",
      "train.pack_support=always"], 1),
    (["train.mask_ratio=0.5", "train.num_inner_steps=3", "train.max_grad_norm=0.0"], 1),
])
def test_vectorised_meta_gradient_equals_the_per_task_one(tiny_bert, tiny_tokenizer, toy_corpus, overrides, frozen):
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, overrides, frozen)
    assert any(len(g) > 1 for g in source), "no sentence spans two windows"
    names, expected = _reference(model, featurizer, cfg, source, epoch=3)
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    # packed: a task's support windows end to end (where there is a bottom; auto: not at hidden 64)
    assert engine.packed == (bool(frozen) and "train.pack_support=always" in overrides)
    grads, totals = engine.meta_gradient(TASKS, source, epoch=3, inner_lr=cfg.train.inner_lr)
    assert totals["tasks"] == len(TASKS) and totals["meta_loss"] > 0
    for name, g in zip(names, grads):
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-9, msg=name)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_masking_changes_the_gradient_and_is_redrawn_per_epoch(tiny_bert, tiny_tokenizer, toy_corpus):
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, ["train.mask_ratio=0.5"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    one = engine.meta_gradient(TASKS, source, epoch=1, inner_lr=1e-3)[0]
    again = engine.meta_gradient(TASKS, source, epoch=1, inner_lr=1e-3)[0]
    other = engine.meta_gradient(TASKS, source, epoch=2, inner_lr=1e-3)[0]
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not all(torch.allclose(a, b) for a, b in zip(one, other))


def test_bottom_batches_cover_every_window_once_with_little_padding(tiny_bert, tiny_tokenizer, toy_corpus):
    from trainer.modules.bottom import PAD_SLACK

    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, [])
    bottom = FrozenBottom(model, featurizer, batch_size=4)
    rows = [tuple(range(1, n + 1)) for n in (3, 3, 3, 3, 3, 4, 9, 30, 31, 12)] + [(5, 6, 7)]
    batches = [[w.input_ids for w in b] for b in bottom.batches(rows + rows[:3])]
    assert sorted(r for b in batches for r in b) == sorted(set(rows))
    assert all(len(b) <= 4 for b in batches)
    assert all(len(b) * max(map(len, b)) <= PAD_SLACK * sum(map(len, b)) for b in batches if len(b) > 1)
    assert batches == [[w.input_ids for w in b] for b in bottom.batches(list(reversed(rows)))]
    # The states do not depend on the cut beyond rounding: against one window at a time.
    computed = bottom.compute_windows(rows)
    for ids in set(rows):
        alone = bottom.compute(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        assert torch.allclose(computed[ids], alone, atol=1e-9)


@pytest.mark.parametrize("loss_positions", ["first_subword", "all"])
def test_packed_groups_give_the_loss_and_gradient_of_window_rows(tiny_bert, tiny_tokenizer, toy_corpus, loss_positions):
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, [f"train.loss_positions={loss_positions}"])
    bottom = FrozenBottom(model, featurizer)
    # groups of 1-3 windows of different lengths, one without a labelled position
    groups = [source[0] + source[1], source[2], source[3] + source[4] + source[5]]
    groups[1] = [Window(0, source[2][0].input_ids[:2], (IGNORE, IGNORE), ())] + list(groups[1])
    batches = [featurizer.collate(g) for g in groups]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    loss = Top(model, bottom.num_layers).loss_fn(2.0)
    padded, packed = stack(model, featurizer, bottom, groups, batches), stack_packed(model, featurizer, bottom, groups, batches)
    assert packed.ids.shape[:2] == (3, 1) and packed.ids.shape[2] < padded.ids.shape[1] * padded.ids.shape[2]
    assert packed.keep.shape[-1] <= packed.ids.shape[-1]
    for b in range(len(groups)):
        args = [None if a is None else a[b] for a in padded.loss_args()]
        expected = torch.func.grad_and_value(loss)(params, *args)
        got = torch.func.grad_and_value(loss)(params, *[None if a is None else a[b] for a in packed.loss_args()])
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)
        for name in params:
            torch.testing.assert_close(got[0][name], expected[0][name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("count,size", [(32, 4), (17, 4), (15, 4), (5, 2), (1, 4), (0, 4), (9, 32)])
def test_chunks_are_as_few_and_as_even_as_can_be(count, size):
    from trainer.training.engine import even_chunks

    chunks = even_chunks(count, size)
    sizes = [c.stop - c.start for c in chunks]
    assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(count))
    assert len(chunks) == -(-count // size) and all(0 < n <= size for n in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1


def test_task_cost_counts_the_positions_and_the_masked_windows_bottom(tiny_bert, tiny_tokenizer, toy_corpus):
    """Inner steps x support positions + query positions; a query whose masking changed a window
    adds that window's frozen bottom (frozen / (3 x trainable) per position), and only then."""
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, ["train.mask_ratio=0.5"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    frozen, layers = engine.bottom.num_layers, len(model.encoder.encoder.layer)
    assert frozen == 1 and layers > frozen

    def positions(ids):
        return sum(len(w) for i in ids for w in source[i])

    seen_masked = False
    for task in TASKS:
        plain = 2 * positions(task.support) + positions([task.query])
        masked = sum(len(windows[i]) for windows, _, rows in engine._prepare(task, source, 3) for i in rows)
        assert engine.task_cost(task, source, 3) == pytest.approx(plain + masked * frozen / (3 * (layers - frozen)))
        seen_masked = seen_masked or masked > 0
    assert seen_masked, "no query was masked at ratio 0.5"
    engine.cfg = with_overrides(cfg, [("train.mask_ratio", 0.0)])
    assert engine.task_cost(TASKS[0], source, 3) == 2 * positions(TASKS[0].support) + positions([TASKS[0].query])


def _claims(first: int):
    """Two ranks' claims on one counter: rank A claims `first` chunks, then rank B all the rest."""
    counter, taken = iter(range(10 ** 6)), []

    def a() -> int:
        taken.append(None)
        return next(counter) if len(taken) <= first else 10 ** 6

    return a, lambda: next(counter)


@pytest.mark.parametrize("first", [0, 1, 2])
def test_claimed_chunks_sum_to_the_batch_whichever_rank_claims_them(tiny_bert, tiny_tokenizer, toy_corpus, first):
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus,
                                            ["train.mask_ratio=0.5", "train.task_chunk_size=2",
                                             "train.pack_support=always"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    whole, totals = engine.meta_gradient(TASKS, source, epoch=3, inner_lr=1e-3)
    claim_a, claim_b = _claims(first)
    a, totals_a = engine.meta_gradient(TASKS, source, epoch=3, inner_lr=1e-3, claim=claim_a, step=5)
    b, totals_b = engine.meta_gradient(TASKS, source, epoch=3, inner_lr=1e-3, claim=claim_b, step=5)
    widest_first = [part.stop - part.start for part in reversed(even_chunks(len(TASKS), 2))]
    assert totals_a["tasks"] == sum(widest_first[:first]) and totals_a["tasks"] + totals_b["tasks"] == len(TASKS)
    assert totals_a["meta_loss"] + totals_b["meta_loss"] == pytest.approx(totals["meta_loss"], rel=1e-10)
    for name, g, ga, gb in zip(names, whole, a, b):
        torch.testing.assert_close(ga + gb, g, rtol=1e-9, atol=1e-12, msg=name)


def test_a_claimed_chunk_draws_its_dropout_from_the_step_and_chunk(tiny_bert, tiny_tokenizer, toy_corpus):
    """With dropout on, the sum does not depend on which rank ran which chunk; another step draws anew."""
    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus,
                                            ["train.mask_ratio=0.0", "train.task_chunk_size=2"])
    set_dropout(model, 0.3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)

    def split(first: int, step: int) -> list[torch.Tensor]:
        claim_a, claim_b = _claims(first)
        torch.manual_seed(first)  # the global generator's state must not matter
        a, _ = engine.meta_gradient(TASKS, source, epoch=0, inner_lr=1e-3, claim=claim_a, step=step)
        b, _ = engine.meta_gradient(TASKS, source, epoch=0, inner_lr=1e-3, claim=claim_b, step=step)
        return [x + y for x, y in zip(a, b)]

    one, other = split(1, step=5), split(2, step=5)
    for name, x, y in zip(names, one, other):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=name)
    assert not all(torch.allclose(x, y) for x, y in zip(one, split(1, step=6)))


def test_cpu_chunks_hold_a_few_tasks_even_where_one_weight_copy_fills_the_byte_budget(
        tiny_bert, tiny_tokenizer, toy_corpus, monkeypatch):
    """A copy larger than the CPU byte budget (e5-small at 4 frozen layers) still gets
    CPU_MIN_CHUNK tasks per chunk, as memory allows; small copies keep the byte budget's count, and
    an explicit budget_bytes is taken as it is."""
    import trainer.training.engine as engine_module

    cfg, model, featurizer, source = _setup(tiny_bert, tiny_tokenizer, toy_corpus, [])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    one_copy = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if p.requires_grad and not n.startswith("encoder.pooler."))
    assert engine.machine_capacity() == engine_module.CPU_CHUNK_BYTES // one_copy > engine_module.CPU_MIN_CHUNK
    monkeypatch.setattr(engine_module, "CPU_CHUNK_BYTES", one_copy - 1)
    assert engine.machine_capacity() == engine_module.CPU_MIN_CHUNK
    engine.budget_bytes = one_copy - 1
    assert engine.machine_capacity() == 1

"""BertAdam against its formulas (pytorch_pretrained_bert 0.6.x) and the optimiser factory."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.config import load_config
from trainer.training.optim import (
    BertAdam,
    clip_tensor_grad,
    make_optimizer,
    optimizer_step,
    param_groups,
    schedule_factor,
    warmup_linear,
)


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_warmup_linear_matches_the_reference_formula():
    # progress < warmup: progress / warmup; after: max((progress - 1) / (warmup - 1), 0)
    assert schedule_factor(0, 100, 0.1) == 0.0
    assert schedule_factor(5, 100, 0.1) == pytest.approx(0.5)
    assert schedule_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert schedule_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert schedule_factor(100, 100, 0.1) == 0.0
    assert schedule_factor(150, 100, 0.1) == 0.0
    assert schedule_factor(7, -1, 0.1) == 1.0
    # warmup -1 means none: linear decay from 1 at step 0
    assert warmup_linear(0.25, -1) == pytest.approx(0.75)


def test_first_step_is_about_3_16_lr_sign_g_without_bias_correction():
    p = _param([0.5, -0.2, 0.1, 0.0])
    g = torch.tensor([0.3, -0.02, 1e-3, -0.4], dtype=torch.float64)  # norm < 1: no clipping
    opt = BertAdam([p], lr=1e-3, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    expected = -1e-3 * (0.1 * g) / (torch.sqrt(0.001 * g * g) + 1e-6)
    torch.testing.assert_close(p.detach() - before, expected, rtol=1e-12, atol=1e-15)
    # ~ 3.16 * lr * sign(g) where |g| >> e
    big = g.abs() > 0.1
    torch.testing.assert_close((p.detach() - before)[big], -1e-3 * math.sqrt(10) * g.sign()[big], rtol=1e-3, atol=0)


def test_second_step_uses_uncorrected_moments():
    p = _param([1.0, -2.0])
    opt = BertAdam([p], lr=0.01, weight_decay=0.0, max_grad_norm=0)
    g1, g2 = torch.tensor([0.5, 0.1], dtype=torch.float64), torch.tensor([-0.2, 0.3], dtype=torch.float64)
    p.grad = g1.clone()
    opt.step()
    after_one = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    v = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2
    torch.testing.assert_close(p.detach(), after_one - 0.01 * m / (v.sqrt() + 1e-6), rtol=1e-12, atol=1e-15)


def test_lr_is_exactly_zero_at_step_zero_with_warmup_then_follows_schedule():
    p = _param([1.0, 2.0, 3.0])
    opt = BertAdam([p], lr=0.1, warmup=0.1, t_total=20, weight_decay=0.0)
    before = p.detach().clone()
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), before)
    # the next step runs at lr * (1 / 20) / 0.1 = lr / 2
    assert opt.current_lr() == [pytest.approx(0.05)]
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["step"] == 2


def test_constant_lr_when_t_total_is_minus_one():
    opt = BertAdam([_param([1.0])], lr=0.3)
    assert opt.current_lr() == [0.3]


def test_each_tensor_is_clipped_on_its_own():
    a, b = _param([3.0, 4.0]), _param([0.3, 0.4])
    a.grad = torch.tensor([30.0, 40.0], dtype=torch.float64)  # norm 50 -> clipped to 1
    b.grad = torch.tensor([0.03, 0.04], dtype=torch.float64)  # norm 0.05 -> untouched
    opt = BertAdam([a, b], lr=1e-3, weight_decay=0.0, max_grad_norm=1.0)
    opt.step()
    torch.testing.assert_close(opt.state[a]["next_m"], 0.1 * torch.tensor([0.6, 0.8], dtype=torch.float64) * (50 / (50 + 1e-6)))
    torch.testing.assert_close(opt.state[b]["next_m"], 0.1 * torch.tensor([0.03, 0.04], dtype=torch.float64))


def test_clip_tensor_grad_equals_torch_clip_grad_norm():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 7.0):
        p = torch.nn.Parameter(torch.randn(5, 3))
        p.grad = torch.randn(5, 3) * scale
        ours = clip_tensor_grad(p.grad.clone(), 1.0)
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        assert torch.equal(ours, p.grad)


def test_decoupled_weight_decay_is_added_to_the_update_before_lr():
    p = _param([2.0, -1.0])
    g = torch.tensor([0.2, 0.1], dtype=torch.float64)
    opt = BertAdam([p], lr=0.01, weight_decay=0.5)
    p.grad = g.clone()
    opt.step()
    update = (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6) + 0.5 * torch.tensor([2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), torch.tensor([2.0, -1.0], dtype=torch.float64) - 0.01 * update)


def test_step_with_explicit_gradients_matches_step_and_leaves_grad_alone():
    torch.manual_seed(1)
    p1, p2 = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    q1, q2 = torch.nn.Parameter(p1.detach().clone()), torch.nn.Parameter(p2.detach().clone())
    g = [torch.randn(4) * 3, None]
    a = BertAdam([p1, p2], lr=0.01)
    b = BertAdam([q1, q2], lr=0.01)
    a.step_with(g)
    q1.grad = g[0].clone()
    b.step()
    assert p1.grad is None and p2.grad is None
    assert torch.equal(p1, q1) and torch.equal(p2, q2)  # a None gradient skips the parameter
    with pytest.raises(ValueError, match="gradients"):
        a.step_with([g[0]])


def test_param_groups_exclude_biases_and_layernorm_from_weight_decay(tiny_bert):
    from trainer.modules.model import NerModel

    model = NerModel.from_pretrained(tiny_bert, dropout=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    excluded = {names[id(p)] for p in plain["params"]}
    assert "classifier.weight" in decayed and "classifier.bias" in excluded
    assert any("LayerNorm.weight" in n for n in excluded)
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decayed)
    assert len(decayed) + len(excluded) == len(list(model.parameters()))


def test_make_optimizer_bertadam_and_adamw_schedules():
    cfg = load_config(None, ["train.warmup_proportion=0.25"])
    p = _param([1.0, 1.0])
    opt, sched = make_optimizer([p], cfg, lr=0.1, t_total=8)
    assert isinstance(opt, BertAdam) and sched is None
    cfg = load_config(None, ["train.optimizer=adamw", "train.warmup_proportion=0.25"])
    opt, sched = make_optimizer([p], cfg, lr=0.1, t_total=8)
    assert isinstance(opt, torch.optim.AdamW)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2, dtype=torch.float64)
        optimizer_step(opt, sched, cfg.train.max_grad_norm)
    expected = [0.1 * schedule_factor(s, 8, 0.25) for s in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[0] == 0.0 and seen[2] == pytest.approx(0.1)


@pytest.mark.parametrize("t_total", [1, 7, 440, 2000])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.25, 0.5])
def test_bertadam_schedule_is_transformers_linear_schedule_with_warmup(t_total, warmup):
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([_param([1.0])], lr=1.0)
    factor = get_linear_schedule_with_warmup(opt, warmup * t_total, t_total).lr_lambdas[0]
    for step in range(t_total + 3):
        assert schedule_factor(step, t_total, warmup) == pytest.approx(factor(step), abs=1e-12), step


def test_inner_adapting_steps_as_bertadam_and_restores_bit_for_bit():
    from trainer.training.inner import adapting

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    entry = [a.detach().clone(), b.detach().clone()]
    groups = param_groups([("w", a), ("bias", b)], weight_decay=0.01)
    twin = [torch.nn.Parameter(t.clone()) for t in entry]
    reference = BertAdam(param_groups([("w", twin[0]), ("bias", twin[1])], weight_decay=0.01), lr=0.1)
    with adapting(groups, lr=0.1, max_grad_norm=1.0) as adapt:
        for _ in range(2):
            adapt(((a @ torch.ones(3) + b.sum()) ** 2).sum())
            reference.step_with(torch.autograd.grad(((twin[0] @ torch.ones(3) + twin[1].sum()) ** 2).sum(), twin))
        assert torch.equal(a, twin[0]) and torch.equal(b, twin[1]) and not torch.equal(a, entry[0])
        assert a.grad is None
    assert torch.equal(a, entry[0]) and torch.equal(b, entry[1])
    with pytest.raises(RuntimeError, match="boom"), adapting(groups, lr=0.1, max_grad_norm=1.0) as adapt:
        adapt((a ** 2).sum())
        raise RuntimeError("boom")
    assert torch.equal(a, entry[0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="warmup"):
        BertAdam([_param([1.0])], lr=0.1, warmup=1.5)
    with pytest.raises(ValueError, match="schedule"):
        BertAdam([_param([1.0])], lr=0.1, schedule="cosine")


def test_compiled_steps_fall_back_to_the_same_expression_eagerly(monkeypatch):
    """Where torch.compile cannot run (no compiler), the closed-form steps still give BertAdam's result."""
    import trainer.training.optim as optim

    def broken():
        raise RuntimeError("no C++ compiler")

    torch.manual_seed(0)
    params = {"a.weight": torch.randn(5, 4, dtype=torch.float64), "a.bias": torch.randn(5, dtype=torch.float64)}
    g1 = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in params.items()}
    g2 = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in params.items()}

    def two_steps(compiled):
        kw = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, compiled=compiled)
        a, state = optim.batched_bertadam_step(params, {n: g.clone() for n, g in g1.items()}, None,
                                               keep_state="second_last", **kw)
        return optim.batched_bertadam_step(a, {n: g.clone() for n, g in g2.items()}, state, keep_state=False, **kw)[0]

    expected = two_steps(False)
    monkeypatch.setattr(optim, "_compiled", broken)
    monkeypatch.setattr(optim, "_EAGER_FALLBACK", [])
    got = two_steps(True)
    assert optim._EAGER_FALLBACK == [True]
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compiled", [False, True])
def test_new_weight_copies_go_into_the_buffers_given_and_own_copies_are_updated_in_place(compiled):
    import trainer.training.optim as optim

    torch.manual_seed(0)
    params = {"a.weight": torch.randn(5, 4, dtype=torch.float64), "a.bias": torch.randn(5, dtype=torch.float64)}
    g1 = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in params.items()}
    g2 = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in params.items()}
    kw = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, compiled=compiled)
    first, state = optim.batched_bertadam_step(params, {n: g.clone() for n, g in g1.items()}, None,
                                               keep_state="second_last", **kw)
    expected = optim.batched_bertadam_step(first, {n: g.clone() for n, g in g2.items()}, state, keep_state=False, **kw)[0]
    buffers = {n: torch.full((3, *p.shape), float("nan"), dtype=torch.float64) for n, p in params.items()}
    into, state = optim.batched_bertadam_step(params, {n: g.clone() for n, g in g1.items()}, None,
                                              keep_state="second_last", out=buffers, **kw)
    assert all(into[n].data_ptr() == buffers[n].data_ptr() for n in params)
    got = optim.batched_bertadam_step(into, {n: g.clone() for n, g in g2.items()}, state, keep_state=False, **kw)[0]
    for n in params:
        assert got[n].data_ptr() == buffers[n].data_ptr()
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-14)

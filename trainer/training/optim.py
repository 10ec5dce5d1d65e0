"""BertAdam, the optimiser of the paper's code, and the choice between it and torch's AdamW.

BertAdam comes from `pytorch_pretrained_bert` 0.6.x, which no maintained library ships any more
(transformers dropped it with pytorch_pretrained_bert, and torch's Adam/AdamW always apply bias
correction), so it is written here. Its behaviour, kept exactly:
- each parameter tensor's gradient is clipped to `max_grad_norm` on its own (not the global norm);
- no bias correction: update = m / (sqrt(v) + e), so a fresh optimiser's first step is
  lr * 0.1 g / (sqrt(0.001) |g|) ~ 3.16 * lr * sign(g);
- decoupled weight decay added to the update before the learning rate: update += wd * p;
- the learning rate is scaled by the schedule at the step count *before* the step, so with warmup
  the very first step has lr 0.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEDULES = ("warmup_linear", "constant")
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; kept for identical results.
_CLIP_EPS = 1e-6


def warmup_linear(progress: float, warmup: float) -> float:
    """pytorch_pretrained_bert 0.6.x WarmupLinearSchedule: rise over `warmup`, then fall to 0 at 1.

    transformers' `get_linear_schedule_with_warmup` gives the same factors (the AdamW path uses it);
    BertAdam keeps this form because it schedules inside the optimiser, from each parameter's own
    step count, as the original does, and an optimiser cannot hold a torch LR scheduler."""
    warmup = max(warmup, 0.0)
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def schedule_factor(step: int, t_total: int, warmup: float, schedule: str = "warmup_linear") -> float:
    """Learning-rate multiplier at `step` (0-based); t_total < 0 means a constant rate."""
    if schedule == "constant" or t_total < 0:
        return 1.0
    return warmup_linear(step / t_total, warmup)


def clip_tensor_grad(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`grad` scaled as clip_grad_norm_([p], max_norm) would scale p.grad (a new tensor): the
    batched steps' clipping on a single slice."""
    if max_norm <= 0:
        return grad
    return grad * _clip_coefficients(grad.detach().unsqueeze(0), max_norm)[0]


def _clip_coefficients(g: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-slice factor of per-tensor clipping, shaped to broadcast over a slice ([C, 1, ...])."""
    shape = (-1, *([1] * (g.dim() - 1)))
    if max_grad_norm <= 0:
        return torch.ones(g.shape[0], device=g.device, dtype=g.dtype).view(shape)
    norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1)
    return torch.clamp(max_grad_norm / (norm + _CLIP_EPS), max=1.0).view(shape)


class BertAdam(Optimizer):
    """Adam without bias correction, per-tensor clipping and decoupled weight decay (see module doc).

    `warmup` is a fraction of `t_total` (-1 or 0: none); `t_total=-1` keeps the learning rate
    constant. The schedule's values live in each param group as plain numbers and strings, so
    `state_dict()` holds only tensors and plain types.
    """

    def __init__(self, params, lr: float, warmup: float = -1, t_total: int = -1,
                 schedule: str = "warmup_linear", b1: float = 0.9, b2: float = 0.999, e: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0):
        if lr < 0.0:
            raise ValueError(f"BertAdam lr={lr}: the learning rate must be 0 or more")
        if schedule not in SCHEDULES:
            raise ValueError(f"BertAdam schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"BertAdam warmup={warmup}: give a fraction of t_total in [0, 1), or -1 for none")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"BertAdam betas ({b1}, {b2}) must be in [0, 1)")
        if e < 0.0:
            raise ValueError(f"BertAdam e={e} must be 0 or more")
        defaults = dict(lr=lr, warmup=warmup, t_total=t_total, schedule=schedule, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def ordered_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def current_lr(self) -> list[float]:
        """The learning rate the next step of each group will use."""
        out = []
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"] if self.state.get(p)]
            step = steps[0] if steps else 0
            out.append(group["lr"] * schedule_factor(step, group["t_total"], group["warmup"], group["schedule"]))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One update from each parameter's `.grad`; `.grad` is clipped in place, as the original does."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                p.grad.copy_(clip_tensor_grad(p.grad, group["max_grad_norm"]))
                self._update(p, p.grad, group)
        return loss

    @torch.no_grad()
    def step_with(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """One update from explicit gradients, one per parameter in `ordered_params()` order.

        Leaves `.grad` untouched, so inner-loop updates cannot leak into an accumulated meta-gradient.
        A None gradient skips its parameter, as a None `.grad` does in `step`.
        """
        params = self.ordered_params()
        if len(grads) != len(params):
            raise ValueError(f"step_with got {len(grads)} gradients for {len(params)} parameters")
        it = iter(grads)
        for group in self.param_groups:
            for p in group["params"]:
                grad = next(it)
                if grad is not None:
                    self._update(p, clip_tensor_grad(grad, group["max_grad_norm"]), group)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["next_m"] = torch.zeros_like(p)
            state["next_v"] = torch.zeros_like(p)
        next_m, next_v = state["next_m"], state["next_v"]
        next_m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
        next_v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
        update = next_m / (next_v.sqrt() + group["e"])
        if group["weight_decay"] > 0.0:
            update += group["weight_decay"] * p
        lr = group["lr"] * group.get("lr_scale", 1.0) * schedule_factor(state["step"], group["t_total"],
                                                                        group["warmup"], group["schedule"])
        p.add_(update, alpha=-lr)
        state["step"] += 1


def no_decay(name: str) -> bool:
    """Biases and LayerNorm weights take no weight decay (BERT's and the official code's rule)."""
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "layernorm" in name


def is_classifier(name: str) -> bool:
    return name.startswith("classifier.")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]] | torch.nn.Module,
                 weight_decay: float, classifier_lr_scale: float = 1.0) -> list[dict]:
    """Groups of trainable parameters: with `weight_decay`, and without (biases, LayerNorm).

    With `classifier_lr_scale` other than 1, the classifier's parameters form groups of their own
    whose `lr_scale` multiplies every learning rate they are stepped with.
    """
    if isinstance(named_params, torch.nn.Module):
        named_params = named_params.named_parameters()
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ConfigError("no trainable parameters: check model.num_frozen_layers and the freeze settings")
    split = classifier_lr_scale != 1.0
    parts = [(1.0, [x for x in named if not (split and is_classifier(x[0]))])]
    if split:
        parts.append((classifier_lr_scale, [x for x in named if is_classifier(x[0])]))
    groups = []
    for scale, members in parts:
        groups += [{"params": [p for n, p in members if not no_decay(n)], "weight_decay": weight_decay,
                    "lr_scale": scale},
                   {"params": [p for n, p in members if no_decay(n)], "weight_decay": 0.0, "lr_scale": scale}]
    return groups


def ordered_groups(model: torch.nn.Module, cfg) -> tuple[list[dict], list[torch.nn.Parameter], list[str]]:
    """(groups, params, names) of the model's trainable weights for `cfg.train`: one order for
    everything, the optimiser's, so that explicit gradient buffers line up with it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = param_groups(named, cfg.train.weight_decay, cfg.train.classifier_lr_scale)
    by_id = {id(p): n for n, p in named}
    params = [p for g in groups for p in g["params"]]
    return groups, params, [by_id[id(p)] for p in params]


def make_optimizer(params, cfg, lr: float, t_total: int):
    """(optimizer, scheduler) as `cfg.train.optimizer` says; the scheduler is None for BertAdam,
    which schedules itself. `params` are parameter groups or tensors."""
    train = cfg.train
    if train.optimizer == "bertadam":
        return BertAdam(params, lr=lr, warmup=train.warmup_proportion, t_total=t_total,
                        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm), None
    if train.optimizer == "adamw":
        # transformers deferred: see trainer.modules.model.load_encoder.
        from transformers import get_constant_schedule, get_linear_schedule_with_warmup

        # Weight decay comes from the groups; eps as BertAdam's e.
        if params and isinstance(params[0], dict):  # torch's AdamW knows no lr_scale: fold it in
            params = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in params]
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=train.weight_decay)
        if t_total < 0:
            return optimizer, get_constant_schedule(optimizer)
        # The same factors as `schedule_factor` (tests/test_optim.py checks it step by step).
        return optimizer, get_linear_schedule_with_warmup(optimizer, train.warmup_proportion * t_total, t_total)
    raise ConfigError(f"train.optimizer={train.optimizer!r}: choose bertadam or adamw")


def optimizer_step(optimizer, scheduler, max_grad_norm: float) -> None:
    """Apply accumulated `.grad`s: BertAdam clips per tensor itself; AdamW gets a global clip."""
    if not isinstance(optimizer, BertAdam) and max_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


# BertAdam's defaults (pytorch_pretrained_bert), the only values the official code uses.
B1, B2, EPS = 0.9, 0.999, 1e-6


def batched_bertadam_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                          state: Optional[dict] = None, *, lr: float, weight_decay: float, max_grad_norm: float,
                          classifier_lr_scale: float = 1.0, keep_state: Union[bool, str] = True,
                          compiled: bool = False, out: Optional[dict] = None) -> tuple[dict, Optional[dict]]:
    """One BertAdam step (constant rate) for many independent copies of the weights at once.

    `grads` carry a leading dimension, one slice per copy (a task, a sentence); `params` have it
    too, or not when every copy starts from the same weights. Exactly `BertAdam._update` per slice:
    per-tensor clipping of each slice, m and v without bias correction, decoupled weight decay
    (none for biases and LayerNorm), the classifier's rate scaled. `state` is None for a fresh
    optimiser. `keep_state`: True keeps m and v; False keeps nothing (a last step);
    "second_last" keeps only the first step's gradient, for a last second step in closed form.
    The gradients are consumed, and weights that already have the leading dimension are updated
    in place (the copies are the caller's own). `compiled` runs the closed-form steps as
    torch.compile'd kernels (worth it from about a million weights per copy; the first call of
    each of the two steps compiles, about 45 s for e5-small's 36 tensors on one CPU thread, once
    per machine: torch's on-disk cache serves later processes in seconds). `out`: tensors shaped
    like the gradients that receive new weights that would otherwise be fresh (shared weights'
    first step): buffers kept across calls spare the system faulting in fresh pages for every
    copy, which on one CPU thread cost more than the step itself. Returns (new weights, state or None).

    Why closed forms: these steps are passes over one copy of the trainable weights per slice,
    bound by memory traffic; from fresh state, m and v are functions of the gradients, so the
    first two steps are written with the clipping folded into scalars and no moment stored.
    """
    if keep_state not in (True, False, "second_last"):
        raise ValueError(f"keep_state={keep_state!r}: True, False or 'second_last'")
    if keep_state == "second_last" and state is not None:
        raise ValueError("keep_state='second_last' is for the first step (state None)")
    if compiled and (state is None or "g" in state):
        return _compiled_step(params, grads, state, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                              classifier_lr_scale=classifier_lr_scale, keep_state=keep_state, out=out)
    new, kept = {}, ({"m": {}, "v": {}} if keep_state is True else {"g": {}, "c": {}})
    for name, g in grads.items():
        p = params[name]
        c = _clip_coefficients(g, max_grad_norm)
        rate = lr * (classifier_lr_scale if is_classifier(name) else 1.0)
        decay = weight_decay if weight_decay > 0 and not no_decay(name) else 0.0
        # p - rate * (m / (sqrt(v) + e) + decay * p) = p * (1 - rate * decay) - rate * m / (sqrt(v) + e); the
        # decayed p is one tensor for all slices while they still share their weights, and slices of
        # their own are updated in place.
        own = p.shape == g.shape
        start = (p.mul_(1 - rate * decay) if own else p * (1 - rate * decay)) if decay else p
        if state is None:
            new[name] = _first(start, g, c, rate)
            if keep_state is True:
                g.mul_(c)
                kept["m"][name], kept["v"][name] = g * (1 - B1), g.square().mul_(1 - B2)
            elif keep_state == "second_last":
                kept["g"][name], kept["c"][name] = g, c
        elif "g" in state:
            new[name] = _second(start, state["g"][name], state["c"][name], g, c, rate)
        else:
            g.mul_(c)
            m = state["m"][name].lerp_(g, 1 - B1)
            v = state["v"][name].mul_(B2).addcmul_(g, g, value=1 - B2)
            new[name] = _apply(start, m, v.sqrt().add_(EPS), -rate)
            if keep_state is True:
                kept["m"][name], kept["v"][name] = m, v
        if out is not None and new[name].shape != p.shape:
            new[name] = out[name].copy_(new[name])
    return new, (kept if keep_state else None)


def _apply(start: torch.Tensor, numer: torch.Tensor, denom: torch.Tensor, value: float) -> torch.Tensor:
    if start.shape == numer.shape:
        return start.addcdiv_(numer, denom, value=value)
    return torch.addcdiv(start, numer, denom, value=value)


# (1 - b1) / sqrt(1 - b2): m / sqrt(v) of a fresh step, per unit of g / |g|.
_K1 = (1 - B1) / math.sqrt(1 - B2)


def _first(start: torch.Tensor, g: torch.Tensor, c: torch.Tensor, rate: float) -> torch.Tensor:
    """From fresh state, with g clipped to c g: m / (sqrt(v) + e) = K1 g / (|g| + e / (sqrt(1 - b2) c))."""
    denom = g.abs().add_(EPS / (math.sqrt(1 - B2) * c))
    return _apply(start, g, denom, -rate * _K1)


def _second(start: torch.Tensor, g1: torch.Tensor, c1: torch.Tensor, g2: torch.Tensor, c2: torch.Tensor,
            rate: float) -> torch.Tensor:
    """The second step from fresh state: with r = c1 / c2,
    m / (sqrt(v) + e) = K1 (b1 r g1 + g2) / (sqrt(b2 r^2 g1^2 + g2^2) + e / (sqrt(1 - b2) c2))."""
    r = c1 / c2
    # sqrt(a^2 + b^2) rather than torch.hypot, whose careful CPU kernel is several times slower.
    denom = (g1 * (math.sqrt(B2) * r)).square_().addcmul_(g2, g2).sqrt_().add_(EPS / (math.sqrt(1 - B2) * c2))
    numer = g2.addcmul_(g1, B1 * r)
    return _apply(start, numer, denom, -rate * _K1)


def _compiled_step(params: dict, grads: dict, state: Optional[dict], *, lr: float, weight_decay: float,
                   max_grad_norm: float, classifier_lr_scale: float, keep_state,
                   out: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """`batched_bertadam_step`'s first or second step from fresh state, every tensor in one compiled
    call (`_fused`), each slice's clipping factor computed inside it."""
    names = list(grads)
    rates = [lr * (classifier_lr_scale if is_classifier(n) else 1.0) for n in names]
    keeps = [1 - r * (weight_decay if weight_decay > 0 and not no_decay(n) else 0.0) for n, r in zip(names, rates)]
    g0 = grads[names[0]]
    scalars = torch.tensor([rates, keeps], device=g0.device, dtype=g0.dtype)
    gs = [grads[n] for n in names]
    ps = [params[n] for n in names]
    # Weights of their own are updated in place; shared ones get new copies, in `out` if given.
    dest = [p if p.shape == g.shape else (None if out is None else out[n]) for n, p, g in zip(names, ps, gs)]
    if state is None:
        new, cs = _fused(0, max_grad_norm, ps, scalars, gs, dest)
    else:
        new, cs = _fused(1, max_grad_norm, ps, scalars, gs, dest, [state["g"][n] for n in names],
                         [state["c"][n] for n in names])
    kept: Optional[dict] = None
    if keep_state is True:
        kept = {"m": {}, "v": {}}
        for n, g, c in zip(names, gs, cs):
            g.mul_(c)
            kept["m"][n], kept["v"][n] = g * (1 - B1), g.square().mul_(1 - B2)
    elif keep_state == "second_last":
        kept = {"g": dict(zip(names, gs)), "c": dict(zip(names, cs))}
    return {n: d if d is not None else w for n, d, w in zip(names, dest, new)}, kept


def _steps(which: int, max_grad_norm: float, ps: list, scalars: torch.Tensor, gs: list, dest: list,
           g1s: Sequence = (), c1s: Sequence = ()) -> tuple[list, list]:
    """The closed-form step `which` (0 first, 1 second) of every tensor, `scalars` [2, n] their rates
    and decay factors (1 - rate * decay); a new weight goes into its `dest` tensor where there is one
    (and is then not returned: None in its place). Returns (new weights, clipping factors)."""
    new, cs = [], []
    for i, (p, g) in enumerate(zip(ps, gs)):
        c = _clip_coefficients(g, max_grad_norm)
        if which == 0:
            value = _first_fused(p, scalars[1, i], g, c, scalars[0, i])
        else:
            value = _second_fused(p, scalars[1, i], g1s[i], c1s[i], g, c, scalars[0, i])
        if dest[i] is None:
            new.append(value)
        else:
            dest[i].copy_(value)
            new.append(None)
        cs.append(c)
    return new, cs


def _first_fused(p: torch.Tensor, keep: torch.Tensor, g: torch.Tensor, c: torch.Tensor, rate: torch.Tensor):
    """`_first` on p * keep (keep = 1 - rate * decay) as one expression, for torch.compile."""
    return p * keep - (rate * _K1) * g / (g.abs() + EPS / (math.sqrt(1 - B2) * c))


def _second_fused(p: torch.Tensor, keep: torch.Tensor, g1: torch.Tensor, c1: torch.Tensor, g2: torch.Tensor,
                  c2: torch.Tensor, rate: torch.Tensor):
    """`_second` on p * keep as one expression, for torch.compile."""
    r = c1 / c2
    a = g1 * (math.sqrt(B2) * r)
    denom = torch.sqrt(a * a + g2 * g2) + EPS / (math.sqrt(1 - B2) * c2)
    return p * keep - (rate * _K1) * (g2 + g1 * (B1 * r)) / denom


@functools.lru_cache(maxsize=None)
def _compiled():
    """`_steps` compiled (torch.compile): one call per step for every tensor, each tensor's clipping
    norm and update fused into a loop or two. Eager, each tensor is six to ten passes and a dozen
    small calls (measured 12x slower on a [4, 1536, 384] copy on one CPU thread); a call per
    tensor cost e5-small's 36 trainable tensors about a tenth of a meta-step in dispatch alone.
    Rates go in as a tensor so that a scheduled rate does not recompile."""
    return torch.compile(_steps, dynamic=True, fullgraph=True)


_EAGER_FALLBACK: list = []  # set once compiling failed in this process


def _fused(*args):
    """The compiled `_steps`, or the same expressions eagerly where compiling fails (no C++
    compiler on a CPU machine, no Triton on a GPU one): slower, same result."""
    if not _EAGER_FALLBACK:
        try:
            return _compiled()(*args)
        except Exception as err:  # torch.compile raises many kinds (backend, compiler, lowering)
            logger.warning("torch.compile of BertAdam's closed-form steps failed (%s: %s); running them "
                           "eagerly (set train.compile_updates=never to skip the attempt)",
                           type(err).__name__, str(err).splitlines()[0][:200])
            _EAGER_FALLBACK.append(True)
    return _steps(*args)

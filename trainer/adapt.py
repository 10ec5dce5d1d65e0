"""Prediction, and test-time adaptation: one BertAdam step on a sentence's support set, then predict.

Each target sentence is adapted from the same meta weights. The sequential path steps the model in
place with a fresh optimiser and restores the trainable parameters exactly afterwards. The batched
path adapts B sentences at once without touching the model: per-sentence gradients with
torch.func (vmap over grad of a functional call), then BertAdam's first step in closed form, then a
vmapped forward of each sentence under its own adapted weights. The frozen bottom (embeddings and
frozen layers) does not depend on those weights: it runs once per distinct window, outside vmap,
and only the trainable top runs per sentence. From fresh state BertAdam's first
step is exact in closed form (m = 0.1 g, v = 0.001 g^2 after per-tensor clipping of g, plus weight
decay), which is why the batched path serves num_adapt_steps == 1 and more steps go sequentially.

Dropout during the adaptation step follows the model's mode: the official code steps in train mode
(dropout on); `Adapter` keeps the model in eval mode, which makes adaptation deterministic and lets
the batched path run. Prediction is always in eval mode.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import torch
from torch.func import functional_call, grad, vmap

from .corpus import Sentence, content_key
from .features import FEATURES_VERSION, IGNORE, Featurizer, Window, labelled_predictions
from .losses import token_loss
from .model import NerModel, trainable_parameters
from .optim import BertAdam, is_classifier, no_decay, param_groups
from .scoring import score

logger = logging.getLogger(__name__)

# BertAdam's defaults (pytorch_pretrained_bert), the only values the official code uses.
_B1, _B2, _EPS = 0.9, 0.999, 1e-6


@dataclass(frozen=True)
class AdaptSettings:
    adapt_lr: float
    num_adapt_steps: int
    weight_decay: float
    max_grad_norm: float
    lambda_max: float = 0.0
    classifier_lr_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "AdaptSettings":
        return cls(cfg.adapt.adapt_lr, cfg.adapt.num_adapt_steps, cfg.train.weight_decay,
                   cfg.train.max_grad_norm, cfg.adapt.lambda_max, cfg.train.classifier_lr_scale)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- plain prediction


def _window_predictions(model: NerModel, featurizer: Featurizer, windows: Sequence[Window],
                        batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = _to(featurizer.collate(windows[start:start + batch_size]), _device(model))
                logits = model(batch["input_ids"], batch["attention_mask"])
                out.extend(labelled_predictions(logits, batch["labels"]))
    finally:
        model.train(was_training)
    return out


def predict(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
            batch_size: int = 32) -> list[list[str]]:
    """Tags of each sentence in eval mode, windows merged back into words."""
    if not sentences:
        return []
    windows = featurizer.encode(sentences)
    return featurizer.merge(sentences, windows, _window_predictions(model, featurizer, windows, batch_size))


def evaluate(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence], batch_size: int = 32) -> dict:
    """conlleval-style scores of the model's predictions on gold-tagged sentences."""
    predicted = predict(model, featurizer, sentences, batch_size)
    return score([list(s.tags) for s in sentences], predicted)


# ---------------------------------------------------------------- sequential adaptation


def _adapted_sequential(model: NerModel, featurizer: Featurizer, sentence: Sentence,
                        support: Sequence[Sentence], s: AdaptSettings) -> tuple[list[str], list[torch.Tensor]]:
    """Tags and per-window logits of `sentence` after adapting in place; weights restored."""
    named = trainable_parameters(model)
    groups = param_groups(named, s.weight_decay, s.classifier_lr_scale)
    params = [p for g in groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    try:
        if s.num_adapt_steps > 0 and support:
            batch = _to(featurizer.collate(featurizer.encode(support)), _device(model))
            # A fresh optimiser each sentence: the first step is ~3.16 * adapt_lr * sign(g).
            optimizer = BertAdam(groups, lr=s.adapt_lr, max_grad_norm=s.max_grad_norm)
            for _ in range(s.num_adapt_steps):
                logits = model(batch["input_ids"], batch["attention_mask"])
                loss = token_loss(logits, batch["labels"], s.lambda_max)
                optimizer.step_with(torch.autograd.grad(loss, params, allow_unused=True))
        windows = featurizer.encode([sentence])
        target = _to(featurizer.collate(windows), _device(model))
        model.eval()
        with torch.no_grad():
            logits = model(target["input_ids"], target["attention_mask"])
        tags = featurizer.merge([sentence], windows, labelled_predictions(logits, target["labels"]))[0]
        return tags, [logits[i, : len(w)] for i, w in enumerate(windows)]
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        model.train(was_training)


def adapt_and_predict(model: NerModel, featurizer: Featurizer, sentence: Sentence,
                      support_sentences: Sequence[Sentence], adapt_lr: float, num_adapt_steps: int, *,
                      weight_decay: float, max_grad_norm: float, lambda_max: float = 0.0) -> list[str]:
    """Adapt the model to one sentence's support set, tag the sentence, restore the weights."""
    settings = AdaptSettings(adapt_lr, num_adapt_steps, weight_decay, max_grad_norm, lambda_max)
    return _adapted_sequential(model, featurizer, sentence, support_sentences, settings)[0]


# ---------------------------------------------------------------- batched adaptation


def _stack_windows(model: NerModel, featurizer: Featurizer, groups: Sequence[Sequence[Window]]):
    """[B, W, T] ids, 4-D masks and labels; filler windows attend to their first position only, so
    they stay finite, and carry no label, so they add nothing to losses."""
    count, width = max(len(g) for g in groups), max(len(w) for g in groups for w in g)
    ids = torch.full((len(groups), count, width), featurizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    mask[:, :, 0] = 1
    for b, group in enumerate(groups):
        batch = featurizer.collate(group)
        n, t = batch["input_ids"].shape
        ids[b, :n, :t], mask[b, :n, :t], labels[b, :n, :t] = batch["input_ids"], batch["attention_mask"], batch["labels"]
    device = _device(model)
    mask4d = model.attention_mask_4d(mask.view(-1, width).to(device))
    return ids.to(device), mask4d.view(len(groups), count, *mask4d.shape[1:]), labels.to(device)


def _first_step(params: dict, grads: dict, s: AdaptSettings) -> dict:
    """BertAdam's first step from fresh state, per sentence (leading dimension of `grads`).

    m / (sqrt(v) + eps) with m = (1 - b1) g and v = (1 - b2) g^2, written in place on the
    per-sentence gradients (which it consumes): these are B copies of every trainable weight, and
    each extra temporary would be a full pass over them.
    """
    adapted = {}
    for name, p in params.items():
        g = grads[name]
        if s.max_grad_norm > 0:
            norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), 2, dim=1)
            coef = torch.clamp(s.max_grad_norm / (norm + 1e-6), max=1.0)
            g.mul_(coef.view(-1, *([1] * p.dim())))
        denom = g.abs().mul_(math.sqrt(1 - _B2)).add_(_EPS)
        g.mul_(1 - _B1).div_(denom)
        del denom
        if not no_decay(name) and s.weight_decay > 0:
            g.add_(p, alpha=s.weight_decay)
        lr = s.adapt_lr * (s.classifier_lr_scale if is_classifier(name) else 1.0)
        adapted[name] = g.mul_(-lr).add_(p)
    return adapted


PrefixCache = dict  # window input ids (tuple) -> frozen-bottom hidden states [len, hidden]


def _prefix(model: NerModel, featurizer: Featurizer, groups: Sequence[Sequence[Window]], width: int,
            num_layers: int, cache: Optional[PrefixCache]) -> Optional[torch.Tensor]:
    """Frozen-bottom hidden states [B, W, T, H] of stacked windows (zeros where padded).

    The bottom is identical for every sentence's adapted weights (and for every checkpoint that
    shares the pretrained frozen layers), so it runs once per distinct window, outside vmap, in
    batches of similar length; `cache` keeps it for later chunks, units and checkpoints. Padded
    positions are masked as keys and carry no label, so their values never reach an output.
    """
    if num_layers == 0:
        return None
    cache = {} if cache is None else cache
    missing = sorted({w.input_ids for g in groups for w in g if w.input_ids not in cache}, key=len)
    device = _device(model)
    with torch.no_grad():
        for start in range(0, len(missing), 32):
            part = [Window(0, ids, (IGNORE,) * len(ids), ()) for ids in missing[start:start + 32]]
            batch = featurizer.collate(part)
            mask4d = model.attention_mask_4d(batch["attention_mask"].to(device))
            hidden = model.prefix(batch["input_ids"].to(device), mask4d, num_layers)
            for row, w in enumerate(part):
                cache[w.input_ids] = hidden[row, : len(w)].cpu()
    count = max(len(g) for g in groups)
    out = torch.zeros(len(groups), count, width, model.encoder.config.hidden_size, device=device)
    for b, group in enumerate(groups):
        for i, w in enumerate(group):
            out[b, i, : len(w)] = cache[w.input_ids]
    return out


def _encode_groups(featurizer: Featurizer, groups: Sequence[Sequence[Sentence]]) -> list[list[Window]]:
    """Windows of each group of sentences, from one tokenizer call for all of them (a call per
    sentence costs more than the tokenisation itself at these sizes)."""
    owner = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
    out: list[list[Window]] = [[] for _ in groups]
    for w in featurizer.encode([s for group in groups for s in group]):
        g, i = owner[w.sentence]
        out[g].append(replace(w, sentence=i))  # numbered within its group, as encode(group) numbers it
    return out


def _adapted_batched(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
                     supports: Sequence[Sequence[Sentence]], s: AdaptSettings,
                     prefix_cache: Optional[PrefixCache] = None):
    """Tags and per-window logits of each sentence after one step from the meta weights."""
    if s.num_adapt_steps != 1:
        raise ValueError("the batched path takes exactly one adaptation step; use the sequential path")
    if model.training:
        raise ValueError("the batched path needs the model in eval mode (no dropout)")
    support_windows = _encode_groups(featurizer, supports)
    for i, windows in enumerate(support_windows):
        if not windows or all(all(l == IGNORE for l in w.labels) for w in windows):
            raise ValueError(f"sentence {i} of the batch has no labelled support sentence to adapt on")
    params = {n: p.detach() for n, p in trainable_parameters(model)}
    start = model.num_frozen_prefix()

    def forward(p, ids, mask4d, hidden):
        if hidden is None:
            return functional_call(model, p, (ids, mask4d))
        return functional_call(model, p, (None, mask4d), {"hidden_states": hidden, "start_layer": start})

    def support_loss(p, ids, mask4d, hidden, labels):
        return token_loss(forward(p, ids, mask4d, hidden), labels, s.lambda_max, check=False)

    with warnings.catch_warnings():
        # torch has no batching rule for the CPU fused attention kernel and loops over it instead.
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        ids, mask4d, labels = _stack_windows(model, featurizer, support_windows)
        hidden = _prefix(model, featurizer, support_windows, ids.shape[-1], start, prefix_cache)
        dims = (None, 0, 0, None if hidden is None else 0, 0)
        grads = vmap(grad(support_loss), in_dims=dims)(params, ids, mask4d, hidden, labels)
        adapted = _first_step(params, grads, s)
        del grads, hidden
        target_windows = _encode_groups(featurizer, [[sentence] for sentence in sentences])
        ids, mask4d, labels = _stack_windows(model, featurizer, target_windows)
        hidden = _prefix(model, featurizer, target_windows, ids.shape[-1], start, prefix_cache)
        with torch.no_grad():
            logits = vmap(forward, in_dims=(0, 0, 0, None if hidden is None else 0))(adapted, ids, mask4d, hidden)
    out = []
    for b, (sentence, windows) in enumerate(zip(sentences, target_windows)):
        n = len(windows)
        predicted = labelled_predictions(logits[b, :n], labels[b, :n])
        tags = featurizer.merge([sentence], windows, predicted)[0]
        out.append((tags, [logits[b, i, : len(w)] for i, w in enumerate(windows)]))
    return out


def can_batch(model: NerModel, settings: AdaptSettings) -> bool:
    return settings.num_adapt_steps == 1 and not model.training


def adapt_many(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
               supports: Sequence[Sequence[Sentence]], cfg, batched: Optional[bool] = None,
               prefix_cache: Optional[PrefixCache] = None) -> list[list[str]]:
    """Tags of each sentence, each adapted from the meta weights on its own support set.

    Runs the batched path in chunks of `adapt.batch_size` where it applies (one step, eval mode,
    a non-empty support), the sequential path otherwise; `batched` forces a choice. The batched
    path fills and reads `prefix_cache` (see `_prefix`).
    """
    if len(sentences) != len(supports):
        raise ValueError(f"{len(sentences)} sentences but {len(supports)} support sets")
    settings = AdaptSettings.from_config(cfg)
    use_batched = can_batch(model, settings) if batched is None else batched
    out: list[Optional[list[str]]] = [None] * len(sentences)
    pending = [i for i in range(len(sentences)) if supports[i]] if use_batched else []
    # Chunks of similar length: every window of a chunk is padded to the chunk's longest, and
    # compute here is dominated by those padded positions when lengths mix.
    pending.sort(key=lambda i: (max(len(s.words) for s in supports[i]), len(sentences[i].words)))
    for i in sorted(set(range(len(sentences))) - set(pending)):
        out[i] = _adapted_sequential(model, featurizer, sentences[i], supports[i], settings)[0]
    size = cfg.adapt.batch_size
    for start in range(0, len(pending), size):
        chunk = pending[start:start + size]
        results = _adapted_batched(model, featurizer, [sentences[i] for i in chunk],
                                   [supports[i] for i in chunk], settings, prefix_cache)
        for i, (tags, _) in zip(chunk, results):
            out[i] = tags
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- a unit of work for a pool


@dataclass(frozen=True)
class AdaptItem:
    id: Any
    sentence: Sentence
    support: tuple[Sentence, ...] = ()


class Adapter:
    """Tags batches of target sentences, adapting to each one's support set (or not, as a baseline).

    A plain class: the cluster layer turns it into an actor. `source` is a checkpoint folder or a
    model. With `prefix_dir`, each unit's frozen-bottom hidden states are kept there (see
    `PrefixStore`), so another checkpoint with the same frozen layers skips that part of the work.
    """

    def __init__(self, source: Union[str, os.PathLike, NerModel], featurizer: Optional[Featurizer] = None,
                 cfg=None, device: str = "cpu", prefix_dir: Union[str, os.PathLike, None] = None):
        from .config import Config

        self.cfg = cfg if cfg is not None else Config()
        if isinstance(source, (str, os.PathLike)):
            from .checkpoint import load_model

            model, tokenizer, _ = load_model(source)
            if featurizer is None:
                if tokenizer is None:
                    raise ValueError(f"checkpoint {source} holds no tokenizer; pass a featurizer")
                featurizer = Featurizer(tokenizer, self.cfg.model.max_length, self.cfg.model.window_context,
                                        model.labels)
        else:
            model = source
        if featurizer is None:
            raise ValueError("Adapter needs a featurizer when given a model")
        self.model, self.featurizer = model.to(device), featurizer
        self.model.eval()
        self.prefix = PrefixStore(prefix_dir, self.model, featurizer) if prefix_dir else None

    def run(self, unit: Sequence[Union[AdaptItem, tuple]]) -> dict[Any, list[str]]:
        """Predicted tags per item id for one unit (a list of items)."""
        items = [i if isinstance(i, AdaptItem) else AdaptItem(*i) for i in unit]
        sentences = [i.sentence for i in items]
        if not self.cfg.adapt.enabled or self.cfg.adapt.num_adapt_steps == 0:
            tags = predict(self.model, self.featurizer, sentences, self.cfg.adapt.batch_size)
        else:
            supports = [list(i.support) for i in items]
            cache = self.prefix.load(items) if self.prefix else None
            known = len(cache) if cache is not None else 0
            tags = adapt_many(self.model, self.featurizer, sentences, supports, self.cfg, prefix_cache=cache)
            if self.prefix and cache and len(cache) > known:
                self.prefix.save(items, cache)
        return {item.id: t for item, t in zip(items, tags)}


class PrefixStore:
    """Frozen-bottom hidden states of whole units on disk, one file per unit, written atomically.

    Files sit under a key of everything they depend on: the frozen parameters themselves (so a
    checkpoint whose bottom differs never reads them), how many layers are frozen, and how
    sentences are cut into windows. Why by hand: nothing in torch or transformers caches
    intermediate activations across processes and runs.
    """

    def __init__(self, folder: Union[str, os.PathLike], model: NerModel, featurizer: Featurizer):
        import hashlib
        from pathlib import Path

        self.num_layers = model.num_frozen_prefix()
        h = hashlib.sha256(repr((self.num_layers, featurizer.max_length, featurizer.context,
                                 type(model.encoder).__name__, FEATURES_VERSION)).encode())
        if self.num_layers:
            frozen = [model.encoder.embeddings, *list(model.encoder.encoder.layer[:self.num_layers])]
            for module in frozen:
                for name, t in sorted(module.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        self.folder = Path(folder) / h.hexdigest()[:16]

    def _path(self, items: Sequence[AdaptItem]):
        import hashlib

        content = repr([(content_key(i.sentence), [content_key(s) for s in i.support]) for i in items])
        return self.folder / f"{hashlib.sha256(content.encode()).hexdigest()[:24]}.pt"

    def load(self, items: Sequence[AdaptItem]) -> PrefixCache:
        path = self._path(items)
        if not self.num_layers or not path.is_file():
            return {}
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # a damaged file only costs recomputing it
            logger.warning("ignoring unreadable prefix cache %s (%s)", path, err)
            return {}

    def save(self, items: Sequence[AdaptItem], cache: PrefixCache) -> None:
        path = self._path(items)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(cache, tmp)
        os.replace(tmp, path)

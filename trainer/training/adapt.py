"""Test-time adaptation: one BertAdam step on a sentence's support set, then predict.

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
import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch.func import grad, vmap

from trainer.data.corpus import Sentence, content_key
from trainer.data.features import IGNORE, Featurizer, Soft, Window, labelled_predictions
from trainer.modules.batched import VMAP_ATTENTION, Top, quiet_vmap, stack
from trainer.modules.bottom import BottomStore, FrozenBottom
from trainer.modules.losses import token_loss
from trainer.modules.model import NerModel, attention, in_mode, trainable_parameters
from trainer.training.checkpoint import load_model, use_config
from trainer.training.inner import adapting
from trainer.training.optim import batched_bertadam_step, param_groups
from trainer.training.predict import device_of, predict, predict_soft, to_device
from trainer.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

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


class Adapted(NamedTuple):
    """One sentence after adaptation: its tags, and the logits of each of its windows."""

    tags: list[str]
    logits: list[torch.Tensor]
    windows: list[Window]

    def soft(self, featurizer: Featurizer, sentence: Sentence) -> Soft:
        return featurizer.merge_soft([sentence], self.windows, self.logits)[0]


# ---------------------------------------------------------------- sequential adaptation


def _adapted_sequential(model: NerModel, featurizer: Featurizer, sentence: Sentence,
                        support: Sequence[Sentence], s: AdaptSettings) -> Adapted:
    """`sentence` after adapting in place; weights and mode restored (the step runs in the mode
    given, the labelling in eval mode)."""
    named = trainable_parameters(model)
    groups = param_groups(named, s.weight_decay, s.classifier_lr_scale)
    # A fresh optimiser each sentence: the first step is ~3.16 * adapt_lr * sign(g).
    with in_mode(model, None), adapting(groups, s.adapt_lr, s.max_grad_norm) as adapt:
        if s.num_adapt_steps > 0 and support:
            batch = to_device(featurizer.collate(featurizer.encode(support)), device_of(model))
            for _ in range(s.num_adapt_steps):
                logits = model(batch["input_ids"], batch["attention_mask"])
                adapt(token_loss(logits, featurizer.loss_labels(batch), s.lambda_max))
        windows = featurizer.encode([sentence])
        target = to_device(featurizer.collate(windows), device_of(model))
        model.eval()
        with torch.no_grad():
            logits = model(target["input_ids"], target["attention_mask"])
        tags = featurizer.merge([sentence], windows, labelled_predictions(logits, target["labels"]))[0]
        return Adapted(tags, [logits[i, : len(w)] for i, w in enumerate(windows)], windows)


# ---------------------------------------------------------------- batched adaptation


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
                     bottom: Optional[FrozenBottom] = None) -> list[Adapted]:
    """Each sentence after one step from the meta weights."""
    if s.num_adapt_steps != 1:
        raise ValueError("the batched path takes exactly one adaptation step; use the sequential path")
    if model.training:
        raise ValueError("the batched path needs the model in eval mode (no dropout)")
    support_windows = _encode_groups(featurizer, supports)
    for i, windows in enumerate(support_windows):
        if not windows or all(all(l == IGNORE for l in w.labels) for w in windows):
            raise ValueError(f"sentence {i} of the batch has no labelled support sentence to adapt on")
    bottom = FrozenBottom(model, featurizer) if bottom is None else bottom
    top = Top(model, bottom.num_layers)
    params = {n: p.detach() for n, p in trainable_parameters(model)}
    with quiet_vmap(), attention(model, VMAP_ATTENTION):
        support = stack(model, featurizer, bottom, support_windows, keep=True)
        grads = vmap(grad(top.loss_fn(s.lambda_max)), in_dims=support.loss_dims(None))(params, *support.loss_args())
        del support
        adapted, _ = batched_bertadam_step(params, grads, None, lr=s.adapt_lr, weight_decay=s.weight_decay,
                                           max_grad_norm=s.max_grad_norm, classifier_lr_scale=s.classifier_lr_scale,
                                           keep_state=False)
        del grads
        target_windows = _encode_groups(featurizer, [[sentence] for sentence in sentences])
        target = stack(model, featurizer, bottom, target_windows)
        with torch.no_grad():
            logits = vmap(top.logits, in_dims=(0, 0, 0, target.hidden_dim))(
                adapted, target.ids, target.mask4d, target.hidden)
    out = []
    for b, (sentence, windows) in enumerate(zip(sentences, target_windows)):
        n = len(windows)
        predicted = labelled_predictions(logits[b, :n], target.labels[b, :n])
        tags = featurizer.merge([sentence], windows, predicted)[0]
        out.append(Adapted(tags, [logits[b, i, : len(w)] for i, w in enumerate(windows)], windows))
    return out


def can_batch(model: NerModel, settings: AdaptSettings) -> bool:
    return settings.num_adapt_steps == 1 and not model.training


def adapt_many(model: NerModel, featurizer: Featurizer, sentences: Sequence[Sentence],
               supports: Sequence[Sequence[Sentence]], cfg, batched: Optional[bool] = None,
               bottom: Optional[FrozenBottom] = None, soft: bool = False) -> list:
    """Tags of each sentence, each adapted from the meta weights on its own support set; with
    `soft`, (tags, `Soft`) of each: the adapted model's probabilities too.

    Runs the batched path in chunks of `adapt.batch_size` where it applies (one step, eval mode,
    a non-empty support), the sequential path otherwise; `batched` forces a choice. The batched
    path reads the frozen bottom from `bottom` and adds what it computes to it.
    """
    if len(sentences) != len(supports):
        raise ValueError(f"{len(sentences)} sentences but {len(supports)} support sets")
    settings = AdaptSettings.from_config(cfg)
    bottom = FrozenBottom(model, featurizer) if bottom is None else bottom
    use_batched = can_batch(model, settings) if batched is None else batched
    out: list = [None] * len(sentences)

    def keep(i: int, adapted: Adapted) -> None:
        out[i] = (adapted.tags, adapted.soft(featurizer, sentences[i])) if soft else adapted.tags

    pending = [i for i in range(len(sentences)) if supports[i]] if use_batched else []
    # Chunks of similar length: every window of a chunk is padded to the chunk's longest, and
    # compute here is dominated by those padded positions when lengths mix.
    pending.sort(key=lambda i: (max(len(s.words) for s in supports[i]), len(sentences[i].words)))
    for i in sorted(set(range(len(sentences))) - set(pending)):
        keep(i, _adapted_sequential(model, featurizer, sentences[i], supports[i], settings))
    size = cfg.adapt.batch_size
    for start in range(0, len(pending), size):
        chunk = pending[start:start + size]
        results = _adapted_batched(model, featurizer, [sentences[i] for i in chunk],
                                   [supports[i] for i in chunk], settings, bottom)
        for i, adapted in zip(chunk, results):
            keep(i, adapted)
    return out


# ---------------------------------------------------------------- a unit of work for a pool


@dataclass(frozen=True)
class AdaptItem:
    id: Any
    sentence: Sentence
    support: tuple[Sentence, ...] = ()


class Adapter:
    """Tags batches of target sentences, adapting to each one's support set (or not, as a baseline).

    A plain class: the cluster layer turns it into an actor. `source` is a checkpoint folder or a
    model; `cfg` the settings it adapts and labels with (default for a folder: the checkpoint's
    own, trainer.training.checkpoint.use_config). With `prefix_dir`, each unit's frozen-bottom hidden states
    are kept there (see `BottomStore`), so another checkpoint with the same frozen layers skips
    that part of the work.
    """

    def __init__(self, source: Union[str, os.PathLike, NerModel], featurizer: Optional[Featurizer] = None,
                 cfg=None, device: str = "cpu", prefix_dir: Union[str, os.PathLike, None] = None):
        if cfg is None:
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError("Adapter needs cfg, the settings it adapts and labels with, when given a model")
            cfg = use_config(source)
        self.cfg = cfg
        if isinstance(source, (str, os.PathLike)):
            model, tokenizer, _ = load_model(source)
            if featurizer is None:
                if tokenizer is None:
                    raise CheckpointError(f"checkpoint {source} holds no tokenizer; pass a featurizer")
                featurizer = Featurizer(tokenizer, self.cfg.model.max_length, self.cfg.model.window_context,
                                        model.labels)
        else:
            model = source
        if featurizer is None:
            raise ValueError("Adapter needs a featurizer when given a model")
        self.model, self.featurizer = model.to(device).set_precision(self.cfg.train.precision), featurizer
        self.model.eval()
        self.store = BottomStore(prefix_dir, self.model, featurizer) if prefix_dir else None

    def run(self, unit: Sequence[Union[AdaptItem, tuple]], soft: bool = False) -> dict[Any, Any]:
        """Predicted tags per item id for one unit (a list of items); with `soft`, (tags, `Soft`)."""
        items = [i if isinstance(i, AdaptItem) else AdaptItem(*i) for i in unit]
        sentences = [i.sentence for i in items]
        if not self.cfg.adapt.enabled or self.cfg.adapt.num_adapt_steps == 0:
            tags = (predict_soft if soft else predict)(self.model, self.featurizer, sentences,
                                                      self.cfg.adapt.batch_size)
        else:
            supports = [list(i.support) for i in items]
            content = self.content(items)
            states = self.store.load(content, device_of(self.model)) if self.store else {}
            bottom = FrozenBottom(self.model, self.featurizer, dict(states))
            tags = adapt_many(self.model, self.featurizer, sentences, supports, self.cfg, bottom=bottom, soft=soft)
            if self.store and len(bottom) > len(states):
                self.store.save(content, bottom.states)
        return {item.id: t for item, t in zip(items, tags)}

    @staticmethod
    def content(items: Sequence[AdaptItem]) -> str:
        """What a unit's stored frozen-bottom states depend on beyond the model: its sentences."""
        return repr([(content_key(i.sentence), [content_key(s) for s in i.support]) for i in items])

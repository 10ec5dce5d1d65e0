"""The paper's model: a pretrained encoder, dropout and a linear token classifier.

Pretrained encoders (a hub id or a folder save_pretrained wrote) load here; anything read from a
metaner checkpoint (its model, its encoder, model.init_checkpoint) loads in trainer.training.checkpoint.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from trainer.config import default
from trainer.data.corpus import LABELS
from trainer.data.features import labels_for
from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)

# train.precision: the arithmetic of forward passes. Weights, gradients and optimiser state stay
# fp32 whatever it is; "bf16" runs the matmuls under torch.autocast.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Files of which a local model folder needs at least one for its tokenizer: transformers 5 builds
# an empty 5-token vocabulary from a folder that has none, and every word would become [UNK].
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")


def _local_folder(name_or_path: str, what: str) -> bool:
    """True for an existing folder; a path that names no folder is refused before the hub is asked."""
    if os.path.isdir(name_or_path):
        return True
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path):
        raise ConfigError(f"{what} {name_or_path!r} is not a folder; set model.name_or_path to a hub id or "
                          "a folder holding config.json, the weights and the tokenizer files")
    return False


def load_encoder(name_or_path: str | os.PathLike) -> nn.Module:
    """`AutoModel` from a hub id or local folder, with a ConfigError that names the setting (a
    checkpoint's encoder: trainer.training.checkpoint.load_encoder)."""
    # transformers takes seconds to import, and reads the Hugging Face settings of the environment
    # when imported (jobs.console.setup sets some after this module is): only loading a model needs it.
    from transformers import AutoModel

    name_or_path = os.fspath(name_or_path)
    _local_folder(name_or_path, "encoder")
    try:
        encoder, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True)
    except OSError as err:
        raise ConfigError(f"cannot load the encoder {name_or_path!r} ({err}); set model.name_or_path to a "
                          "hub id or a folder holding config.json and the weights") from None
    # The pooler is not used (tokens' states and [CLS] come from the last layer); anything else
    # missing would be randomly initialised and silently give meaningless vectors and tags.
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError(f"the encoder {name_or_path!r} lacks {len(missing)} of its weights ({shown}), which would "
                          "start random; point model.name_or_path at a folder written by save_pretrained, or pass a "
                          "metaner checkpoint as --checkpoint")
    return encoder


def load_tokenizer(name_or_path: str | os.PathLike):
    """The fast tokenizer of a hub id or local folder; a folder without tokenizer files is refused."""
    # transformers deferred: see load_encoder.
    from transformers import AutoTokenizer

    name_or_path = os.fspath(name_or_path)
    if _local_folder(name_or_path, "tokenizer") and not any(
            os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{name_or_path} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                          "save the tokenizer into it with tokenizer.save_pretrained, or point "
                          "model.name_or_path at a folder that has one")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise ConfigError(f"cannot load the tokenizer {name_or_path!r} ({err}); set model.name_or_path to a "
                          "hub id or a folder holding the tokenizer files") from None


class NerModel(nn.Module):
    """Encoder (any Hugging Face `AutoModel`) + dropout + linear layer over the last hidden states.

    `dropout` is the head's; the encoder keeps the dropout of its own config (BERT's 0.1).
    """

    def __init__(self, encoder: nn.Module, labels: Sequence[str] = LABELS, dropout: float = default("model.dropout"),
                 seed: Optional[int] = None):
        super().__init__()
        if not labels:
            raise ValueError("labels must name at least one tag")
        self.encoder = encoder
        self.labels = tuple(labels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, len(self.labels))
        # BERT's initialisation of a new head, from a seed of its own so that the head does not
        # depend on whatever consumed the global RNG before.
        std = getattr(encoder.config, "initializer_range", 0.02)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=generator) * std)
            self.classifier.bias.zero_()
        self.precision = "fp32"

    def set_precision(self, precision: str) -> "NerModel":
        """The arithmetic of every forward pass from now on (train.precision), fp32 weights kept."""
        if precision not in PRECISIONS:
            raise ConfigError(f"train.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of hidden states between layers (and of the kept frozen bottom): bf16, or the
        weights' own."""
        return torch.bfloat16 if self.precision == "bf16" else next(self.parameters()).dtype

    def mixed_precision(self):
        """torch.autocast to bf16 on the weights' device where train.precision is bf16 (its
        backward follows the forward's casts), else nothing."""
        if self.precision != "bf16":
            return nullcontext()
        return torch.autocast(next(self.parameters()).device.type, dtype=torch.bfloat16)

    @classmethod
    def from_pretrained(cls, name_or_path: str, labels: Sequence[str] = LABELS, dropout: float = default("model.dropout"),
                        seed: Optional[int] = None) -> "NerModel":
        """Load the encoder from a hub id or a local folder and add a fresh classifier."""
        return cls(load_encoder(name_or_path), labels, dropout, seed)

    def forward(self, input_ids: Optional[torch.Tensor], attention_mask: torch.Tensor,
                hidden_states: Optional[torch.Tensor] = None, start_layer: int = 0,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [batch, length, labels]; `attention_mask` may be 2-D or a prepared 4-D mask.

        With `hidden_states` (the output of `prefix(..., start_layer)`) and a 4-D mask, only the
        layers from `start_layer` on run: the frozen bottom is computed once and shared. With
        `keep` [batch, S] (positions of each row; 4-D mask, `can_keep()`), the last layer and the
        classifier run at those positions only and the logits are [batch, S, labels].
        """
        with self.mixed_precision():
            hidden = self._last_hidden(input_ids, attention_mask, hidden_states, start_layer, keep)
            logits = self.classifier(self.dropout(hidden))
        # The loss and the predictions read fp32 logits (a bf16 softmax loses the max term's ranks).
        return logits.float() if self.precision == "bf16" else logits

    def _last_hidden(self, input_ids, attention_mask, hidden_states, start_layer: int, keep) -> torch.Tensor:
        if keep is not None:
            hidden = self.encoder.embeddings(input_ids=input_ids) if hidden_states is None else hidden_states
            layers = encoder_layers(self.encoder)[0 if hidden_states is None else start_layer:]
            for layer in layers[:-1]:
                hidden = layer(hidden, attention_mask)
            hidden = layer_at(layers[-1], hidden, attention_mask, keep)
        elif hidden_states is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = hidden_states
            for layer in encoder_layers(self.encoder)[start_layer:]:
                hidden = layer(hidden, attention_mask)
        return hidden

    def can_keep(self) -> bool:
        """Whether `forward(keep=...)` applies: a BERT-style encoder whose last layer is an
        encoder-only block of the shape `layer_at` mirrors (absolute positions, no cross-attention)."""
        if not self.can_split():
            return False
        config, last = self.encoder.config, encoder_layers(self.encoder)[-1]
        attention = getattr(last, "attention", None)
        attn = getattr(attention, "self", None)
        return (not getattr(config, "is_decoder", False) and not getattr(config, "chunk_size_feed_forward", 0)
                and getattr(config, "position_embedding_type", "absolute") == "absolute"
                and all(hasattr(attn, a) for a in ("query", "key", "value", "dropout", "scaling", "attention_head_size"))
                and None not in (getattr(attention, "output", None), getattr(last, "intermediate", None),
                                 getattr(last, "output", None)))

    def can_split(self) -> bool:
        """Whether `prefix` applies: a BERT-style encoder (embeddings, then encoder.layer)."""
        inner = getattr(self.encoder, "encoder", None)
        return (getattr(self.encoder, "embeddings", None) is not None
                and isinstance(getattr(inner, "layer", None), nn.ModuleList))

    def prefix(self, input_ids: torch.Tensor, mask4d: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first `num_layers` layers (4-D mask), in
        `compute_dtype`."""
        with self.mixed_precision():
            hidden = self.encoder.embeddings(input_ids=input_ids)
            for layer in encoder_layers(self.encoder)[:num_layers]:
                hidden = layer(hidden, mask4d)
        return hidden.to(self.compute_dtype)

    def num_frozen_prefix(self) -> int:
        """Layers at the bottom whose parameters, and the embeddings', are all frozen."""
        if not self.can_split() or any(p.requires_grad for p in self.encoder.embeddings.parameters()):
            return 0
        count = 0
        for layer in encoder_layers(self.encoder):
            if any(p.requires_grad for p in layer.parameters()):
                break
            count += 1
        return count

    def attention_mask_4d(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The 4-D mask the encoder would build from a 2-D one, always materialised.

        Under torch.func.vmap the encoder cannot build it itself (it checks `mask.all()`, which is
        data-dependent control flow); a prepared 4-D mask is passed through as is.
        """
        # transformers deferred: see load_encoder.
        from transformers.masking_utils import create_bidirectional_mask

        dtype = next(self.encoder.parameters()).dtype
        shape_only = torch.empty(attention_mask.shape[0], attention_mask.shape[1], 1, dtype=dtype,
                                 device=attention_mask.device)
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=shape_only,
                                         attention_mask=attention_mask, allow_is_bidirectional_skip=False)


@contextmanager
def in_mode(module: nn.Module, training: Optional[bool]) -> Iterator[nn.Module]:
    """`module` in train (True) or eval (False) mode for the block, or left as it is (None); the
    mode it had before is restored after, also on errors."""
    was_training = module.training
    if training is not None:
        module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def evaluating(module: nn.Module):
    """`module` in eval mode for the block (see `in_mode`)."""
    return in_mode(module, False)


@contextmanager
def attention(model: "NerModel", implementation: str) -> Iterator[None]:
    """The encoder's attention implementation switched for the block (transformers reads
    `config._attn_implementation` at every forward, for the masks as for the layers)."""
    config = model.encoder.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def layer_at(layer: nn.Module, hidden: torch.Tensor, mask4d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A BERT-style layer's output [N, S, H] at positions `keep` [N, S] of `hidden` [N, T, H]:
    keys and values from every position, queries, the attention's output and the feed-forward at
    the kept ones. Why by hand: transformers' layers compute every position, and a loss read at
    first subwords never reads the last layer's others (MosaicBERT's masked-LM head does the
    same); the attention is transformers' eager one, written for a query set smaller than the
    key set, with the rows of `mask4d` [N, 1, T, T] (additive, or boolean as built for SDPA) at the
    kept positions."""
    attn = layer.attention.self
    picked = hidden.gather(1, keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    mask = mask4d.gather(2, keep[:, None, :, None].expand(-1, mask4d.shape[1], -1, mask4d.shape[-1]))
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, attn.attention_head_size).transpose(1, 2)

    scores = heads(attn.query(picked)) @ heads(attn.key(hidden)).transpose(2, 3) * attn.scaling
    probs = attn.dropout((scores + mask).softmax(dim=-1))
    context = (probs @ heads(attn.value(hidden))).transpose(1, 2).reshape(picked.shape)
    out = layer.attention.output(context, picked)
    return layer.output(layer.intermediate(out), out)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of BERT/XLM-R style (encoder.layer) or DistilBERT (transformer.layer)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "layer"):
        module = encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(f"cannot find the transformer layers of {type(encoder).__name__}; "
                      "freezing supports encoders with encoder.layer or transformer.layer")


def freeze(model: NerModel, num_frozen_layers: int, freeze_embeddings: bool = True,
           freeze_pooler: bool = True) -> None:
    """Make everything trainable, then freeze embeddings, pooler and layers 0..num_frozen_layers-1."""
    layers = encoder_layers(model.encoder)
    if not 0 <= num_frozen_layers <= len(layers):
        raise ConfigError(f"model.num_frozen_layers={num_frozen_layers} but the encoder has {len(layers)} "
                          f"layers; choose 0..{len(layers)}")
    for p in model.parameters():
        p.requires_grad_(True)
    frozen: list[nn.Module] = list(layers[:num_frozen_layers])
    if freeze_embeddings and getattr(model.encoder, "embeddings", None) is not None:
        frozen.append(model.encoder.embeddings)
    if freeze_pooler and getattr(model.encoder, "pooler", None) is not None:
        frozen.append(model.encoder.pooler)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    logger.info("frozen: %d of %d parameter tensors", sum(not p.requires_grad for p in model.parameters()),
                len(list(model.parameters())))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_model(cfg, labels: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                encoder: Optional[nn.Module] = None) -> NerModel:
    """The model as `cfg.model` describes it: `encoder` (default: the pretrained one of
    model.name_or_path), a fresh head (the labels of `train.loss_positions` unless given), frozen
    bottom. A model.init_checkpoint is a checkpoint to read: trainer.training.checkpoint.build_model."""
    if cfg.model.init_checkpoint:
        raise ValueError("model.init_checkpoint is set: build the model with trainer.training.checkpoint.build_model, "
                         "which loads its weights")
    labels = labels_for(cfg.train.loss_positions) if labels is None else labels
    encoder = load_encoder(cfg.model.name_or_path) if encoder is None else encoder
    model = NerModel(encoder, labels, cfg.model.dropout, seed)
    model.set_precision(cfg.train.precision)
    freeze(model, cfg.model.num_frozen_layers, cfg.model.freeze_embeddings, cfg.model.freeze_pooler)
    return model


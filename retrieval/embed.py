"""Sentence vectors from a pretrained encoder: the [CLS] (or mean) hidden state, L2-normalised.

The paper compares sentences by the cosine of mBERT's [CLS] vectors. Vectors are float32 and unit
length, so that FAISS's inner product is the cosine. A sentence longer than the model's window is
represented by its first window (the same cut the trainer makes). An unspaced sentence (Chinese)
is embedded as the featuriser reads it: its characters joined into one string, for encoders whose
vocabulary is not WordPiece.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from trainer.config import Config
from trainer.data.corpus import Sentence
from trainer.utils.digest import files_sha256, text_sha256

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
_WEIGHT_FILES = (".safetensors", ".bin")


def as_sentences(items: Sequence[Any]) -> list[Sentence]:
    """Sentences from Sentence objects or plain word lists (tags are not needed to embed)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Sentence):
            out.append(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item):
            out.append(Sentence(tuple(item), ("O",) * len(item)))
        else:
            raise ValueError(f"item {i} is a {type(item).__name__}; give Sentence objects or lists of words")
    return out


def state_dict_hash(module) -> str:
    """Hash of every tensor of a module (names, dtypes, shapes and values)."""
    # torch and the model code load where vectors are computed (an embedding actor), not in a
    # driver that imports this module to make one.
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}\n".encode())
        # Raw bytes through uint8, which also covers dtypes numpy lacks (bfloat16).
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Embedder:
    """Embed sentences with an encoder: `embed(sentences) -> np.ndarray [n, d] float32`, unit rows.

    `encoder` is a hub id or a local folder (model and tokenizer are loaded from it), or an already
    built model (then `tokenizer` is required: a fast tokenizer or a path to load one from). A
    token-classification model is accepted: its base encoder is used. `device` defaults to the CPU
    for a loaded encoder and to a built encoder's own device (a given device moves it there).
    Settings left out take the defaults of trainer.config.
    """

    def __init__(self, encoder, tokenizer=None, *, max_length: int | None = None,
                 pooling: Literal["cls", "mean"] | None = None, batch_size: int | None = None,
                 device: str | None = None, progress: bool = True):
        # torch and the model code load where vectors are computed (an embedding actor), not in a
        # driver that imports this module to make one.
        from trainer.data.features import Featurizer
        from trainer.modules.model import load_tokenizer
        from trainer.training.checkpoint import load_encoder

        defaults = Config()
        max_length = max_length if max_length is not None else defaults.model.max_length
        pooling = pooling if pooling is not None else defaults.retrieval.pooling
        batch_size = batch_size if batch_size is not None else defaults.retrieval.batch_size
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not known; choose one of {', '.join(POOLINGS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._folder = None
        self._loaded = isinstance(encoder, (str, os.PathLike))
        if self._loaded:
            self.encoder_id = os.fspath(encoder)
            if os.path.isdir(self.encoder_id):
                self._folder = self.encoder_id
            model = load_encoder(self.encoder_id)
            tokenizer = tokenizer if tokenizer is not None else self.encoder_id
        else:
            if tokenizer is None:
                raise ValueError("an already built encoder needs its tokenizer: pass tokenizer=<tokenizer or path>")
            model = getattr(encoder, "base_model", encoder)
            self.encoder_id = type(model).__name__
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if device is None:
            # A built encoder stays where its owner put it; a loaded one starts on the CPU.
            device = "cpu" if self._loaded else str(next(model.parameters()).device)
        self.model = model.to(device)
        self.device = device
        self.tokenizer = tokenizer
        # The first window of a sentence never carries left context, so context=0 changes nothing.
        self.featurizer = Featurizer(tokenizer, max_length=max_length, context=0)
        self.max_length, self.pooling, self.batch_size, self.progress = max_length, pooling, batch_size, progress
        self._fingerprint: str | None = None

    @classmethod
    def from_config(cls, cfg, encoder=None, tokenizer=None, *, device: str | None = None,
                    progress: bool = True) -> "Embedder":
        """An Embedder with the settings of a Config; `encoder` defaults to cfg.model.name_or_path."""
        return cls(encoder if encoder is not None else cfg.model.name_or_path, tokenizer,
                   max_length=cfg.model.max_length, pooling=cfg.retrieval.pooling,
                   batch_size=cfg.retrieval.batch_size, device=device, progress=progress)

    def weights_fingerprint(self) -> str:
        """Hash of the weights file(s) of a local folder, else of the loaded tensors; plus the vocabulary.

        A built encoder may be trained between calls, so its hash is taken afresh each time.
        """
        if self._fingerprint is None or not self._loaded:
            files = []
            if self._folder is not None:
                files = [os.path.join(self._folder, f) for f in os.listdir(self._folder) if f.endswith(_WEIGHT_FILES)]
            weights = files_sha256(sorted(files)) if files else state_dict_hash(self.model)
            vocab = text_sha256(self.tokenizer.backend_tokenizer.to_str())
            self._fingerprint = text_sha256(f"{weights}|{vocab}")
        return self._fingerprint

    def key(self) -> str:
        """Everything that decides the vectors: encoder, weights, vocabulary, window and pooling."""
        # torch, which trainer.data.features imports: deferred, see state_dict_hash.
        from trainer.data.features import FEATURES_VERSION

        # A local folder is named by its weights alone, so that two spellings of one path share entries.
        name = "local" if self._folder is not None else self.encoder_id
        return (f"{name}|{self.weights_fingerprint()}|max_length={self.max_length}|pooling={self.pooling}"
                f"|features=v{FEATURES_VERSION}")

    def first_windows(self, sentences: Sequence[Sentence]):
        """The first window of each sentence, in order."""
        # Tags play no part in the vectors; plain O tags accept any corpus's label set. An
        # unspaced sentence stays unspaced: it is embedded as the text the encoder was trained on.
        untagged = [replace(s, tags=("O",) * len(s.words)) for s in sentences]
        windows, seen = [], set()
        for window in self.featurizer.encode(untagged):
            if window.sentence not in seen:
                seen.add(window.sentence)
                windows.append(window)
        return windows

    def embed(self, sentences: Sequence[Any]) -> np.ndarray:
        # torch deferred: see state_dict_hash.
        import torch

        sentences = as_sentences(sentences)
        width = self.model.config.hidden_size
        if not sentences:
            return np.zeros((0, width), dtype=np.float32)
        windows = self.first_windows(sentences)
        # Batches of similar length waste little on padding; rows go back to input order below.
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        out = np.empty((len(windows), width), dtype=np.float32)
        # torch deferred: see state_dict_hash.
        from trainer.modules.model import evaluating

        with evaluating(self.model), torch.no_grad():
            starts = range(0, len(order), self.batch_size)
            for start in tqdm(starts, desc="embed", unit="batch", disable=not self.progress):
                rows = order[start:start + self.batch_size]
                out[rows] = self._pool(self.featurizer.collate([windows[i] for i in rows]))
        return out

    __call__ = embed

    def _pool(self, batch) -> np.ndarray:
        # torch deferred: see state_dict_hash.
        import torch

        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        output = self.model(input_ids=ids, attention_mask=mask)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden = hidden.float()
        if self.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

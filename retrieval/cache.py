"""On-disk cache of embeddings and neighbour lists (.npy), keyed by everything that decides them.

An entry's name is a hash of its key parts: for embeddings the encoder key (encoder id, weights
and vocabulary fingerprint, max_length, pooling) and the corpus content (the words of every
sentence, in order, and whether it is read unspaced); for neighbours the keys of both embedding
sets, k and the search options. So a changed corpus or model is a different entry and is never
served stale. Entries are written to a
temporary file and renamed into place, and an entry that does not load as the expected array is
recomputed, so a write cut short is never read as valid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from trainer.utils.digest import values_sha256
from trainer.utils.paths import atomic_file, make_output_dir, write_atomic

logger = logging.getLogger(__name__)


def corpus_hash(sentences: Sequence[Any]) -> str:
    """Hash of the words of all sentences in order, and of which are read unspaced (tags do not
    change embeddings)."""
    digest = hashlib.sha256()
    for sentence in sentences:
        words = sentence.words if hasattr(sentence, "words") else sentence
        # Unit and record separators cannot occur inside a corpus token. The group separator marks
        # an unspaced sentence only, so that the hashes of spaced corpora stay what they were.
        unspaced = b"\x1d" if getattr(sentence, "unspaced", False) else b""
        digest.update("\x1f".join(words).encode("utf-8") + unspaced + b"\x1e")
    digest.update(str(len(sentences)).encode())
    return digest.hexdigest()


def key_hash(parts: dict[str, Any]) -> str:
    return values_sha256(parts, 32)


class RetrievalCache:
    """A folder of `<kind>-<hash>.npy` entries, each with a `.json` note of its key parts."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(make_output_dir(root, "retrieval.cache_dir"))

    def path(self, kind: str, parts: dict[str, Any]) -> str:
        return os.path.join(self.root, f"{kind}-{key_hash(parts)}.npy")

    def load(self, path: str, rows: int, dtype) -> np.ndarray | None:
        """The array at `path` if it is complete and has `rows` rows of `dtype`; else None."""
        if not os.path.exists(path):
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            logger.warning("cache entry %s is unreadable (%s); recomputing it", path, err)
            return None
        if array.ndim != 2 or array.shape[0] != rows or array.dtype != np.dtype(dtype):
            logger.warning("cache entry %s has shape %s %s, expected %d rows of %s; recomputing it",
                           path, array.shape, array.dtype, rows, np.dtype(dtype))
            return None
        return array

    def save(self, path: str, array: np.ndarray, parts: dict[str, Any]) -> None:
        with atomic_file(path, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        write_atomic(path[:-len(".npy")] + ".json", json.dumps(parts, sort_keys=True, indent=1, default=str))

    def get_or_compute(self, kind: str, parts: dict[str, Any], rows: int, dtype,
                       compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(kind, parts)
        array = self.load(path, rows, dtype)
        if array is not None:
            logger.info("cache hit: %s", os.path.basename(path))
            return array
        array = np.ascontiguousarray(compute(), dtype=dtype)
        if array.ndim != 2 or array.shape[0] != rows:
            raise ValueError(f"{kind}: computed an array of shape {array.shape}, expected {rows} rows")
        self.save(path, array, parts)
        return array

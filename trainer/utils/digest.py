"""Content hashes: of a file, of several files, of a string, of a record of settings. Every record,
cache key and resume check of the project hashes through these, so that one input always hashes
the same way wherever it is checked."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable

_FILES: dict = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content (hex), computed once per process per file version (path, size,
    mtime): corpora and weights are hashed by several checks of one job. Raises OSError."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _FILES[key] = h.hexdigest()
    return _FILES[key]


def files_sha256(paths: Iterable[str | os.PathLike], label: Callable[[str], str] = os.path.basename) -> str:
    """sha256 over the files in the order given, each as its label (its name by default) and its
    content's digest: renaming or reordering the files changes it, as changing their content does."""
    h = hashlib.sha256()
    for path in paths:
        h.update(label(os.fspath(path)).encode() + b"\0" + file_sha256(path).encode())
    return h.hexdigest()


def text_sha256(text: str, length: int = 64) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def values_sha256(values: Any, length: int = 16) -> str:
    """sha256 of a JSON record (keys sorted; values JSON cannot hold written as str)."""
    return text_sha256(json.dumps(values, sort_keys=True, default=str), length)

"""Output folders that fail at once, naming the setting, when they cannot be created or written;
and files written whole or not at all."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from trainer.utils.errors import ConfigError

# A corpus path may end in '#train' or '#test': a split of a corpus without sentence breaks.
SPLIT_SUFFIX = re.compile(r"^(?P<path>.+)#(?P<split>[^#/\\]*)$", re.S)
SPLITS = ("train", "test")


def make_output_dir(path: str | os.PathLike, setting: str) -> Path:
    """Create `path` (and its parents) and check that files can be written in it.

    `setting` names where the path came from (e.g. "retrieval.cache_dir" or "--out"), so that the
    ConfigError says what to change instead of ending hours of work in an OSError traceback.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = {errno.ENOTDIR: "a part of it is a file, not a folder", errno.EEXIST: "it is a file, not a folder",
                  errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
                  errno.ENOSPC: "no space left"}.get(err.errno, err.strerror or str(err))
        raise ConfigError(f"{setting}: cannot write to the folder {folder} ({reason}); "
                          "choose a writable folder") from None
    return folder


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open file that replaces `path` whole when the block ends without error.

    A reader, or a run resumed after a kill, sees the old content or the new one, never half of
    it: the data goes to a uniquely named hidden file beside `path` (same file system, so the
    rename is atomic), flushed to disk before the rename; on an error that file is removed and
    `path` is left as it was. The folder is created if missing.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, atomically (see `atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(text)


def split_selector(path: str) -> tuple[str, str | None]:
    """(file, split) of a corpus path: only a trailing '#train' or '#test' is a split selector."""
    match = SPLIT_SUFFIX.match(path)
    if match and match["split"] in SPLITS:
        return match["path"], match["split"]
    return path, None

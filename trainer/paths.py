"""Output folders that fail at once, naming the setting, when they cannot be created or written."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def make_output_dir(path: str | os.PathLike, setting: str) -> Path:
    """Create `path` (and its parents) and check that files can be written in it.

    `setting` names where the path came from (e.g. "retrieval.cache_dir" or "--out"), so that the
    ValueError says what to change instead of ending hours of work in an OSError traceback.
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
        raise ValueError(f"{setting}: cannot write to the folder {folder} ({reason}); choose a writable folder") from None
    return folder

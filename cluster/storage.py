"""Storage that every node of a cluster reaches: where Ray Train keeps checkpoints, and where the
training workers and the fine-tuning task put the models that the driver collects.

A process on another node that wrote a model to a path of its own disk would leave the driver
nothing to read; so the workers publish into the job's storage (`cluster.storage_path`: a folder
every node mounts, or an s3:// or gs:// URI through pyarrow's filesystems, as Ray Train reads its
own `storage_path`) and the driver fetches from there into --out. Before any work, a job on several
nodes checks that every folder a process of another node writes or reads is one that node sees
(`shared_problems`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Optional

from trainer.utils.digest import text_sha256
from trainer.utils.errors import ConfigError

from .tracking import tracking_uri

logger = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else os.path.join(root, *parts)


def job_storage(cfg, out: Path) -> str:
    """The storage folder of the job writing into `out`: `<cluster.storage_path>/<out's name>-<hash
    of its absolute path>` (jobs sharing one storage_path never meet), or `<out>/ray` unset."""
    out = Path(out).resolve()
    if not cfg.cluster.storage_path:
        return str(out / "ray")
    root = cfg.cluster.storage_path
    root = root if is_uri(root) else os.path.abspath(os.path.expanduser(root))
    return join(root, f"{out.name}-{text_sha256(str(out), 8)}")


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it)."""
    # pyarrow only for a URI storage (s3://, gs://): a folder needs none of its import.
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    # pyarrow only for a URI storage (s3://, gs://): a folder needs none of its import.
    import pyarrow.fs

    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def list_dirs(path: str) -> list[str]:
    """Full paths (URIs where `path` is one) of the folders directly in `path`, sorted by name."""
    # pyarrow only for a URI storage (s3://, gs://): a folder needs none of its import.
    import pyarrow.fs

    fs, inner = _filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner))
    return sorted(join(path, info.base_name) for info in found if info.type == pyarrow.fs.FileType.Directory)


def publish(local: str | os.PathLike, dest: str) -> None:
    """Put the local folder `local` at `dest`, replacing what is there: uploaded beside it first,
    so that a process killed mid-way leaves the previous folder whole."""
    # pyarrow only for a URI storage (s3://, gs://): a folder needs none of its import.
    import pyarrow.fs

    fs, inner = _filesystem(dest)
    staging = f"{inner}.partial-{uuid.uuid4().hex[:8]}"
    fs.create_dir(staging, recursive=True)
    pyarrow.fs.copy_files(str(Path(local).resolve()), staging, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(inner)
    fs.move(staging, inner)


def publish_written(write, dest: str) -> str:
    """`write(folder)` into a local temporary folder, then `publish` it at `dest`; returns `dest`."""
    with tempfile.TemporaryDirectory(prefix="metaner-") as tmp:
        folder = Path(tmp) / "model"
        write(folder)
        publish(folder, dest)
    return dest


def fetch(src: str, local: str | os.PathLike) -> Optional[Path]:
    """The folder `src` of the storage copied to the local folder `local` (replacing it); None
    where `src` does not exist."""
    # pyarrow only for a URI storage (s3://, gs://): a folder needs none of its import.
    import pyarrow.fs

    if not exists(src):
        return None
    fs, inner = _filesystem(src)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.with_name(f".{local.name}.fetch-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    pyarrow.fs.copy_files(inner, str(staging), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    if local.exists():
        shutil.rmtree(local)
    os.replace(staging, local)
    return local


def checkpoint_at(location: str):
    """A Ray Train Checkpoint of the folder at `location` (a path, or a URI of any pyarrow filesystem)."""
    # Ray deferred: jobs.common imports this module for every command.
    from ray.train import Checkpoint

    fs, inner = _filesystem(location)
    return Checkpoint(path=inner, filesystem=fs)


def pack(folder: str | os.PathLike) -> dict[str, bytes]:
    """The files of a local folder by relative path, to travel through Ray's object store to
    processes on nodes that do not see the folder (a checkpoint on the driver's disk)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes], folder: str | os.PathLike) -> Path:
    root = Path(folder)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ------------------------------------------------------------------------------ several nodes


def _sees(marker: str) -> bool:
    return os.path.exists(marker)


def unseen_by(folder: str, must_exist: bool = False) -> list[str]:
    """Ids of the alive Ray nodes on which a local `folder` is not the driver's: a file the
    driver writes there (or, `must_exist`, the folder itself) is not found."""
    # Ray deferred: jobs.common imports this module for every command.
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = os.path.abspath(folder)
    if must_exist:
        marker = folder
    else:
        os.makedirs(folder, exist_ok=True)
        marker = os.path.join(folder, f".metaner-probe-{uuid.uuid4().hex}")
        Path(marker).write_text("seen")
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(_sees)
        seen = ray.get([probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                        .remote(marker) for n in nodes])
        return [n for n, ok in zip(nodes, seen) if not ok]
    finally:
        if not must_exist:
            Path(marker).unlink(missing_ok=True)


def shared_problems(cfg, storage: str) -> list[str]:
    """On a Ray cluster of several nodes, each folder that a process on another node writes for
    the driver or another rank, or reads, that some node does not see: one line each, naming the
    setting to change. Nothing on one node."""
    # Ray deferred: jobs.common imports this module for every command.
    import ray

    if sum(1 for n in ray.nodes() if n.get("Alive")) < 2:
        return []
    problems = []

    def check(folder: Optional[str], what: str, fix: str, must_exist: bool = False) -> None:
        if folder and not is_uri(folder):
            missing = unseen_by(folder, must_exist)
            if missing:
                problems.append(f"{what} {folder} is not seen by {len(missing)} of the cluster's nodes "
                                f"({', '.join(m[:12] for m in missing)}); {fix}")

    where = "set cluster.storage_path to a folder every node mounts, or to an s3:// or gs:// URI"
    check(storage, "cluster.storage_path" if cfg.cluster.storage_path else "the job's storage (unset "
          "cluster.storage_path: under --out)", where)
    check(cfg.model.prefix_cache_dir, "model.prefix_cache_dir",
          "put it on storage every node mounts, or set model.prefix_cache_dir= (empty) to keep nothing")
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    if uri.startswith("sqlite:///"):
        check(os.path.dirname(uri[len("sqlite:///"):]) or ".", "the MLflow store of mlflow.tracking_uri",
              "log to a tracking server every node reaches (mlflow server; mlflow.tracking_uri=http://HOST:5000)")
    if os.path.isdir(cfg.model.name_or_path):
        check(cfg.model.name_or_path, "model.name_or_path", "put the model on storage every node mounts, or "
              "give a hub id that every node's cache holds", must_exist=True)
    return problems


def check_shared(cfg, storage: str) -> None:
    problems = shared_problems(cfg, storage)
    if problems:
        raise ConfigError("\n".join(problems))

"""Collective helpers that do nothing when there is one process (no process group)."""
from __future__ import annotations

import torch


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _active() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _active() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes in place; unchanged in a single process."""
    import torch.distributed as dist

    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every process; nothing to wait for in a single process."""
    import torch.distributed as dist

    if _active():
        dist.barrier()


def all_gather_object(value) -> list:
    """Every process's `value`, in rank order (picklable objects); `[value]` in a single process."""
    import torch.distributed as dist

    if not _active():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out

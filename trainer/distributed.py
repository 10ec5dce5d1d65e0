"""Collective helpers that do nothing when there is one process (no process group)."""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, Optional

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


class ChunkClaims:
    """Per meta-step, a counter that every rank increments atomically to claim the next chunk of
    tasks (`TaskEngine.meta_gradient(claim=...)`): a TCPStore served by rank 0 (an increment is a
    round trip of tens of microseconds), its port handed to the others over the process group.
    Make it with `chunk_claims()`, on every rank."""

    def __init__(self, timeout_s: float = 1800.0):
        import torch.distributed as dist

        world, timeout = dist.get_world_size(), datetime.timedelta(seconds=timeout_s)
        server, address = None, [None, 0]
        if dist.get_rank() == 0:
            # Where the process group met (env:// init, as Ray Train's is), else this host's name.
            host = os.environ.get("MASTER_ADDR") or socket.getfqdn()
            server = dist.TCPStore(host, 0, world, True, timeout, wait_for_workers=False)
            address = [host, server.port]
        dist.broadcast_object_list(address, src=0)
        self.store = server if server is not None else dist.TCPStore(address[0], address[1], world, False, timeout)

    def __call__(self, step: int) -> Callable[[], int]:
        key = f"meta_step/{step}"
        return lambda: int(self.store.add(key, 1)) - 1


def chunk_claims() -> Optional[ChunkClaims]:
    """Shared chunk claims for the process group; None in a single process (nothing to share)."""
    return ChunkClaims() if world_size() > 1 else None

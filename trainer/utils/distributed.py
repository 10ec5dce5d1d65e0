"""Collective helpers that do nothing when there is one process (no process group).

Every collective of trainer/ and cluster/ goes through this module (tests/test_distributed_helpers.py
checks the source for any other call), so that each runs on the process group's device: NCCL takes
CUDA tensors only, gloo CPU ones (and CUDA ones, by copying). A tensor given on another device is
moved there for the collective and its result comes back where it was.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def group_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current CUDA device under
    NCCL, the CPU otherwise (and in a single process)."""
    if _active() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not _active():
        return tensor
    device = group_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=op)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place (on the group's device for the collective);
    unchanged in a single process."""
    return _reduce(tensor, dist.ReduceOp.SUM if _active() else None)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum of `tensor` over all processes, in place."""
    return _reduce(tensor, dist.ReduceOp.MIN if _active() else None)


def agree_min(value: int) -> int:
    """The smallest of the ranks' `value`s, on every rank."""
    return int(all_reduce_min(torch.tensor([int(value)], dtype=torch.int64)).item())


def barrier() -> None:
    """Wait for every process; nothing to wait for in a single process."""
    if _active():
        if dist.get_backend() == dist.Backend.NCCL:
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(value) -> list:
    """Every process's `value`, in rank order (picklable objects); `[value]` in a single process."""
    if not _active():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)  # pickles through tensors on the current CUDA device under NCCL
    return out


def broadcast_object_list(values: list, src: int = 0) -> list:
    """`values` of rank `src` on every rank (in place); unchanged in a single process."""
    if _active():
        dist.broadcast_object_list(values, src=src, device=group_device())
    return values


class ChunkClaims:
    """Per meta-step, a counter that every rank increments atomically to claim the next chunk of
    tasks (`TaskEngine.meta_gradient(claim=...)`): a TCPStore served by rank 0 (an increment is a
    round trip of tens of microseconds), its port handed to the others over the process group.
    Make it with `chunk_claims()`, on every rank."""

    def __init__(self, timeout_s: float = 1800.0):
        world, timeout = dist.get_world_size(), datetime.timedelta(seconds=timeout_s)
        server, address = None, [None, 0]
        if dist.get_rank() == 0:
            # Where the process group met (env:// init, as Ray Train's is), else this host's name.
            host = os.environ.get("MASTER_ADDR") or socket.getfqdn()
            server = dist.TCPStore(host, 0, world, True, timeout, wait_for_workers=False)
            address = [host, server.port]
        broadcast_object_list(address, src=0)
        self.store = server if server is not None else dist.TCPStore(address[0], address[1], world, False, timeout)

    def __call__(self, step: int) -> Callable[[], int]:
        key = f"meta_step/{step}"
        return lambda: int(self.store.add(key, 1)) - 1


def chunk_claims() -> Optional[ChunkClaims]:
    """Shared chunk claims for the process group; None in a single process (nothing to share)."""
    return ChunkClaims() if world_size() > 1 else None

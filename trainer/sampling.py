"""Which tasks each meta-step uses, and which worker runs which: a pure function of the seed."""
from __future__ import annotations

import numpy as np


def sample_task_batch(num_tasks: int, meta_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Task ids of meta-step `step`: `meta_batch_size` distinct ids drawn from `num_tasks`.

    Drawn from (seed, step) alone, so every worker, a resumed run and a single process all agree
    without sharing RNG state."""
    if num_tasks < 1:
        raise ValueError("there are no tasks to sample from")
    size = min(meta_batch_size, num_tasks)
    return np.random.default_rng([seed, step]).choice(num_tasks, size=size, replace=False)


def shard_tasks(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The part of a task batch that worker `rank` of `world_size` runs: disjoint, none lost."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return batch[rank::world_size]


def epoch_of(step: int, meta_batch_size: int, num_tasks: int) -> int:
    """The pass over the task set that meta-step `step` belongs to (masks are redrawn per epoch)."""
    return (step * meta_batch_size) // max(num_tasks, 1)

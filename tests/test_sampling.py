import numpy as np
import pytest

from trainer.data.sampling import epoch_of, sample_task_batch, shard_tasks


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_partition_the_batch(world):
    batch = sample_task_batch(1000, 32, seed=95, step=7)
    parts = [shard_tasks(batch, r, world) for r in range(world)]
    merged = np.concatenate(parts)
    assert sorted(merged.tolist()) == sorted(batch.tolist()) and len(set(merged.tolist())) == 32
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batches_depend_on_seed_and_step_only():
    a = sample_task_batch(500, 32, seed=1, step=3)
    assert (a == sample_task_batch(500, 32, seed=1, step=3)).all()
    assert not (a == sample_task_batch(500, 32, seed=1, step=4)).all()
    assert not (a == sample_task_batch(500, 32, seed=2, step=3)).all()
    assert len(sample_task_batch(5, 32, seed=0, step=0)) == 5


def test_epoch_counts_passes_over_tasks():
    assert [epoch_of(s, 32, 100) for s in (0, 3, 4, 7)] == [0, 0, 1, 2]


def test_bad_rank():
    with pytest.raises(ValueError):
        shard_tasks(np.arange(4), 2, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_by_cost_partition_the_batch_and_even_the_load(world):
    batch = sample_task_batch(1000, 32, seed=95, step=7)
    cost = [float(1 + (q * 7919) % 97) for q in batch]  # mixed task sizes
    parts = [shard_tasks(batch, r, world, cost) for r in range(world)]
    merged = np.concatenate(parts)
    assert sorted(merged.tolist()) == sorted(batch.tolist()) and len(merged) == 32
    at = {q: c for q, c in zip(batch.tolist(), cost)}
    balanced = [sum(at[q] for q in part.tolist()) for part in parts]
    dealt = [sum(at[q] for q in batch[r::world].tolist()) for r in range(world)]
    assert max(balanced) - min(balanced) <= max(cost) and max(balanced) <= max(dealt)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # a task costs something whatever its length
    with pytest.raises(ValueError, match="costs"):
        shard_tasks(batch, 0, world, cost[:-1])


def test_shards_by_cost_keep_the_counts_even():
    """One long task and many short ones: by cost alone one worker would take the long one and the
    other all the rest; every task also has a fixed cost, so each takes half the tasks."""
    batch = np.arange(9)
    cost = [100.0] + [1.0] * 8
    parts = [shard_tasks(batch, r, 2, cost) for r in range(2)]
    assert sorted(map(len, parts)) == [4, 5] and 0 in parts[0].tolist()
    assert sorted(np.concatenate(parts).tolist()) == list(range(9))

"""What a job checks about the Ray cluster before it starts any work."""
from __future__ import annotations

import pytest


def test_actors_that_cannot_all_be_placed_are_refused_before_any_work(ray_local):
    from cluster.runtime import check_resources
    from trainer.config import load_config

    # Two embedding actors and an index shard of one CPU each cannot run together on 2 CPUs:
    # Ray would queue the shard and wait for ever.
    cfg = load_config(None, ["cluster.num_embed_actors=2", "cluster.num_index_shards=1", "cluster.cpus_per_actor=1",
                             "cluster.num_workers=1", "cluster.cpus_per_worker=1"])
    with pytest.raises(ValueError, match=r"cluster.num_embed_actors \+ cluster.num_index_shards.*3 CPUs.*has 2"):
        check_resources(cfg)
    check_resources(cfg, ("adapt", "train"))  # the other phases fit
    # The session's cluster has no GPU whatever the machine has (tests/conftest.py: num_gpus=0).
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    gpu = load_config(None, ["cluster.use_gpu=true", "cluster.cpus_per_actor=0.5"])
    with pytest.raises(ValueError, match="cluster.use_gpu asks for 2 GPUs"):
        check_resources(gpu, ("train",))
    check_resources(load_config(None, ["cluster.cpus_per_actor=0.5", "cluster.cpus_per_worker=1"]))


def test_base_fine_tuning_takes_the_training_phase_cpus_on_one_node():
    from cluster.finetune import finetune_cpus
    from trainer.config import load_config

    cpu = load_config(None, ["cluster.num_workers=2", "cluster.cpus_per_worker=1"]).cluster
    assert finetune_cpus(cpu, [2.0]) == 2  # both workers' CPUs, not one worker's
    assert finetune_cpus(cpu, [1.0, 1.0]) == 1  # one process cannot span two 1-CPU nodes
    assert finetune_cpus(cpu, [0.5]) == 1  # never below one worker's share
    gpu = load_config(None, ["cluster.num_workers=4", "cluster.cpus_per_worker=2", "cluster.use_gpu=true"]).cluster
    assert finetune_cpus(gpu, [32.0]) == 2

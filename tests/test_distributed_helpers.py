"""Collective helpers are no-ops in a single process (no process group)."""
import torch

from trainer.distributed import all_reduce_sum, rank, world_size


def test_single_process_helpers_do_nothing():
    import torch.distributed as dist

    assert not dist.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert world_size() == 1 and rank() == 0


def test_local_ray_binds_loopback(ray_local):
    from cluster.runtime import init_ray

    address = init_ray()  # joins the session's cluster
    assert address.startswith("127.0.0.1:")
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray_local.nodes())


"""Collective helpers are no-ops in a single process (no process group)."""
import torch

from trainer.utils.distributed import all_reduce_sum, chunk_claims, rank, world_size


def test_single_process_helpers_do_nothing():
    import torch.distributed as dist

    assert not dist.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert world_size() == 1 and rank() == 0
    assert chunk_claims() is None  # nothing to share chunks with


def _claim_all(r: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=r, world_size=world)
    claims = chunk_claims()
    got = {}
    for step in (0, 1):
        claim, mine = claims(step), []
        while (i := claim()) < 20:
            mine.append(i)
        got[step] = mine
    dist.barrier()
    with open(f"{out}.{r}", "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()


def test_chunk_claims_give_every_chunk_to_exactly_one_rank(tmp_path):
    """Two gloo processes claim the chunks of two steps from one counter per step."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_claim_all, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path / "got")), nprocs=2)
    got = [json.loads((tmp_path / f"got.{r}").read_text()) for r in range(2)]
    for step in ("0", "1"):
        assert sorted(got[0][step] + got[1][step]) == list(range(20))


def test_local_ray_binds_loopback(ray_local):
    from cluster.runtime import init_ray

    address = init_ray()  # joins the session's cluster
    assert address.startswith("127.0.0.1:")
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray_local.nodes())


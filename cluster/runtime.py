"""Connect to a Ray cluster, or start a local one bound to 127.0.0.1."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> str:
    """Join the cluster named by `address` or RAY_ADDRESS (as `ray job submit` sets it); otherwise
    start a local one on loopback only. Returns the address of the cluster joined."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # Ray otherwise advertises the machine's external interface for the node and MASTER_ADDR.
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=log_to_driver)
        joined = ray.get_runtime_context().gcs_address
        if not joined.startswith("127.0.0.1:"):
            ray.shutdown()
            raise RuntimeError(f"the local Ray node bound {joined}, not 127.0.0.1: Ray was imported before "
                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; import cluster first or export it")
    joined = ray.get_runtime_context().gcs_address
    logger.info("Ray cluster at %s with %s", joined, ray.cluster_resources())
    return joined


PHASES = ("retrieval", "adapt", "train")


def _phase_needs(c) -> dict:
    """Per phase: {settings: (resource, amount needed at once)} of the actors alive together."""
    retrieval = c.num_embed_actors + c.num_index_shards
    actors = retrieval + c.num_adapter_actors
    return {
        "retrieval": {"cluster.num_embed_actors + cluster.num_index_shards, times cluster.cpus_per_actor":
                      ("CPU", retrieval * c.cpus_per_actor),
                      "cluster.num_embed_actors + cluster.num_index_shards, times cluster.gpus_per_actor":
                      ("GPU", retrieval * c.gpus_per_actor)},
        "adapt": {"cluster.num_adapter_actors times cluster.cpus_per_actor":
                  ("CPU", c.num_adapter_actors * c.cpus_per_actor),
                  "cluster.num_adapter_actors times cluster.gpus_per_actor":
                  ("GPU", c.num_adapter_actors * c.gpus_per_actor)},
        "train": {"cluster.num_workers times cluster.cpus_per_worker": ("CPU", c.num_workers * c.cpus_per_worker),
                  "cluster.num_workers with cluster.use_gpu": ("GPU", c.num_workers if c.use_gpu else 0)},
        # Tagging streams: embedding, index and adapter actors all run at once.
        "tag": {"cluster.num_embed_actors + cluster.num_index_shards + cluster.num_adapter_actors, times "
                "cluster.cpus_per_actor": ("CPU", actors * c.cpus_per_actor),
                "cluster.num_embed_actors + cluster.num_index_shards + cluster.num_adapter_actors, times "
                "cluster.gpus_per_actor": ("GPU", actors * c.gpus_per_actor)},
    }


def check_resources(cfg, phases: tuple[str, ...] = PHASES) -> None:
    """Refuse, before any work, actors that run together but cannot all be placed at once.

    `phases` are what the job runs: "retrieval" (embedding and index actors, alive together),
    "adapt" (the adapter pool), "train" (the training workers), "tag" (all actors of a tagging
    stream). Ray queues an actor it cannot place and waits, silently, for resources that a local
    cluster will never get: GPUs on a CPU machine, or an actor larger than any node. On a cluster
    joined by address an autoscaler may still add nodes: a warning.
    """
    import ray

    c = cfg.cluster
    total = ray.cluster_resources()
    problems = []
    for phase in phases:
        for keys, (kind, need) in _phase_needs(c)[phase].items():
            have = total.get(kind, 0.0)
            if need > have + 1e-9:
                problems.append(f"{keys} asks for {need:g} {kind}s at once but the Ray cluster has {have:g}; "
                                "lower these settings")
    if any(p in phases for p in ("retrieval", "adapt", "tag")):
        problems += _per_node(ray.nodes(), {"CPU": c.cpus_per_actor, "GPU": c.gpus_per_actor},
                              "cluster.cpus_per_actor / cluster.gpus_per_actor")
    if "train" in phases:
        problems += _per_node(ray.nodes(), {"CPU": c.cpus_per_worker, "GPU": 1.0 if c.use_gpu else 0.0},
                              "cluster.cpus_per_worker / cluster.use_gpu")
    for problem in dict.fromkeys(problems):
        if c.address is None and not os.environ.get("RAY_ADDRESS"):
            raise ValueError(problem)
        logger.warning("%s (or wait for the autoscaler to add nodes)", problem)


def _per_node(nodes: list, need: dict, keys: str) -> list[str]:
    """One actor's (or worker's) resources must fit on a single node, whatever the cluster's total."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if not alive or any(all(r.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0) for r in alive):
        return []
    largest = {k: max(r.get(k, 0.0) for r in alive) for k in need}
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
    has = ", ".join(f"{largest[k]:g} {k}" for k in need)
    return [f"{keys}: each asks for {asked} but no node of the Ray cluster has that much (the largest has {has}); "
            "lower these settings"]


def wait_placed(actors: list, timeout_s: float, what: str) -> None:
    """Wait until every actor is placed and constructed; after `timeout_s`, kill them and raise,
    naming what the cluster has free, instead of waiting for ever for resources held elsewhere.
    A constructor's own error is raised as it is."""
    import ray

    ready = [actor.__ray_ready__.remote() for actor in actors]
    done, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
    try:
        ray.get(done)
    except Exception:
        for actor in actors:
            ray.kill(actor)
        raise
    if pending:
        for actor in actors:
            ray.kill(actor)
        raise RuntimeError(f"{len(pending)} of {len(actors)} {what} were not placed within {timeout_s:g} s "
                           f"(tag.start_timeout_s); the Ray cluster has free {ray.available_resources()}: other "
                           "jobs hold the rest, or lower the cluster.* settings")

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


def check_resources(cfg, phases: tuple[str, ...] = PHASES) -> None:
    """Refuse, before any work, actors that run together but cannot all be placed at once.

    `phases` are what the job runs: "retrieval" (embedding and index actors, alive together),
    "adapt" (the adapter pool), "train" (the training workers). Ray queues an actor it cannot
    place and waits, silently, for resources that a local cluster will never get. On a cluster
    joined by address an autoscaler may still add nodes: a warning.
    """
    import ray

    c = cfg.cluster
    total = ray.cluster_resources()
    together = {
        "retrieval": {"cluster.num_embed_actors + cluster.num_index_shards, times cluster.cpus_per_actor":
                      ("CPU", (c.num_embed_actors + c.num_index_shards) * c.cpus_per_actor)},
        "adapt": {"cluster.num_adapter_actors times cluster.cpus_per_actor":
                  ("CPU", c.num_adapter_actors * c.cpus_per_actor),
                  "cluster.num_adapter_actors times cluster.gpus_per_actor":
                  ("GPU", c.num_adapter_actors * c.gpus_per_actor)},
        "train": {"cluster.num_workers times cluster.cpus_per_worker": ("CPU", c.num_workers * c.cpus_per_worker),
                  "cluster.num_workers with cluster.use_gpu": ("GPU", c.num_workers if c.use_gpu else 0)},
    }
    for phase in phases:
        for keys, (kind, need) in together[phase].items():
            have = total.get(kind, 0.0)
            if need <= have + 1e-9:
                continue
            problem = (f"{keys} asks for {need:g} {kind}s at once but the Ray cluster has {have:g}; "
                       "lower these settings")
            if c.address is None and not os.environ.get("RAY_ADDRESS"):
                raise ValueError(problem)
            logger.warning("%s (or wait for the autoscaler to add nodes)", problem)

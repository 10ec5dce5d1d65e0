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

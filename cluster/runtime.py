"""Connect to a Ray cluster, or start a local one bound to 127.0.0.1."""
from __future__ import annotations

import logging
import os
import re
import socket

from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True,
             num_gpus: int | None = None) -> str:
    """Join the cluster named by `address` or RAY_ADDRESS (as `ray job submit` sets it); otherwise
    start a local one on loopback only, with `num_cpus`/`num_gpus` (None: what Ray detects).
    Returns the address of the cluster joined.

    Ray's own records and, with `log_to_driver`, every line the workers print reach this
    process's logging (workers' lines on the logger `cluster.workers`) instead of its stderr: the
    job's handlers decide where they go (jobs.console: the job's log file, the console for errors)."""
    # Ray takes seconds to import and jobs.common imports this module for every command: only
    # where Ray is used.
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's "ray" logger prints through a handler of its own and does not propagate.
    logging.getLogger("ray").propagate = True
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
    else:
        _init_local(num_cpus, num_gpus, log_to_driver)
    if log_to_driver:
        forward_worker_output()
    joined = ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive", True))
    logger.info("Ray cluster: %s at %s, %d node%s, %g CPUs, %g GPUs, %.1f GiB memory",
                "joined" if address else "local", joined, nodes, "" if nodes == 1 else "s", resources.get("CPU", 0),
                resources.get("GPU", 0), resources.get("memory", 0) / (1 << 30), extra={"stage": True})
    logger.info("Ray cluster resources: %s", resources)
    return joined


def _init_local(num_cpus: int | None, num_gpus: int | None, log_to_driver: bool) -> None:
    """A local node on loopback, with its dashboard on a free loopback port. The dashboard is
    what Ray's state API asks: Ray Train's placement-group cleaner polls it every second to learn
    whether the training controller still lives. Without one it logs a warning each time; with
    none of its own cluster named, it asks whichever cluster answers on 127.0.0.1:8265, may find
    no such controller there and remove the placement group of a training that is running. The
    node's processes (started from this one) inherit RAY_API_SERVER_ADDRESS, naming this
    cluster's dashboard."""
    # Ray deferred: see init_ray.
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        # Ray otherwise advertises the machine's external interface for the node and MASTER_ADDR.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver,
                 configure_logging=False)
    finally:
        # This process may join another cluster later: only the node's processes keep it.
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before
    joined = ray.get_runtime_context().gcs_address
    if not joined.startswith("127.0.0.1:"):
        ray.shutdown()
        raise RuntimeError(f"the local Ray node bound {joined}, not 127.0.0.1: Ray was imported before "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set; import cluster first or export it")


WORKERS = logging.getLogger("cluster.workers")
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")


def forward_worker_output() -> bool:
    """Send the lines Ray forwards from its workers (log_to_driver) to the logger
    `cluster.workers` instead of printing them: INFO each, except a traceback, which is one ERROR
    record from its first line to the end of the batch, and the autoscaler's events, WARNINGs.
    Ray 2.60 offers no public hook for this (RAY_DEDUP_LOGS_SKIP_REGEX drops lines, it does not
    move them): its dispatcher's printing handler is replaced under the name that ray.shutdown()
    removes. False, and Ray prints the lines as before, where that dispatcher is missing."""
    try:
        # Inside the try: a private module that another Ray version may lack.
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        logger.warning("this Ray has no dispatcher of worker output: workers' lines are printed, not logged")
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _log_worker_lines)
    return True


def _worker_prefix(data: dict) -> str:
    """Ray's own prefix of a worker's line: (ActorName pid=N) or (task pid=N, ip=A)."""
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={data.get('pid')}{where}) "


def _log_worker_lines(data: dict) -> None:
    pid = data.get("pid")
    lines = [line for line in data.get("lines", ()) if line.strip()]
    if pid == "autoscaler":
        # Events such as a resource request no node can satisfy: the reason a job waits.
        try:
            # Inside the try: a private module that another Ray version may lack.
            from ray._private.worker import filter_autoscaler_events

            lines = [line for line in filter_autoscaler_events(lines) if not line.startswith("Tip:")]
        except ImportError:
            pass
        for line in lines:
            WORKERS.warning("(autoscaler) %s", line, extra={"worker": True})
        return
    prefix = "" if pid == "raylet" else _worker_prefix(data)
    start = next((i for i, line in enumerate(lines) if _TRACEBACK.match(line)), len(lines))
    for line in lines[:start]:
        WORKERS.info("%s%s", prefix, line, extra={"worker": True})
    if start < len(lines):
        # Shown once however often it is printed: by each rank that fails alike, by Ray Train's
        # controller (a shortened copy), at each retry. The key is its last line, the exception.
        trace = lines[start:]
        WORKERS.error("%s%s", prefix, "\n".join(trace), extra={"worker": True, "dedup_key": trace[-1].strip()})


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
    """Refuse, before any work, actors that run together but cannot all be placed at once, GPUs
    asked for with a torch that cannot use them, and fractional-GPU actors that cannot fit in a
    GPU's memory together.

    `phases` are what the job runs: "retrieval" (embedding and index actors, alive together),
    "adapt" (the adapter pool), "train" (the training workers), "tag" (all actors of a tagging
    stream). Ray queues an actor it cannot place and waits, silently, for resources that a local
    cluster will never get: GPUs on a CPU machine, or an actor larger than any node. On a cluster
    joined by address an autoscaler may still add nodes: a warning. Every problem found is named,
    one line each.
    """
    # Ray deferred: see init_ray.
    import ray

    c = cfg.cluster
    local = c.address is None and not os.environ.get("RAY_ADDRESS")
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
    if not local:
        for problem in dict.fromkeys(problems):
            logger.warning("%s (or wait for the autoscaler to add nodes)", problem)
        problems = []
    # Refused on a joined cluster too: no node an autoscaler adds brings another torch or a larger GPU.
    problems += cuda_problems(cfg, phases, local)
    problems += gpu_memory_problems(cfg, phases, ray.nodes(), local)
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


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
    # Ray deferred: see init_ray.
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
        raise ConfigError(f"{len(pending)} of {len(actors)} {what} were not placed within {timeout_s:g} s "
                          f"(tag.start_timeout_s); the Ray cluster has free {ray.available_resources()}: other "
                          "jobs hold the rest, or lower the cluster.* settings")


# ------------------------------------------------------------------------------------- GPUs

# The CUDA wheels of the torch release this project pins (CUDA 12.8).
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
_ACTOR_PHASES = ("retrieval", "adapt", "tag")


def cuda_torch_install() -> str:
    """The pip line that installs a CUDA build of the torch version installed here."""
    # torch only where GPUs are asked about: a CPU job's checks never import it (seconds).
    import torch

    return f"pip install torch=={torch.__version__.split('+')[0]} --index-url {CUDA_TORCH_INDEX}"


def cuda_problems(cfg, phases: tuple[str, ...] = PHASES, local: bool = True) -> list[str]:
    """GPUs asked for (cluster.use_gpu for "train", cluster.gpus_per_actor for the actors' phases)
    with a torch that cannot use them: Ray would hand the GPUs over and the work would run on the
    CPU while holding them. A torch built without CUDA is refused on any cluster (its nodes run
    the driver's image); a CUDA build that sees no GPU only on a local cluster (a joined
    cluster's head may well have none)."""
    c = cfg.cluster
    asked = []
    if c.use_gpu and "train" in phases:
        asked.append(("cluster.use_gpu=true", "cluster.use_gpu=false"))
    if c.gpus_per_actor > 0 and any(p in phases for p in _ACTOR_PHASES):
        asked.append((f"cluster.gpus_per_actor={c.gpus_per_actor:g}", "cluster.gpus_per_actor=0"))
    if not asked:
        return []
    # torch only where GPUs are asked about: a CPU job's checks never import it (seconds).
    import torch

    if torch.cuda.is_available():
        return []
    what = " and ".join(a for a, _ in asked)
    cpu = f"or set {' and '.join(off for _, off in asked)} to run on the CPU"
    if torch.version.cuda is None:
        return [f"{what}, but this torch ({torch.__version__}) is built without CUDA: the work would run on the CPU "
                f"while holding the GPUs; install a CUDA build of torch, e.g. `{cuda_torch_install()}`, {cpu}"]
    if local:
        return [f"{what}, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU on this machine; "
                f"check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, {cpu}"]
    return []


# Estimates of what one fractional-GPU actor holds on its GPU, stated rather than measured: a
# process's CUDA context and kernels before any tensor; activations and the caching allocator's
# slack; FAISS's scratch memory (StandardGpuResources takes 1.5 GiB on GPUs over 8 GiB).
MIB = 1 << 20
CUDA_CONTEXT_BYTES = 512 * MIB
ACTIVATION_MARGIN_BYTES = 512 * MIB
FAISS_SCRATCH_BYTES = 1536 * MIB
# The largest memory sold under each name Ray gives as 'accelerator_type' (an upper bound: a plan
# is refused only where it cannot fit whichever variant the node has).
_GPU_GIB = {"T4": 16, "P4": 8, "P100": 16, "V100": 32, "A10G": 24, "L4": 24, "L40S": 48, "A100": 80,
            "A100-40G": 40, "A100-80G": 80, "H100": 96, "H20": 96, "H200": 144, "B200": 192}


def gpu_plan_problem(per_actor_bytes: int, actors_per_gpu: int, gpu_bytes: int | None) -> str | None:
    """Why `actors_per_gpu` actors of `per_actor_bytes` each cannot share a GPU of `gpu_bytes`;
    None where they fit, or where the GPU's memory is unknown (None)."""
    if gpu_bytes is None or per_actor_bytes * actors_per_gpu <= gpu_bytes:
        return None
    gib = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
    fit = gpu_bytes // max(per_actor_bytes, 1)
    if fit < 1:
        return (f"cluster.gpus_per_actor: an actor of about {gib(per_actor_bytes)} needs more than a GPU of "
                f"{gib(gpu_bytes)}; use a smaller model, or cluster.gpus_per_actor=0 to run on the CPU")
    advice = f"let at most {fit} share a GPU: raise cluster.gpus_per_actor to {1 / fit:.4g}"
    return (f"cluster.gpus_per_actor: {actors_per_gpu} actors of about {gib(per_actor_bytes)} each would share a GPU "
            f"of {gib(gpu_bytes)} ({gib(per_actor_bytes * actors_per_gpu)} needed); {advice}")


def model_weight_bytes(name_or_path: str) -> int | None:
    """Bytes of a model's weight files: a local folder's, or a hub id's in the local Hugging Face
    cache; None where they cannot be found without a download."""
    names = ("model.safetensors", "pytorch_model.bin")
    if os.path.isdir(name_or_path):
        sizes = [os.path.getsize(os.path.join(name_or_path, n)) for n in os.listdir(name_or_path)
                 if n.endswith((".safetensors", ".bin")) and os.path.isfile(os.path.join(name_or_path, n))]
        return sum(sizes) if sizes else None
    try:
        # Imported when asked, as in trainer.config.hub_problems: huggingface_hub reads its settings
        # from the environment when first imported.
        import huggingface_hub

        for name in names:
            cached = huggingface_hub.try_to_load_from_cache(name_or_path, name)
            if isinstance(cached, str):
                return os.path.getsize(cached)
    except Exception:  # a malformed id: the job's own checks name it
        return None
    return None


def gpu_total_bytes(nodes: list, local: bool) -> tuple[int | None, str]:
    """(bytes of the smallest GPU, where that was read), or (None, why it is unknown)."""
    if local:
        # torch only where GPUs are asked about: a CPU job's checks never import it (seconds).
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count():
            sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
            return min(sizes), "torch.cuda.get_device_properties"
    types = []
    for node in nodes:
        resources = node.get("Resources", {})
        if node.get("Alive", True) and resources.get("GPU", 0) > 0:
            found = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
            types.append(found[0] if found else None)
    if not types:
        return None, "no GPU node in the Ray cluster, and torch sees none here"
    if any(t not in _GPU_GIB for t in types):
        return None, f"Ray's accelerator types {sorted(map(str, set(types)))} are not all known here"
    return min(_GPU_GIB[t] for t in types) << 30, f"Ray's accelerator types {sorted(set(types))}"


def gpu_memory_problems(cfg, phases: tuple[str, ...], nodes: list, local: bool) -> list[str]:
    """Fractional-GPU actors (0 < cluster.gpus_per_actor < 1): the memory each needs on its GPU
    is logged per phase, and a plan whose actors sharing one GPU cannot fit in its memory is
    refused where that memory is known. Ray packs up to 1/gpus_per_actor actors on a GPU, of any
    kind: counted as that many of the phase's largest kind. Index shards are counted here without
    their vectors, which cluster.retrieval.ShardedIndex adds when it has them."""
    c = cfg.cluster
    if not 0 < c.gpus_per_actor < 1 or not any(p in phases for p in _ACTOR_PHASES):
        return []
    weights = model_weight_bytes(cfg.model.name_or_path)
    if weights is None:
        logger.info("the size of %s's weights is unknown here: the GPU estimates below leave them out",
                    cfg.model.name_or_path)
    w = weights or 0
    each = {"embedding actor": CUDA_CONTEXT_BYTES + w + ACTIVATION_MARGIN_BYTES,
            # its weights, and at least as much again in the adapted copies, gradients and moments
            "adapter actor": CUDA_CONTEXT_BYTES + 2 * w + ACTIVATION_MARGIN_BYTES,
            "index shard": CUDA_CONTEXT_BYTES + FAISS_SCRATCH_BYTES}
    counts = {"embedding actor": c.num_embed_actors, "index shard": c.num_index_shards,
              "adapter actor": c.num_adapter_actors}
    kinds = {"retrieval": ("embedding actor", "index shard"), "adapt": ("adapter actor",),
             "tag": ("embedding actor", "index shard", "adapter actor")}
    gpu, source = gpu_total_bytes(nodes, local)
    per_gpu = int(1 / c.gpus_per_actor + 1e-9)
    problems = []
    for phase in (p for p in phases if p in kinds):
        heaviest = max(kinds[phase], key=each.get)
        together = min(per_gpu, sum(counts[k] for k in kinds[phase]))
        logger.info("GPU plan, %s phase: up to %d actors share a GPU (cluster.gpus_per_actor=%g), each about %s "
                    "(CUDA context %d MiB, weights %d MiB, twice for an adapter, margin %d MiB; an index shard "
                    "FAISS's %d MiB of scratch and its vectors instead of weights)", phase, together,
                    c.gpus_per_actor, ", ".join(f"{k} {each[k] / MIB:.0f} MiB" for k in kinds[phase]),
                    CUDA_CONTEXT_BYTES // MIB, w // MIB, ACTIVATION_MARGIN_BYTES // MIB, FAISS_SCRATCH_BYTES // MIB)
        problem = gpu_plan_problem(each[heaviest], together, gpu)
        if problem:
            problems.append(f"{problem} ({phase} phase, GPU memory from {source})")
    if gpu is None:
        logger.info("GPU memory unknown (%s): the plan of fractional-GPU actors is not checked against it", source)
    return problems

"""Benchmark: meta-training throughput (tasks/s) and memory, engine against the per-task and official loops.

    python benchmarks/meta_train.py [--quick] [--limit N] [--steps N] [--device cpu|cuda] [--data ROOT]
                                    [--model PATH] [--e5 PATH] [--no-e5] [--no-distributed] [--workers 1 2]
                                    [--repeats N] [--ds-steps N] [--without-ray]

Pseudo tasks come from English train sentences (meta-cross/en/train.txt): each sentence is a
query, its support the K=2 other sentences nearest by [CLS] cosine under the model's own encoder
(flat numpy search). The same meta-batches of 32 tasks, drawn from (seed, step) by
trainer.data.sampling, are run by
- `official`: the official loop (benchmarks/_official.py: windows padded to 128, 32 per-task
  gradient copies kept, then summed into .grad for the meta-update);
- `sequential`: the per-task reference, trainer.training.reference.MetaLearner.meta_step (dynamic padding, one
  accumulated buffer, the whole model run at every inner step);
- `engine`: trainer.training.meta_trainer.MetaTrainer.train_step (frozen bottom kept once per window, the
  inner loops of chunks of tasks vectorised with torch.func, BertAdam in closed form);
- `ds1`/`ds2`: the engine on 1 and 2 Ray Train workers with DeepSpeed engines (cluster.meta_train,
  Ray local on 127.0.0.1, gloo; with --device cuda NCCL, a whole GPU per worker, counts above the
  GPUs present skipped), unless --no-distributed (none under --quick unless --workers);
  the worker counts take turns, --repeats (3) runs each, each timing --ds-steps (10)
  meta-steps after its first; ds2/ds1 is the median of the repeats' ratios (runs side by side),
  ds*/engine the best run of each count. With --without-ray, the same workers (the same trainer and
  DeepSpeed engine, cluster.meta_train.deepspeed_trainer) also run as plain processes on a gloo
  group (NCCL on GPUs where each rank has a GPU of its own), before Ray starts: the cost of Ray's
  own processes beside them, apart from the workers'.
Two settings: the model of record (bert-tiny-6l, layers 4-5 and the classifier train) and the
replication setting (multilingual-e5-small with 10 of 12 layers frozen, jobs/configs/replicate_cpu.yaml),
unless --no-e5. Every variant takes one warm-up step first (which fills the kept bottom of the
batch's windows and compiles what is compiled); the bottom of the timed source set is filled up
front and its time and size printed, with the size it has for the whole English train set
(computed from the windows' lengths). Then the in-process variants take turns, meta-step by
meta-step, so that a drift in the machine's speed falls on all of them alike. Memory, over one
more step of each variant alone: peak RSS (VmHWM, reset before it; every variant's model is
resident) and its growth, torch.cuda.max_memory_allocated on a GPU, and the bytes of gradient
buffers held at the meta-update. Ends with one `ratio <name> <value>` line per ratio. One torch thread per process.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._setup import prepare  # noqa: E402

prepare()  # threads, offline hub and sys.path, before torch is imported

import copy  # noqa: E402
import glob  # noqa: E402
import threading  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from benchmarks import common  # noqa: E402
from trainer.config import with_overrides  # noqa: E402

DEFAULT_SOURCE, QUICK_SOURCE = 4000, 1000
DEFAULT_STEPS, QUICK_STEPS = 4, 1
DS_STEPS = 10
SEED = 95
# mBERT-base as the paper trains it (layers 4..11 of 12, hidden 768, intermediate 3072, 9 labels):
# the size one gradient copy would have there, computed, not measured.
MBERT_LAYER = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768
MBERT_TRAINABLE = 8 * MBERT_LAYER + 768 * 9 + 9


def parse_args(argv):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=0,
                        help=f"meta-steps timed per variant (default {DEFAULT_STEPS}, --quick {QUICK_STEPS})")
    parser.add_argument("--sources", type=int, default=DEFAULT_SOURCE,
                        help=f"English train sentences that make the task pool without --quick "
                             f"(0: all; default {DEFAULT_SOURCE})")
    parser.add_argument("--no-distributed", action="store_true", help="skip the Ray Train + DeepSpeed runs")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DeepSpeed worker counts to time (default: 1 2, none with --quick)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per DeepSpeed worker count, the counts taking turns (default 3): two counts' "
                             "ratio is the median of the repeats' ratios, each count's rate its best run")
    parser.add_argument("--without-ray", action="store_true",
                        help="also time the same DeepSpeed workers as plain processes (no Ray beside them)")
    parser.add_argument("--ds-steps", type=int, default=DS_STEPS,
                        help=f"meta-steps timed per DeepSpeed run (default {DS_STEPS}): its start-up takes most of "
                             "a run's time, and a longer window evens out the machine's drift")
    return parser.parse_args(argv)


def load(args, b: common.Bundle):
    """Source sentences and the [num_source, K] support ids of each one's task, under b's encoder."""
    n = args.limit or (QUICK_SOURCE if args.quick else args.sources)
    source = common.read(args, "meta-cross/en/train.txt", n)
    vectors = common.cls_embeddings(b.fresh_model(args.device), b.featurizer, source)
    return source, common.top_k(vectors, vectors, b.cfg.retrieval.k, exclude_self=True)


def task_batches(support, steps: int, meta_batch_size: int):
    from trainer.data.sampling import Task, sample_task_batch

    return [[Task(tuple(int(i) for i in support[q]), int(q))
             for q in sample_task_batch(len(support), meta_batch_size, SEED, step)] for step in range(steps)]


class Variant:
    """One in-process loop, warmed up: `step(i)` runs meta-step i; `extra()` its other figures."""

    def __init__(self, step, extra):
        self.step, self.extra = step, extra


def official_variant(b, cfg, windows, batches, device: str) -> Variant:
    from benchmarks._official import OfficialLearner

    official = OfficialLearner(b.fresh_model(device, SEED), b.featurizer, cfg, seed=SEED)
    official.meta_gradients(batches[0][:1], windows)  # warm-up, no update
    return Variant(lambda i: official.meta_step(batches[i % len(batches)], windows),
                   lambda: {"grad_bytes": official.last_grad_bytes, "grad_copies": official.last_grad_copies})


def sequential_variant(b, cfg, windows, batches, device: str) -> Variant:
    from benchmarks._official import grad_bytes, trainable_bytes
    from trainer.training.reference import MetaLearner

    learner = MetaLearner(b.fresh_model(device, SEED), b.featurizer, cfg, seed=SEED)
    learner.task_gradients(batches[0][0], windows)  # warm-up, no update

    def extra() -> dict:
        # What it holds at the meta-update: the accumulated `.grad`, measured after two tasks (it
        # holds one copy whatever the count; a whole batch of the per-task loop is the slow part
        # of a quick run).
        learner.meta_optimizer.zero_grad(set_to_none=True)
        learner.meta_gradient(batches[0][:2], windows)
        held = grad_bytes(learner.params)
        return {"grad_bytes": held, "grad_copies": round(held / trainable_bytes(learner.model))}
    return Variant(lambda i: learner.meta_step(batches[i % len(batches)], windows), extra)


def engine_variant(b, cfg, source, support, steps: int, device: str) -> Variant:
    """MetaTrainer.train_step over the same meta-batches (it samples them from (seed, step))."""
    from benchmarks._official import tensor_bytes
    from trainer.training.meta_trainer import MetaTrainer

    trainer = MetaTrainer(b.fresh_model(device, SEED), b.featurizer, cfg, source, support, seed=SEED)
    windows = [w for g in trainer.windows for w in g]
    with common.PeakMemory(device) as fill_memory:
        _, fill_s = common.timed(trainer.bottom.fill, windows)
    kept = trainer.bottom.nbytes()
    # Warm-up on the step after the timed ones (compiles what is compiled), then the timed steps from 0.
    trainer.step = steps
    trainer.meta_gradient(steps)
    trainer.step = 0

    def extra() -> dict:
        buffer, _ = trainer.meta_gradient(0)
        return {"grad_bytes": tensor_bytes(buffer), "grad_copies": 1, "fill_s": fill_s, "kept_bytes": kept,
                "fill_rss_growth": fill_memory.rss_growth, "windows": len(windows),
                "chunk": trainer.engine.chunk_size(cfg.train.meta_batch_size), "compiled": trainer.engine.compiled}
    return Variant(lambda i: trainer.train_step(), extra)


def taking_turns(variants: dict, steps: int, device: str) -> dict[str, dict]:
    """Seconds of each variant's `steps` meta-steps, the variants taking turns step by step (the
    first to go rotates), so that a drift in the machine's speed (a shared VM's host) falls on
    every variant alike; then each variant's memory over one more step of its own."""
    import torch

    seconds = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _, dt = common.timed(variants[name].step, i)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name] += dt
    out = {}
    for name, variant in variants.items():
        with common.PeakMemory(device) as memory:
            variant.step(steps)
        out[name] = {"seconds": seconds[name], "memory": memory, **variant.extra()}
    return out


def whole_source_bytes(b, args) -> tuple[int, int]:
    """(windows, bytes) of the kept bottom for all of English train: float32 states per position."""
    from trainer.modules.model import build_model

    windows = b.featurizer.encode(common.read(args, "meta-cross/en/train.txt"))
    hidden = build_model(b.cfg).encoder.config.hidden_size
    return len(windows), sum(len(w) for w in windows) * hidden * 4

class WorkerPeaks:
    """Polls the VmHWM of the Ray Train workers (found by their pid files) while they run."""

    def __init__(self, folder: str):
        self.folder, self.peaks, self._stop = folder, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for path in glob.glob(os.path.join(self.folder, "workers", "rank*.pid")):
                try:
                    pid = int(open(path).read().strip())
                except (OSError, ValueError):
                    continue
                peak = common.pid_peak_rss(pid)
                if peak:
                    self.peaks[os.path.basename(path)[:-4]] = max(self.peaks.get(os.path.basename(path)[:-4], 0), peak)

    def __enter__(self) -> "WorkerPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _ds_inputs(b: common.Bundle, cfg, source, support, steps: int, workers: int, device: str, workdir: str,
               out_dir: str):
    from cluster.meta_train import MetaTrainInputs

    cfg = with_overrides(cfg, [
        ("cluster.num_workers", workers),
        # Fractional CPUs: Ray Train's own controller must still fit on the 2 CPUs given to Ray.
        ("cluster.cpus_per_worker", 0.5),
        ("cluster.use_gpu", device == "cuda"),
        # One more step than timed: the workers' rate leaves out their first (compiling) step.
        ("train.num_meta_steps", steps + 1), ("train.eval_every", steps + 1), ("train.checkpoint_every", steps + 1),
        # The bottom of the source, kept on disk: computed before the first timed step by the first
        # run, read by the next, so that both rates are of meta-steps.
        ("model.prefix_cache_dir", os.path.join(workdir, "prefix")),
    ])
    inputs = MetaTrainInputs(config=cfg.to_dict(), source=list(source), support=support, dev=[], dev_support=[],
                             seed=SEED, output_dir=out_dir)
    return cfg, inputs


def distributed(b: common.Bundle, cfg, source, support, steps: int, workers: int, device: str, workdir: str,
                run: int = 0) -> dict:
    """tasks/s (inside the workers' loop, start-up excluded), wall time with start-up, worker peaks."""
    from cluster.meta_train import run_meta_training

    out_dir = os.path.join(workdir, f"ds{workers}-{b.name}-r{run}")
    cfg, inputs = _ds_inputs(b, cfg, source, support, steps, workers, device, workdir, out_dir)
    with WorkerPeaks(out_dir) as peaks:
        result, wall = common.timed(run_meta_training, inputs, cfg, os.path.join(workdir, "ray"),
                                    f"bench-{b.name}-w{workers}-r{run}", resume=False, max_failures=0)
    if result.error is not None:
        raise RuntimeError(f"meta-training on {workers} workers failed: {result.error}")
    return {"tasks_per_s": float(result.metrics["tasks_per_s"]), "wall_s": wall,
            "worker_peak_rss": max(peaks.peaks.values(), default=0)}


def plain_group(rank: int, world: int, use_gpu: bool) -> tuple[str, int]:
    """(backend, local GPU index) of a plain rank. Each rank uses the GPU it can see: with fewer
    GPUs than ranks they share them round-robin (one GPU: every rank on cuda:0; LOCAL_RANK=rank
    would ask rank 1 for a second GPU). NCCL refuses two ranks on one GPU, so ranks that share
    meet on gloo, which takes CUDA tensors for the all-reduce of ZeRO 0 (the benchmark's stage)."""
    import torch

    gpus = torch.cuda.device_count() if use_gpu else 0
    return ("nccl" if gpus and world <= gpus else "gloo"), rank % max(1, gpus)


def plain_worker(rank: int, world: int, inputs, port: int) -> None:
    """One rank of `without_ray`: a plain process with the Ray Train worker's trainer and DeepSpeed
    engine (cluster.meta_train.deepspeed_trainer), on a process group of its own (see plain_group);
    rank 0 writes its rate."""
    import json

    import torch
    import torch.distributed as dist

    from cluster.meta_train import deepspeed_trainer

    common.quiet()
    use_gpu = bool(inputs.config["cluster"]["use_gpu"])
    backend, local = plain_group(rank, world, use_gpu)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if use_gpu:
        torch.cuda.set_device(local)  # the trainer's model.cuda() and NCCL use the current device
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        trainer, _ = deepspeed_trainer(inputs, rank, world)
        metrics = trainer.fit()
        if rank == 0:
            with open(os.path.join(inputs.output_dir, "rate.json"), "w") as f:
                json.dump({"tasks_per_s": metrics["tasks_per_s"]}, f)
    finally:
        dist.destroy_process_group()


def without_ray(b: common.Bundle, cfg, source, support, steps: int, workers: int, device: str, workdir: str,
                run: int = 0) -> dict:
    """The DeepSpeed workers of `distributed`, the same code inside, as plain processes: what the
    workers cost without Ray's own processes beside them on the same CPUs."""
    import json
    import socket

    import torch.multiprocessing as mp

    out_dir = os.path.join(workdir, f"plain{workers}-{b.name}-r{run}")
    os.makedirs(out_dir, exist_ok=True)
    _, inputs = _ds_inputs(b, cfg, source, support, steps, workers, device, workdir, out_dir)
    with socket.socket() as sock:  # a free port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, wall = common.timed(mp.start_processes, plain_worker, (workers, inputs, port), nprocs=workers, join=True,
                           start_method="spawn")
    with open(os.path.join(out_dir, "rate.json")) as f:
        return {"tasks_per_s": float(json.load(f)["tasks_per_s"]), "wall_s": wall}


def report(name: str, runs: dict, one_copy: int) -> None:
    for variant, r in runs.items():
        line = f"run {name} {variant} {r['tasks_per_s']:.2f} tasks/s"
        if "memory" in r:
            m = r["memory"]
            line += (f" peak_rss={common.mib(m.peak_rss)} rss_growth={common.mib(m.rss_growth)} "
                     f"grad_buffers={common.mib(r['grad_bytes'])} ({r['grad_copies']} copies of {common.mib(one_copy)})")
            if m.cuda_peak:
                line += f" cuda_peak={common.mib(m.cuda_peak)} cuda_growth={common.mib(m.cuda_growth)}"
        else:
            line += f" wall_with_startup={r['wall_s']:.1f}s worker_peak_rss={common.mib(r['worker_peak_rss'])}"
        if "fill_s" in r:
            line += (f" chunk={r['chunk']} compiled={r['compiled']} | kept bottom of {r['windows']} windows: "
                     f"{common.mib(r['kept_bytes'])} in {r['fill_s']:.1f}s (rss_growth={common.mib(r['fill_rss_growth'])})")
        print(line, flush=True)


def in_process(b: common.Bundle, args, variants: Sequence[str], steps: int) -> dict:
    """Runs of `variants` (official, sequential, engine) on b's model over the same meta-batches."""
    from trainer.data.features import group_windows

    cfg = copy.deepcopy(b.cfg)
    cfg = with_overrides(cfg, [("train.num_meta_steps", steps)])
    source, support = load(args, b)
    batches = task_batches(support, steps, cfg.train.meta_batch_size)
    windows = group_windows(b.featurizer.encode(source))
    print(f"data {b.name}: source=en:{len(source)} sentences; {steps} meta-steps of {len(batches[0])} tasks "
          f"(K={support.shape[1]} support by [CLS] cosine, num_inner_steps={cfg.train.num_inner_steps}, "
          f"{b.cfg.model.num_frozen_layers} frozen layers)", flush=True)
    make = {"official": lambda: official_variant(b, cfg, windows, batches, args.device),
            "sequential": lambda: sequential_variant(b, cfg, windows, batches, args.device),
            "engine": lambda: engine_variant(b, cfg, source, support, steps + 1, args.device)}
    runs = taking_turns({v: make[v]() for v in variants}, steps, args.device)
    for run in runs.values():
        run["tasks_per_s"] = sum(len(t) for t in batches) / run["seconds"]
    return {"runs": runs, "source": source, "support": support, "cfg": cfg}


def run(args) -> dict[str, float]:
    import torch

    from benchmarks._official import trainable_bytes

    torch.set_num_threads(1)
    common.check_args(args)
    if min(args.ds_steps, args.repeats) < 1 or args.steps < 0:
        raise SystemExit("--ds-steps and --repeats must be at least 1, --steps 0 (the default) or more")
    common.quiet()
    print(common.machine(args.device), flush=True)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    ratios: dict[str, float] = {}
    workers = args.workers if args.workers is not None else ([] if args.quick else [1, 2])
    with common.workdir() as workdir:
        record = common.bundle("tiny6l", args.model)
        done = in_process(record, args, ("official", "sequential", "engine"), steps)
        runs = done["runs"]
        report(record.name, runs, trainable_bytes(record.fresh_model("cpu")))
        rate = {k: r["tasks_per_s"] for k, r in runs.items()}
        ratios["meta_train_engine_vs_official"] = rate["engine"] / rate["official"]
        ratios["meta_train_sequential_vs_official"] = rate["sequential"] / rate["official"]
        ratios["meta_train_engine_vs_sequential"] = rate["engine"] / rate["sequential"]
        ratios["meta_grad_bytes_official_over_engine"] = runs["official"]["grad_bytes"] / runs["engine"]["grad_bytes"]
        e5 = None if args.no_e5 else replication_setting(args, steps)
        if e5 is not None:
            ratios.update(e5["ratios"])
        if workers and not args.no_distributed:
            # On the replication setting where there is one: on the record's 0.3 MiB of weights a
            # meta-step is too little work for a second worker to pay for its all-reduce.
            ratios.update(distributed_runs(e5 or done, record if e5 is None else e5["bundle"], args, workers,
                                           workdir))
        elif not workers:
            print("note: distributed runs skipped (--quick without --workers)", flush=True)
    print(f"note: at mBERT-base size (8 trainable layers) one gradient copy is {common.mib(4 * MBERT_TRAINABLE)}; "
          f"the official loop holds 33 of them ({common.mib(33 * 4 * MBERT_TRAINABLE)}) at each meta-update "
          "(computed, not measured)", flush=True)
    return ratios


def replication_setting(args, steps: int) -> Optional[dict]:
    """Engine against the per-task reference on e5-small with 10 frozen layers."""
    from benchmarks._official import trainable_bytes

    if not os.path.isdir(args.e5):
        print(f"note: replication setting skipped: no encoder at {args.e5} (--e5 PATH)", flush=True)
        return None
    e5 = common.bundle("e5small", args.e5, num_frozen_layers=common.E5_FROZEN)
    done = in_process(e5, args, ("sequential", "engine"), steps)
    report(e5.name, done["runs"], trainable_bytes(e5.fresh_model("cpu")))
    count, size = whole_source_bytes(e5, args)
    print(f"memory e5small kept bottom for all of English train: {count} windows, {common.mib(size)} "
          "(float32 states of every position, computed from the windows)", flush=True)
    rate = {k: r["tasks_per_s"] for k, r in done["runs"].items()}
    return {**done, "bundle": e5, "ratios": {"meta_train_engine_vs_sequential_e5": rate["engine"] / rate["sequential"]}}


def distributed_runs(done: dict, b: common.Bundle, args, workers, workdir: str) -> dict[str, float]:
    """The engine on 1, 2, ... DeepSpeed workers, against the in-process engine and each other;
    with --without-ray, the same workers as plain processes first (before Ray starts)."""
    from cluster.runtime import init_ray

    out: dict[str, float] = {}
    suffix = "" if b.name == "tiny6l" else f"_{b.name.replace('small', '')}"
    engine = done["runs"]["engine"]["tasks_per_s"]
    lo, hi = min(workers), max(workers)
    if args.without_ray:
        rates, runs = worker_counts(without_ray, done, b, args, workers, workdir)
        for k, r in runs.items():
            print(f"run {b.name} {k} without Ray {r['tasks_per_s']:.2f} tasks/s wall_with_startup={r['wall_s']:.1f}s",
                  flush=True)
            out[f"meta_train_{k}_without_ray_vs_engine{suffix}"] = r["tasks_per_s"] / engine
        if len(workers) > 1:
            out[f"meta_train_ds{hi}_vs_ds{lo}_without_ray"] = paired(b, f"ds{hi}/ds{lo} without Ray", rates[hi],
                                                                     rates[lo])
    workers = ray_train_counts(workers, args.device)
    if not workers:
        return out
    lo, hi = min(workers), max(workers)
    init_ray(num_cpus=2, log_to_driver=False)
    rates, runs = worker_counts(distributed, done, b, args, workers, workdir)
    report(b.name, runs, 0)
    out.update({f"meta_train_{k}_vs_engine{suffix}": r["tasks_per_s"] / engine for k, r in runs.items()})
    if len(workers) > 1:
        out[f"meta_train_ds{hi}_vs_ds{lo}"] = paired(b, f"ds{hi}/ds{lo}", rates[hi], rates[lo])
    return out


def ray_train_counts(workers, device: str) -> list[int]:
    """The worker counts Ray Train can place: on GPUs each worker takes a whole one
    (cluster.use_gpu), so counts above the GPUs present would wait for ever."""
    if device != "cuda":
        return list(workers)
    import torch

    gpus = torch.cuda.device_count()
    kept = [n for n in workers if n <= gpus]
    if len(kept) < len(workers):
        print(f"note: Ray Train runs of {sorted(set(workers) - set(kept))} workers skipped: each takes a whole GPU "
              f"and this machine has {gpus}", flush=True)
    return kept


def worker_counts(launch, done: dict, b: common.Bundle, args, workers, workdir: str) -> tuple[dict, dict]:
    """({count: the rate of each repeat}, {"ds<count>": its best run}) of `launch` (distributed or
    without_ray). The counts take turns, --repeats times: a run times seconds of meta-steps on a
    machine whose speed drifts by minutes, so that two counts are compared run beside run."""
    runs: dict[str, dict] = {}
    rates: dict[int, list[float]] = {n: [] for n in workers}
    for r in range(args.repeats):
        for n in workers if r % 2 == 0 else list(reversed(workers)):
            run = launch(b, done["cfg"], done["source"], done["support"], args.ds_steps, n, args.device, workdir, r)
            rates[n].append(run["tasks_per_s"])
            if f"ds{n}" not in runs or run["tasks_per_s"] > runs[f"ds{n}"]["tasks_per_s"]:
                runs[f"ds{n}"] = run
    return rates, {f"ds{n}": runs[f"ds{n}"] for n in workers}


def paired(b: common.Bundle, what: str, rates: Sequence[float], baseline: Sequence[float]) -> float:
    ratio, each = paired_ratio(rates, baseline)
    print(f"pairs {b.name} {what}, repeat by repeat: {' '.join(f'{x:.2f}' for x in each)} "
          f"({' '.join(f'{x:.2f}' for x in rates)} against {' '.join(f'{x:.2f}' for x in baseline)} tasks/s; "
          f"median {ratio:.3f})", flush=True)
    return ratio


def paired_ratio(rates: Sequence[float], baseline: Sequence[float]) -> tuple[float, list[float]]:
    """(median, each) of rates[r] / baseline[r]: the runs of one repeat ran one after the other,
    while the best of each count may come from stretches of the machine far apart (on the VM of
    benchmarks/README.md one worker ran 16.0, 11.9 and 15.7 tasks/s within ten minutes)."""
    import statistics

    if len(rates) != len(baseline) or not rates:
        raise ValueError(f"paired runs needed: {len(rates)} against {len(baseline)}")
    each = [a / b for a, b in zip(rates, baseline)]
    return statistics.median(each), each


def main(argv=None) -> int:
    return common.main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

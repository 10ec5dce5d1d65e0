"""Benchmark: meta-training throughput (tasks/s) and memory against the official loop, in one run.

    python benchmarks/meta_train.py [--quick] [--limit N] [--steps N] [--device cpu|cuda] [--data ROOT]
                                    [--model PATH] [--no-mid] [--no-distributed] [--workers 1 2]

Pseudo tasks come from English train sentences (meta-cross/en/train.txt): each sentence is a
query, its support the K=2 other sentences nearest by [CLS] cosine under the model of record's
encoder (flat numpy search). The same meta-batches of 32 tasks, drawn from (seed, step) by
trainer.sampling, are run by
- the official loop (benchmarks/_official.py: windows padded to 128, 32 per-task gradient copies
  kept, then summed into .grad for the meta-update),
- metaner in one process (trainer.maml.MetaLearner.meta_step: dynamic padding, one accumulated
  gradient buffer),
- metaner on 1 and 2 Ray Train workers with DeepSpeed engines (cluster.meta_train, Ray local on
  127.0.0.1, gloo), unless --no-distributed.
For each: tasks/s, peak RSS (VmHWM, reset before each in-process variant; the workers' own VmHWM),
torch.cuda.max_memory_allocated on a GPU, and the bytes of gradient buffers held at the
meta-update (measured on the tensors each keeps). Runs on the model of record and a mid-size
random BERT (4 layers, hidden 256; its top two layers train, as the record model's do).
Ends with one `ratio <name> <value>` line per ratio. One torch thread per process.
"""
from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Run as a file, this folder would come first on sys.path and benchmarks/retrieval.py would hide the
# `retrieval` package; the repository root is what the `benchmarks.*` imports need.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:
    sys.path.pop(0)
if os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

import copy  # noqa: E402
import glob  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402

from benchmarks import common  # noqa: E402

DEFAULT_SOURCE, QUICK_SOURCE = 4000, 1000
DEFAULT_STEPS, QUICK_STEPS = 4, 1
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
    return parser.parse_args(argv)


def load(args, record: common.Bundle):
    """Source sentences and the [num_source, K] support ids of each one's task."""
    n = args.limit or (QUICK_SOURCE if args.quick else args.sources)
    source = common.read(args, "meta-cross/en/train.txt", n)
    vectors = common.cls_embeddings(record.fresh_model(args.device), record.featurizer, source)
    return source, common.top_k(vectors, vectors, record.cfg.retrieval.k, exclude_self=True)


def task_batches(support, steps: int, meta_batch_size: int):
    from trainer.maml import Task
    from trainer.sampling import sample_task_batch

    return [[Task(tuple(int(i) for i in support[q]), int(q))
             for q in sample_task_batch(len(support), meta_batch_size, SEED, step)] for step in range(steps)]


def time_steps(learner, batches, source, device: str) -> tuple[float, common.PeakMemory]:
    import torch

    with common.PeakMemory(device) as memory:
        _, seconds = common.timed(lambda: [learner.meta_step(tasks, source) for tasks in batches])
        if device == "cuda":
            torch.cuda.synchronize()
    return seconds, memory


def in_process(b: common.Bundle, cfg, source_windows, batches, device: str) -> dict:
    """tasks/s, memory and gradient bytes of the official loop and of MetaLearner.meta_step."""
    from benchmarks._official import OfficialLearner, grad_bytes, trainable_bytes
    from trainer.maml import MetaLearner

    tasks = sum(len(t) for t in batches)
    out = {}
    official = OfficialLearner(b.fresh_model(device, SEED), b.featurizer, cfg, seed=SEED)
    official.meta_gradients(batches[0][:1], source_windows)  # warm-up, no update
    seconds, memory = time_steps(official, batches, source_windows, device)
    out["official"] = {"tasks_per_s": tasks / seconds, "memory": memory, "grad_bytes": official.last_grad_bytes,
                       "grad_copies": official.last_grad_copies}
    learner = MetaLearner(b.fresh_model(device, SEED), b.featurizer, cfg, seed=SEED)
    learner.task_gradients(batches[0][0], source_windows)  # warm-up, no update
    seconds, memory = time_steps(learner, batches, source_windows, device)
    # What MetaLearner holds at the meta-update: the accumulated `.grad`, measured on one batch.
    learner.meta_optimizer.zero_grad(set_to_none=True)
    learner.meta_gradient(batches[0], source_windows)
    held = grad_bytes(learner.params)
    learner.meta_optimizer.zero_grad(set_to_none=True)
    one_copy = trainable_bytes(learner.model)
    out["single"] = {"tasks_per_s": tasks / seconds, "memory": memory, "grad_bytes": held,
                     "grad_copies": round(held / one_copy)}
    return out


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


def distributed(b: common.Bundle, cfg, source, support, steps: int, workers: int, device: str, workdir: str) -> dict:
    """tasks/s (inside the workers' loop, start-up excluded), wall time with start-up, worker peaks."""
    from cluster.meta_train import MetaTrainInputs, run_meta_training

    cfg = copy.deepcopy(cfg)
    cfg.cluster.num_workers = workers
    # Fractional CPUs: Ray Train's own controller must still fit on the 2 CPUs given to Ray.
    cfg.cluster.cpus_per_worker = 0.5
    cfg.cluster.use_gpu = device == "cuda"
    cfg.train.eval_every = cfg.train.checkpoint_every = steps
    out_dir = os.path.join(workdir, f"ds{workers}-{b.name}")
    inputs = MetaTrainInputs(config=cfg.to_dict(), source=list(source), support=support, dev=[], dev_support=[],
                             seed=SEED, output_dir=out_dir)
    with WorkerPeaks(out_dir) as peaks:
        result, wall = common.timed(run_meta_training, inputs, cfg, os.path.join(workdir, "ray"),
                                    f"bench-{b.name}-w{workers}", resume=False, max_failures=0)
    if result.error is not None:
        raise RuntimeError(f"meta-training on {workers} workers failed: {result.error}")
    return {"tasks_per_s": float(result.metrics["tasks_per_s"]), "wall_s": wall,
            "worker_peak_rss": max(peaks.peaks.values(), default=0)}


def report(b: common.Bundle, runs: dict, one_copy: int) -> None:
    for name, r in runs.items():
        line = f"run {b.name} {name} {r['tasks_per_s']:.2f} tasks/s"
        if "memory" in r:
            m = r["memory"]
            line += (f" peak_rss={common.mib(m.peak_rss)} rss_growth={common.mib(m.rss_growth)} "
                     f"grad_buffers={common.mib(r['grad_bytes'])} ({r['grad_copies']} copies of "
                     f"{common.mib(one_copy)})")
            if m.cuda_peak:
                line += f" cuda_peak={common.mib(m.cuda_peak)} cuda_growth={common.mib(m.cuda_growth)}"
        else:
            line += (f" wall_with_startup={r['wall_s']:.1f}s worker_peak_rss={common.mib(r['worker_peak_rss'])} "
                     "grad_buffers=1 summed buffer per worker (by construction, not measured)")
        print(line, flush=True)


def ratios_of(runs: dict, suffix: str) -> dict[str, float]:
    rate = {name: r["tasks_per_s"] for name, r in runs.items()}
    out = {f"meta_train_{name}_vs_official{suffix}": rate[name] / rate["official"] for name in rate if name != "official"}
    distributed_runs = sorted(int(name[2:]) for name in rate if name.startswith("ds"))
    if len(distributed_runs) > 1:
        lo, hi = distributed_runs[0], distributed_runs[-1]
        out[f"meta_train_ds{hi}_vs_ds{lo}{suffix}"] = rate[f"ds{hi}"] / rate[f"ds{lo}"]
    off, single = runs["official"], runs["single"]
    out[f"meta_grad_bytes_official_over_single{suffix}"] = off["grad_bytes"] / single["grad_bytes"]
    out[f"meta_rss_growth_official_over_single{suffix}"] = (max(off["memory"].rss_growth, 1)
                                                            / max(single["memory"].rss_growth, 1))
    if single["memory"].cuda_growth:
        out[f"meta_cuda_growth_official_over_single{suffix}"] = off["memory"].cuda_growth / single["memory"].cuda_growth
    return out


def run(args) -> dict[str, float]:
    import torch

    from benchmarks._official import trainable_bytes
    from trainer.maml import group_windows

    torch.set_num_threads(1)
    common.check_args(args)
    common.quiet()
    print(common.machine(args.device), flush=True)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    ratios: dict[str, float] = {}
    with common.workdir() as workdir:
        record = common.bundle("tiny6l", args.model)
        source, support = load(args, record)
        bundles = [record] + ([] if args.no_mid else [common.mid_bundle([s.words for s in source], workdir)])
        batches = task_batches(support, steps, record.cfg.train.meta_batch_size)
        print(f"data source=en:{len(source)} sentences; {steps} meta-steps of {len(batches[0])} tasks "
              f"(K={support.shape[1]} support by [CLS] cosine, num_inner_steps={record.cfg.train.num_inner_steps})",
              flush=True)
        # Starting Ray Train and the DeepSpeed engines alone takes minutes here: --quick (under 2
        # minutes) times the in-process loops; the full run adds the 1- and 2-worker runs.
        workers = args.workers if args.workers is not None else ([] if args.quick else [1, 2])
        with_workers = bool(workers) and not args.no_distributed
        if not with_workers:
            print("note: distributed runs skipped (--quick without --workers, or --no-distributed)", flush=True)
        else:
            from cluster.runtime import init_ray

            init_ray(num_cpus=2, log_to_driver=False)
        for b in bundles:
            cfg = copy.deepcopy(b.cfg)
            cfg.train.num_meta_steps = steps
            runs = in_process(b, cfg, group_windows(b.featurizer.encode(source)), batches, args.device)
            if with_workers:
                for n in workers:
                    runs[f"ds{n}"] = distributed(b, cfg, source, support, steps, n, args.device, workdir)
            one_copy = trainable_bytes(b.fresh_model("cpu"))
            print(f"model {b.name} trainable_params={b.trainable_count()} one_gradient_copy={common.mib(one_copy)}")
            report(b, runs, one_copy)
            ratios.update(ratios_of(runs, "" if b is record else f"_{b.name}"))
    print(f"note: at mBERT-base size (8 trainable layers) one gradient copy is {common.mib(4 * MBERT_TRAINABLE)}; "
          f"the official loop holds 33 of them ({common.mib(33 * 4 * MBERT_TRAINABLE)}) at each meta-update "
          "(computed, not measured)", flush=True)
    return ratios


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    common.print_ratios(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

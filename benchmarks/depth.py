"""Benchmark: meta-training and test-time adaptation of e5-small at each frozen depth, and bf16 against fp32.

    python benchmarks/depth.py [--e5-frozen 11 10 8 6 4] [--steps N] [--sources N] [--sentences N]
                               [--workers N] [--ds-steps N] [--no-distributed] [--precision-tasks N] [--precision-sentences N]
                               [--quick] [--device cpu|cuda] [--data ROOT] [--e5 PATH]

What one seed of a replication row costs at a depth (jobs/configs/replicate_cpu_deep.yaml trains 8
layers of 12). At each number of frozen layers, on the same pseudo tasks (English train sentences,
each with its K=2 nearest others by [CLS] cosine under the pretrained encoder) and the same Spanish
test sentences (meta-cross/es/test.txt, supports from the same English sentences):
- `engine`: trainer.training.meta_trainer.MetaTrainer.train_step in this process, one thread, meta-steps
  of 32 tasks after a warm-up step (which compiles what is compiled), the kept bottom filled first;
- `ds<N>`: the same engine on N Ray Train workers with DeepSpeed (cluster.meta_train, gloo on a
  CPU), tasks/s inside the workers' loop (start-up excluded), unless --no-distributed;
- `adapt`: test-time adaptation (trainer.training.adapt.adapt_many, the batched path the adapter actors
  run), sentences/s in this process, the frozen bottom computed in the timed run.
At the deepest setting (the last of --e5-frozen) also: the per-task reference
(trainer.training.reference.MetaLearner.meta_step) on the same meta-batches, taking turns with the engine step by
step; and `train.precision=bf16` against fp32, taking turns, for the engine (meta-batches of
--precision-tasks tasks, a bf16 step being slow where the CPU lacks bf16 matmul instructions) and
for adaptation (--precision-sentences). Prints `rate` lines, a markdown table, and one `ratio <name> <value>` line per ratio.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._setup import prepare  # noqa: E402

prepare()  # threads, offline hub and sys.path, before torch is imported

import argparse  # noqa: E402
from typing import Sequence  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import meta_train as bench_meta  # noqa: E402
from trainer.config import with_overrides  # noqa: E402

DEPTHS = [11, 10, 8, 6, 4]
DEFAULT_STEPS, QUICK_STEPS = 2, 1
DEFAULT_SENTENCES, QUICK_SENTENCES = 64, 16
PRECISION_TASKS, PRECISION_SENTENCES = 4, 8
WARMUP = 2


def parse_args(argv):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--e5-frozen", type=int, nargs="+", default=DEPTHS,
                        help=f"frozen layers of e5-small's 12 to time, the last also for the reference and bf16 "
                             f"(default {' '.join(map(str, DEPTHS))})")
    parser.add_argument("--steps", type=int, default=0,
                        help=f"meta-steps of 32 tasks timed per depth (default {DEFAULT_STEPS}, --quick {QUICK_STEPS})")
    parser.add_argument("--sources", type=int, default=bench_meta.DEFAULT_SOURCE,
                        help=f"English train sentences that make the task pool (default {bench_meta.DEFAULT_SOURCE})")
    parser.add_argument("--sentences", type=int, default=0,
                        help=f"Spanish test sentences adapted per depth (default {DEFAULT_SENTENCES}, "
                             f"--quick {QUICK_SENTENCES})")
    parser.add_argument("--workers", type=int, default=2, help="DeepSpeed workers of the ds run (default 2)")
    parser.add_argument("--ds-steps", type=int, default=4, help="meta-steps timed per DeepSpeed run (default 4)")
    parser.add_argument("--no-distributed", action="store_true", help="skip the Ray Train + DeepSpeed runs")
    parser.add_argument("--precision-tasks", type=int, default=PRECISION_TASKS,
                        help=f"tasks per meta-step of the bf16/fp32 comparison (default {PRECISION_TASKS})")
    parser.add_argument("--precision-sentences", type=int, default=PRECISION_SENTENCES,
                        help=f"sentences adapted in the bf16/fp32 comparison (default {PRECISION_SENTENCES})")
    return parser.parse_args(argv)


def depth_bundle(args, frozen: int, precision: str = "fp32") -> common.Bundle:
    b = common.bundle(f"e5small-f{frozen}" + ("" if precision == "fp32" else f"-{precision}"), args.e5,
                      num_frozen_layers=frozen)
    # The frozen bottom is part of what adaptation costs here: none kept on disk.
    b.cfg = with_overrides(b.cfg, [("train.precision", precision), ("model.prefix_cache_dir", "")])
    return b


def engine_rates(b: common.Bundle, source, support, steps: int, device: str, tasks: int = 32,
                 reference: bool = False) -> dict[str, dict]:
    """{variant: run} of the engine (and the per-task reference), taking turns step by step."""
    from trainer.data.features import group_windows

    cfg = with_overrides(b.cfg, [("train.num_meta_steps", steps), ("train.meta_batch_size", tasks)])
    batches = bench_meta.task_batches(support, steps, tasks)
    variants = {"engine": bench_meta.engine_variant(b, cfg, source, support, steps + 1, device)}
    if reference:
        windows = group_windows(b.featurizer.encode(source))
        variants["sequential"] = bench_meta.sequential_variant(b, cfg, windows, batches, device)
    runs = bench_meta.taking_turns(variants, steps, device)
    for run in runs.values():
        run["tasks_per_s"] = steps * tasks / run["seconds"]
    return runs


def adaptation_rate(b: common.Bundle, targets, supports, device: str) -> tuple[float, list]:
    """Sentences/s of batched test-time adaptation (one step, from fresh weights), and the tags."""
    from trainer.training.adapt import adapt_many

    model = b.fresh_model(device).eval()
    adapt_many(model, b.featurizer, targets[:WARMUP], supports[:WARMUP], b.cfg)
    tags, seconds = common.timed(adapt_many, model, b.featurizer, targets, supports, b.cfg)
    return len(targets) / seconds, tags


def precision_pair(args, frozen: int, source, support, targets, supports, steps: int) -> dict[str, float]:
    """bf16 against fp32 at `frozen`: the engine taking turns step by step (each its own model),
    then adaptation, fp32 first then bf16 then fp32 again (the mean of the two fp32 runs)."""
    fp32, bf16 = depth_bundle(args, frozen), depth_bundle(args, frozen, "bf16")
    tasks = args.precision_tasks
    cfgs = {}
    for name, b in (("fp32", fp32), ("bf16", bf16)):
        cfg = with_overrides(b.cfg, [("train.num_meta_steps", steps), ("train.meta_batch_size", tasks)])
        cfgs[name] = bench_meta.engine_variant(b, cfg, source, support, steps + 1, args.device)
    runs = bench_meta.taking_turns(cfgs, steps, args.device)
    rate = {k: steps * tasks / r["seconds"] for k, r in runs.items()}
    for k, r in rate.items():
        print(f"rate e5small-f{frozen} engine {k} {r:.3f} tasks/s (meta-steps of {tasks} tasks)", flush=True)
    targets, supports = targets[:args.precision_sentences], supports[:args.precision_sentences]
    first, _ = adaptation_rate(fp32, targets, supports, args.device)
    low, _ = adaptation_rate(bf16, targets, supports, args.device)
    second, _ = adaptation_rate(fp32, targets, supports, args.device)
    print(f"rate e5small-f{frozen} adapt fp32 {first:.2f} / {second:.2f} sentences/s, bf16 {low:.2f}", flush=True)
    return {f"meta_train_bf16_vs_fp32_e5_f{frozen}": rate["bf16"] / rate["fp32"],
            f"adaptation_bf16_vs_fp32_e5_f{frozen}": low / ((first + second) / 2)}


def distributed_rate(args, b: common.Bundle, source, support, workdir: str) -> float:
    from cluster.runtime import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    cfg = with_overrides(b.cfg, [("train.num_meta_steps", args.ds_steps + 1)])
    run = bench_meta.distributed(b, cfg, source, support, args.ds_steps, args.workers, args.device, workdir)
    return run["tasks_per_s"]


def table(rows: Sequence[dict], workers: int) -> str:
    head = (f"| frozen layers | trainable weights | engine, 1 process (tasks/s) | {workers} DeepSpeed workers (tasks/s) "
            "| one pass of 14,080 tasks on them (min) | adaptation, 1 process (sentences/s) |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        ds = r.get("ds")
        lines.append(f"| {r['frozen']} | {r['trainable'] / 1e6:.1f} M | {r['engine']:.2f} | "
                     f"{'—' if ds is None else f'{ds:.2f}'} | {'—' if ds is None else f'{14_080 / ds / 60:.0f}'} | "
                     f"{r['adapt']:.2f} |")
    return "\n".join(lines)


def run(args) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    common.check_args(args)
    if not os.path.isdir(args.e5):
        raise SystemExit(f"no encoder at {args.e5}: pass --e5 PATH")
    common.quiet()
    print(common.machine(args.device), flush=True)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    n_targets = args.limit or args.sentences or (QUICK_SENTENCES if args.quick else DEFAULT_SENTENCES)
    sources = args.limit or (bench_meta.QUICK_SOURCE if args.quick else args.sources)
    # Retrieval is by the pretrained encoder whatever is frozen: one set of tasks and supports.
    first = depth_bundle(args, args.e5_frozen[0])
    source, support = bench_meta.load(argparse_like(args, sources), first)
    targets = common.read(args, "meta-cross/es/test.txt", n_targets)
    model = first.fresh_model(args.device)
    ids = common.top_k(common.cls_embeddings(model, first.featurizer, targets),
                       common.cls_embeddings(model, first.featurizer, source), first.cfg.retrieval.k)
    supports = [[source[j] for j in row] for row in ids]
    print(f"data: {len(source)} English train sentences as queries (K={support.shape[1]}), {steps} meta-steps of 32 "
          f"tasks per depth; {len(targets)} Spanish test sentences adapted", flush=True)
    rows, ratios = [], {}
    with common.workdir() as workdir:
        for frozen in args.e5_frozen:
            b = depth_bundle(args, frozen)
            deepest = frozen == args.e5_frozen[-1]
            runs = engine_rates(b, source, support, steps, args.device, reference=deepest)
            row = {"frozen": frozen, "trainable": b.trainable_count(), "engine": runs["engine"]["tasks_per_s"]}
            row["adapt"], _ = adaptation_rate(b, targets, supports, args.device)
            if not args.no_distributed:
                row["ds"] = distributed_rate(args, b, source, support, workdir)
            print(f"rate e5small-f{frozen} engine {row['engine']:.2f} tasks/s (chunk {runs['engine']['chunk']}), "
                  f"ds{args.workers} {row.get('ds', float('nan')):.2f} tasks/s, adapt {row['adapt']:.2f} sentences/s",
                  flush=True)
            if deepest:
                print(f"rate e5small-f{frozen} sequential {runs['sequential']['tasks_per_s']:.2f} tasks/s", flush=True)
                ratios[f"meta_train_engine_vs_sequential_e5_f{frozen}"] = (
                    runs["engine"]["tasks_per_s"] / runs["sequential"]["tasks_per_s"])
            rows.append(row)
        ratios.update(precision_pair(args, args.e5_frozen[-1], source, support, targets, supports, steps))
    print(table(rows, args.workers), flush=True)
    return ratios


def argparse_like(args, sources: int) -> argparse.Namespace:
    """bench_meta.load reads args.limit/quick/sources: the task pool size decided here."""
    return argparse.Namespace(**{**vars(args), "limit": sources, "quick": False, "sources": sources})


def main(argv=None) -> int:
    return common.main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

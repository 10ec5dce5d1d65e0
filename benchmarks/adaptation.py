"""Benchmark: test-time adaptation throughput (sentences/s) against the official loop, in one run.

    python benchmarks/adaptation.py [--quick] [--limit N] [--sentences N] [--device cpu|cuda]
                                    [--data ROOT] [--model PATH] [--no-mid] [--no-pool] [--actors 1 2]

Labels Spanish test sentences (meta-cross/es/test.txt), each adapted by one BertAdam step on its
K=2 English support sentences from the same weights, five ways on the same model and sentences:
the official loop (benchmarks/_official.py: one sentence at a time, windows padded to 128, fresh
optimiser and a weight restore per sentence), metaner's sequential path (adapt_many batched=False),
its batched path (adapt_many default), and the Ray adapter pool (cluster.adapt_pool) with 1 and 2
actors. Supports are the 2 English train sentences nearest to each target by [CLS] cosine under
the model of record's encoder (flat numpy search; the same supports serve every model).
Runs on the model of record and on a mid-size random BERT (4 layers, hidden 256) built on the fly.

Prints the machine, per-variant `rate` lines and one `ratio <name> <value>` line per ratio. Timing
runs with OMP_NUM_THREADS=1 (one thread per process; each pool actor also has one).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._setup import prepare  # noqa: E402

prepare()  # threads, offline hub and sys.path, before torch is imported


from benchmarks import common  # noqa: E402
from trainer.config import with_overrides  # noqa: E402

# Sentences of the Spanish test set and of the English train set the supports come from.
DEFAULT_TARGETS, QUICK_TARGETS, QUICK_POOL = 400, 48, 1000
WARMUP = 2
POOL_REPEATS = 5


def parse_args(argv):
    parser = common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--no-pool", action="store_true", help="skip the Ray adapter pool")
    parser.add_argument("--sentences", type=int, default=DEFAULT_TARGETS,
                        help=f"target sentences without --quick (0: the whole test set; default {DEFAULT_TARGETS})")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="pool sizes to time")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sentences adapted together by the batched path (default: adapt.batch_size)")
    return parser.parse_args(argv)


def load(args):
    """Target sentences, their support sentences, and the English pool they come from."""
    n_targets = args.limit or (QUICK_TARGETS if args.quick else args.sentences)
    n_pool = max(args.limit * 20, 50) if args.limit else (QUICK_POOL if args.quick else 0)
    targets = common.read(args, "meta-cross/es/test.txt", n_targets)
    pool = common.read(args, "meta-cross/en/train.txt", n_pool)
    return targets, pool


def supports_by_cls(record: common.Bundle, targets, pool, k: int, device: str):
    model = record.fresh_model(device)
    ids = common.top_k(common.cls_embeddings(model, record.featurizer, targets),
                       common.cls_embeddings(model, record.featurizer, pool), k)
    return [[pool[j] for j in row] for row in ids]


def agreement(a, b) -> float:
    words = sum(len(t) for t in a)
    same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    return same / max(words, 1)


def in_process(b: common.Bundle, targets, supports, device: str) -> tuple[dict, dict]:
    """Seconds and tags of the official loop and metaner's two in-process paths."""
    from benchmarks._official import OfficialLearner
    from trainer.training.adapt import adapt_many

    cfg = b.cfg
    official = OfficialLearner(b.fresh_model(device), b.featurizer, cfg)
    model = b.fresh_model(device).eval()
    runs = {
        "official": lambda s, t: official.adapt_and_predict(s, t, cfg.adapt.adapt_lr, cfg.adapt.num_adapt_steps,
                                                           cfg.adapt.lambda_max),
        "sequential": lambda s, t: adapt_many(model, b.featurizer, s, t, cfg, batched=False),
        "batched": lambda s, t: adapt_many(model, b.featurizer, s, t, cfg),
    }
    seconds, tags = {}, {}
    for name, fn in runs.items():
        fn(targets[:WARMUP], supports[:WARMUP])
        tags[name], seconds[name] = common.timed(fn, targets, supports)
    return seconds, tags


def pooled(b: common.Bundle, targets, supports, sizes, device: str, workdir: str) -> tuple[dict, dict]:
    """Seconds and tags of the Ray adapter pool with each number of actors in `sizes`.

    One pool of max(sizes) actors is started and loaded before the clock; a smaller pool is its
    first actors, so that actor start-up (not timed) is paid once per model.
    """
    from cluster.adapt_pool import AdapterPool, adapt_targets
    from trainer.training.checkpoint import save_checkpoint

    checkpoint = os.path.join(workdir, f"{b.name}-checkpoint")
    save_checkpoint(checkpoint, b.fresh_model("cpu"), tokenizer=b.tokenizer, config=b.cfg)
    cfg = with_overrides(b.cfg, [
        ("cluster.num_adapter_actors", max(sizes)),
        # Units of three batched chunks (24): with the default 32, the 48 sentences of --quick are two
        # units of 32 and 16, and the actor with 32 alone sets the time (at best 1.5x one actor).
        ("cluster.adapt_unit_size", 3 * b.cfg.adapt.batch_size),
        ("cluster.gpus_per_actor", 1.0 / max(sizes) if device == "cuda" else b.cfg.cluster.gpus_per_actor),
    ])
    pool = AdapterPool(checkpoint, cfg)
    seconds, tags = {}, {}
    try:
        pool.pids()  # every actor constructed and its checkpoint loaded
        everyone = pool.actors
        # A unit for every actor, so that none meets its first (slower) call on the clock.
        warm = cfg.cluster.adapt_unit_size * len(everyone)
        adapt_targets(checkpoint, cfg, {"es": targets[:warm]}, {"es": supports[:warm]},
                      os.path.join(workdir, f"warm-{b.name}"), progress=False, pool=pool)
        # Best of POOL_REPEATS (each in a fresh folder, else the units would be found done): a run
        # is under a second here, where one burst of another process's work decides it. The pool
        # sizes take turns, so that a drift in the machine's speed falls on each alike.
        for r in range(POOL_REPEATS):
            for n in sorted(sizes):
                pool.actors = everyone[:n]
                out, t = common.timed(adapt_targets, checkpoint, cfg, {"es": targets}, {"es": supports},
                                      os.path.join(workdir, f"pool{n}-{b.name}-{r}"), progress=False, pool=pool)
                tags.setdefault(f"pool{n}", out["es"])
                seconds[f"pool{n}"] = min(seconds.get(f"pool{n}", t), t)
        pool.actors = everyone
    finally:
        pool.shutdown()
    return seconds, tags


def run(args) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    common.check_args(args)
    common.quiet()
    print(common.machine(args.device), flush=True)
    targets, pool = load(args)
    ratios: dict[str, float] = {}
    with common.workdir() as workdir:
        bundles = common.models(args, [s.words for s in pool + targets], workdir)
        for b in bundles:
            # Throughput of one checkpoint: the store that shares the frozen bottom across
            # checkpoints would let later variants reuse earlier ones' work.
            b.cfg = with_overrides(b.cfg, [("model.prefix_cache_dir", "")])
            if args.batch_size:
                b.cfg = with_overrides(b.cfg, [("adapt.batch_size", args.batch_size)])
        supports = supports_by_cls(bundles[0], targets, pool, bundles[0].cfg.retrieval.k, args.device)
        words = sum(len(s.words) for s in targets)
        print(f"data targets=es:{len(targets)} sentences ({words} words) supports=K{len(supports[0])} "
              f"from {len(pool)} English train sentences by [CLS] cosine", flush=True)
        if not args.no_pool:
            from cluster.runtime import init_ray

            init_ray(num_cpus=2, log_to_driver=False)
        for b in bundles:
            seconds, tags = in_process(b, targets, supports, args.device)
            if not args.no_pool:
                pool_seconds, pool_tags = pooled(b, targets, supports, args.actors, args.device, workdir)
                seconds.update(pool_seconds)
                tags.update(pool_tags)
            rates = {name: len(targets) / s for name, s in seconds.items()}
            print(f"model {b.name} trainable_params={b.trainable_count()}", flush=True)
            for name, rate in rates.items():
                print(f"rate {b.name} {name} {rate:.2f} sentences/s ({seconds[name]:.2f} s)", flush=True)
            for name in tags:
                if name != "sequential":
                    print(f"agreement {b.name} {name}_vs_sequential {agreement(tags['sequential'], tags[name]):.4f}")
            suffix = "" if b is bundles[0] else f"_{b.name}"
            for name in rates:
                if name != "official":
                    ratios[f"adaptation_{name}_vs_official{suffix}"] = rates[name] / rates["official"]
            ratios[f"adaptation_batched_vs_sequential{suffix}"] = rates["batched"] / rates["sequential"]
            if len(args.actors) > 1 and not args.no_pool:
                lo, hi = min(args.actors), max(args.actors)
                ratios[f"adaptation_pool{hi}_vs_pool{lo}{suffix}"] = rates[f"pool{hi}"] / rates[f"pool{lo}"]
        if not args.no_e5:
            ratios.update(replication_setting(args, targets, pool))
    return ratios


def replication_setting(args, targets, pool) -> dict[str, float]:
    """Sentences/s of test-time adaptation on e5-small with 10 frozen layers (what the replication's
    evaluation budget is planned from), in one process: batched and sequential."""
    from trainer.training.adapt import adapt_many

    if not os.path.isdir(args.e5):
        print(f"note: replication setting skipped: no encoder at {args.e5} (--e5 PATH)", flush=True)
        return {}
    e5 = common.bundle("e5small", args.e5, num_frozen_layers=common.E5_FROZEN)
    e5.cfg = with_overrides(e5.cfg, [("model.prefix_cache_dir", "")])
    supports = supports_by_cls(e5, targets, pool, e5.cfg.retrieval.k, args.device)
    model = e5.fresh_model(args.device).eval()
    rates = {}
    for name, batched in (("batched", True), ("sequential", False)):
        adapt_many(model, e5.featurizer, targets[:WARMUP], supports[:WARMUP], e5.cfg, batched=batched)
        _, seconds = common.timed(adapt_many, model, e5.featurizer, targets, supports, e5.cfg, batched=batched)
        rates[name] = len(targets) / seconds
        print(f"rate e5small {name} {rates[name]:.2f} sentences/s ({seconds:.2f} s; {common.E5_FROZEN} frozen layers, "
              "frozen bottom computed in the timed run)", flush=True)
    return {"adaptation_batched_vs_sequential_e5": rates["batched"] / rates["sequential"]}


def main(argv=None) -> int:
    return common.main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

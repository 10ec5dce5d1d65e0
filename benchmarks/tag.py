"""Benchmark: tagging throughput (sentences/s) with 1 and 2 adapter actors, with and without soft
labels, a student's training rate on them, and peak memory as the input grows, on the demo
checkpoint, in one run.

    python benchmarks/tag.py [--quick] [--checkpoint DIR] [--sentences N] [--actors 1 2] [--no-soft]
                             [--memory 10000 100000] [--limit N]

Input: raw text, one sentence per line, made from the synthetic templates of es, nl, de and fr
(jobs.synthetic; deterministic), written to a file and read back as `metaner tag` reads it.
Throughput: the job's stream (cluster.tag_stream: embedding actor, index shard, adapter actors,
jobs/configs/tag.yaml's settings) with every actor started and warmed before the clock, then the
same sentences through 1 and through 2 of the adapter actors, and through all of them keeping soft
labels (`metaner tag --soft`: probabilities back from the actors, a float16 sidecar per shard),
taking turns, best of --repeats (3) runs each; shards are written as the job writes them. The
student's rate: updates/s of `metaner distill`'s training (trainer.training.finetune on the soft
shards just written) against the same fine-tuning on their hard tags, taking turns. Memory (not under --quick): for each input size a fresh stream tags the whole file, and the
peak RSS (VmHWM) of the driver and of every actor is read at the end.

Prints the machine, `rate` and `memory` lines and one `ratio <name> <value>` line per ratio:
tag_actors2_vs_1 (higher is better), tag_soft_vs_hard (soft labels' throughput over tags' alone; at
least 0.85 is the aim), distill_student_vs_finetune (a student's updates/s over plain fine-tuning's),
tag_peak_rss_<big>_over_<small> (1.0 is flat). Every process
computes on one thread (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._setup import prepare  # noqa: E402

prepare()  # threads, offline hub and sys.path, before torch is imported

import argparse  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from benchmarks import common  # noqa: E402

DEMO_CHECKPOINT = os.path.join(common.REPO, "outputs", "demo", "synthetic", "ours", "seed95", "best")
DEFAULT_SENTENCES, QUICK_SENTENCES = 10000, 4000
DEFAULT_MEMORY = [10_000, 100_000]
LANGS = ("es", "nl", "de", "fr")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="checkpoint (default: the one `metaner demo` "
                                                                       "writes, outputs/demo/synthetic/ours/seed95/best)")
    parser.add_argument("--quick", action="store_true", help="throughput only, on fewer sentences: under 2 minutes")
    parser.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES, help="sentences timed per actor count")
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2],
                        help="adapter actor counts to time (none: memory only)")
    parser.add_argument("--memory", type=int, nargs="*", default=None,
                        help=f"input sizes whose peak RSS is compared (default {DEFAULT_MEMORY}; none with --quick)")
    parser.add_argument("--limit", type=int, default=0, help="cap on sentences everywhere (smoke runs)")
    parser.add_argument("--no-soft", dest="soft", action="store_false",
                        help="leave out the soft-label runs and the student's rate")
    parser.add_argument("--student-steps", type=int, default=20, help="updates timed per run of the student")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per actor count; the best counts")
    parser.add_argument("overrides", nargs="*", help="settings over jobs/configs/tag.yaml's, e.g. cluster.adapt_unit_size=64")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.checkpoint, "metaner.json")):
        raise SystemExit(f"{args.checkpoint} is not a checkpoint: run `metaner demo` first, or pass --checkpoint")
    if args.memory is None:
        args.memory = [] if args.quick else DEFAULT_MEMORY
    n = QUICK_SENTENCES if args.quick else args.sentences
    args.sentences = min(n, args.limit) if args.limit else n
    args.memory = [min(m, args.limit * (i + 1)) if args.limit else m for i, m in enumerate(args.memory)]
    return args


def write_input(path: str, n: int) -> str:
    """`n` raw sentences, one per line, written a thousand at a time (the generator keeps none)."""
    from jobs.synthetic import make_sentences

    with open(path, "w", encoding="utf-8") as fh:
        for block in range(0, n, 1000):
            lang = LANGS[(block // 1000) % len(LANGS)]
            for s in make_sentences(lang, min(1000, n - block), seed=block):
                fh.write(" ".join(s.words) + "\n")
    return path


def setup(args, actors: int):
    """(config, checkpoint inputs, English source) as `metaner tag` sets them up."""
    from jobs.common import CONFIGS
    from jobs.tag import prepare
    from trainer.config import load_config
    from trainer.data.corpus import read_corpus

    overrides = list(args.overrides) + [f"cluster.num_adapter_actors={actors}"]
    ns = SimpleNamespace(checkpoint=args.checkpoint, encoder=None, source=None, lang=None, overrides=overrides)
    cfg, found = prepare(load_config(os.path.join(CONFIGS, "tag.yaml"), overrides), ns)
    return cfg, found, read_corpus(found.source).sentences


def stream_items(path: str, cfg):
    from jobs.tag import sentences
    from jobs.textio import InputSet, shards

    return shards(sentences(InputSet([path], format="text", max_words=cfg.tag.max_words)), cfg.tag.shard_size)


def throughput(args, workdir: str) -> dict:
    """Sentences/s through the stream with each number of adapter actors in args.actors, and with
    all of them keeping soft labels ("soft") unless --no-soft."""
    from cluster.tag_stream import TagStream
    from retrieval.cache import RetrievalCache

    cfg, found, source = setup(args, max(args.actors))
    path = write_input(os.path.join(workdir, "throughput.txt"), args.sentences)
    rates = {}
    runs = [(n, False) for n in sorted(args.actors)] + ([(max(args.actors), True)] if args.soft else [])
    with TagStream(found.checkpoint, found.encoder, cfg, source, RetrievalCache(cfg.retrieval.cache_dir)) as stream:
        everyone = stream.pool.actors
        warm = write_input(os.path.join(workdir, "warm.txt"), 2 * cfg.cluster.adapt_unit_size * len(everyone))
        stream.run(stream_items(warm, cfg), lambda shard: None)  # every actor's first call off the clock
        processes = {"driver": None, "embed": stream.embedder.actors, "index": stream.index.shards}
        seconds: dict = {key: [] for key in runs}
        spent: dict = {key: {} for key in runs}
        # Actor counts take turns, run after run, so that a drift in the machine's speed (a shared
        # VM's host) falls on every count alike instead of on whichever ran last.
        for r in range(args.repeats):
            for n, soft in runs:
                stream.pool.actors, stream.soft = everyone[:n], soft
                kinds = {**processes, "adapter": everyone[:n]}
                before = _cpu_seconds(kinds)
                folder = os.path.join(workdir, f"actors{n}{'-soft' if soft else ''}-{r}")
                seconds[n, soft].append(_timed_run(stream, path, cfg, folder, soft))
                for k, v in _cpu_seconds(kinds).items():
                    spent[n, soft][k] = spent[n, soft].get(k, 0.0) + v - before[k]
        stream.pool.actors, stream.soft = everyone, False
    for n, soft in runs:
        rate = args.sentences / min(seconds[n, soft])
        rates["soft" if soft else n] = rate
        name = f"actors={n}{' soft' if soft else ''}"
        print(f"rate tag {name} {rate:.1f} sentences/s ({min(seconds[n, soft]):.1f} s for {args.sentences}, best "
              f"of {args.repeats}, taking turns)", flush=True)
        done = args.sentences * args.repeats
        print(f"cpu tag {name} " + " ".join(f"{k}={1000 * v / done:.3f}ms/sentence"
                                            for k, v in spent[n, soft].items()), flush=True)
    return rates


def _timed_run(stream, path: str, cfg, folder: str, soft: bool = False) -> float:
    from jobs.textio import ShardWriter

    writer = ShardWriter(folder, soft=soft)
    write = lambda s: writer.write(s.number, s.first, s.sentences, s.wheres, s.tags, s.soft)  # noqa: E731
    return common.timed(stream.run, stream_items(path, cfg), write)[1]


def student_rate(args, folder: str) -> float:
    """Updates/s of a student on the soft shards in `folder` over plain fine-tuning on their tags,
    the same model, windows and batches, taking turns (best of --repeats)."""
    from jobs.distill import read_teacher, student_config
    from trainer.config import with_overrides
    from trainer.data.features import Featurizer
    from trainer.modules.bottom import FrozenBottom
    from trainer.modules.model import load_tokenizer
    from trainer.training.checkpoint import build_model, use_config
    from trainer.training.finetune import finetune

    cfg = with_overrides(student_config(use_config(args.checkpoint), 95),
                         [("train.eval_every", 10 ** 9), ("model.prefix_cache_dir", "")])
    sentences, soft = read_teacher(folder, unspaced=False)
    featurizer = Featurizer(load_tokenizer(args.checkpoint), cfg.model.max_length, cfg.model.window_context)
    model = build_model(cfg, seed=95)
    bottom = FrozenBottom(model, featurizer)
    seconds: dict = {"student": [], "finetune": []}
    for _ in range(args.repeats):
        for name in seconds:
            teacher = soft if name == "student" else None
            seconds[name].append(common.timed(finetune, model, featurizer, sentences, cfg, seed=95,
                                              num_steps=args.student_steps, bottom=bottom, teacher=teacher)[1])
    rates = {name: args.student_steps / min(s) for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"rate distill {name} {rate:.2f} updates/s of {cfg.train.base_batch_size} windows "
              f"({len(sentences)} sentences, best of {args.repeats}, taking turns)", flush=True)
    return rates["student"] / rates["finetune"]


def _cpu_seconds(processes: dict) -> dict[str, float]:
    """CPU seconds (user + system, every thread) each kind of process has used so far: where a
    sentence's time goes besides adaptation, which decides how far a second adapter actor can pay
    on two cores."""
    import time

    import ray

    out = {}
    try:
        import psutil  # Ray's daemons (raylet, GCS): the price of each call, if psutil is there
    except ImportError:
        psutil = None
    if psutil is not None:
        out["ray"] = sum(p.info["cpu_times"].user + p.info["cpu_times"].system
                         for p in psutil.process_iter(["name", "cpu_times"])
                         if p.info["name"] in ("raylet", "gcs_server") and p.info["cpu_times"] is not None)
    for kind, actors in processes.items():
        if actors is None:
            out[kind] = time.process_time()
        else:
            out[kind] = sum(ray.get([a.__ray_call__.remote(lambda self: time.process_time()) for a in actors]))
    return out


def _actor_peak(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: common.pid_peak_rss(os.getpid())))


def memory(args, workdir: str, n: int) -> dict[str, int]:
    """Peak RSS of the driver (over the run) and of each actor (over its life) tagging n sentences."""
    from cluster.tag_stream import TagStream
    from jobs.textio import ShardWriter
    from retrieval.cache import RetrievalCache

    cfg, found, source = setup(args, 2)
    path = write_input(os.path.join(workdir, f"memory-{n}.txt"), n)
    writer = ShardWriter(os.path.join(workdir, f"memory-{n}"))
    with common.PeakMemory("cpu") as driver:
        with TagStream(found.checkpoint, found.encoder, cfg, source,
                       RetrievalCache(cfg.retrieval.cache_dir)) as stream:
            _, seconds = common.timed(stream.run, stream_items(path, cfg),
                                      lambda s: writer.write(s.number, s.first, s.sentences, s.wheres, s.tags))
            actors = {"embed": stream.embedder.actors, "index": stream.index.shards, "adapter": stream.pool.actors}
            peaks = {f"{kind}{i}": _actor_peak(a) for kind, group in actors.items() for i, a in enumerate(group)}
    peaks["driver"] = driver.peak_rss
    peaks["total"] = sum(peaks.values())
    print(f"memory tag sentences={n} " + " ".join(f"{k}={common.mib(v)}" for k, v in peaks.items())
          + f" ({n / seconds:.1f} sentences/s)", flush=True)
    return peaks


def run(args) -> dict[str, float]:
    import torch

    from cluster.runtime import init_ray

    torch.set_num_threads(1)
    common.quiet()
    print(common.machine("cpu"), flush=True)
    print(f"checkpoint {args.checkpoint}", flush=True)
    init_ray(num_cpus=2, log_to_driver=False)
    ratios: dict[str, float] = {}
    with common.workdir() as workdir:
        rates = throughput(args, workdir) if args.actors else {}
        counts = sorted(n for n in rates if n != "soft")
        if len(counts) > 1:
            lo, hi = counts[0], counts[-1]
            ratios[f"tag_actors{hi}_vs_{lo}"] = rates[hi] / rates[lo]
        if "soft" in rates:
            ratios["tag_soft_vs_hard"] = rates["soft"] / rates[counts[-1]]
            ratios["distill_student_vs_finetune"] = student_rate(
                args, os.path.join(workdir, f"actors{counts[-1]}-soft-0"))
        peaks = {n: memory(args, workdir, n) for n in args.memory}
    if len(peaks) > 1:
        small, big = min(peaks), max(peaks)
        name = f"{_size(big)}_over_{_size(small)}"
        ratios[f"tag_peak_rss_{name}"] = peaks[big]["total"] / peaks[small]["total"]
        ratios[f"tag_driver_peak_rss_{name}"] = peaks[big]["driver"] / peaks[small]["driver"]
    return ratios


def _size(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv=None) -> int:
    return common.main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

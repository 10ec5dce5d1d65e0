"""Label a corpus in any language with a trained checkpoint: each sentence retrieves its English
support sentences, the model adapts to them, and the sentence is tagged; streamed through Ray.

    metaner tag --checkpoint DIR --input PATH [--out DIR] [--lang zh] [--format auto] [--conll]
    python -m jobs.tag --checkpoint outputs/demo/synthetic/ours/seed95/best --input news/ --out tagged

PATH is a file, a folder or a glob of plain text (one sentence per line; --format paragraphs joins
the lines of each paragraph), CoNLL columns, or JSONL with a text field. Output: <out>/part-*.jsonl
(words, tags and entity spans per sentence, in input order), .conll with --conll, and with --soft
the model's probabilities at every labelled unit (part-*.soft.npy, float16; the teacher's output
that `metaner distill` trains a student on). Started again with the same --out, a run skips the
shards already written.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from cluster.runtime import check_resources, init_ray
from jobs.textio import FORMATS, InputSet, ShardWriter, expand, shards
from retrieval.cache import RetrievalCache
from trainer.data.corpus import Sentence, read_corpus
from trainer.utils.digest import file_sha256, values_sha256
from trainer.utils.errors import InputError
from trainer.utils.paths import split_selector

from .common import check_record, main_guard, parse, write_record

logger = logging.getLogger(__name__)

# Settings that change neither which sentences a shard holds nor their tags: a run started again
# with other values of these continues the same output.
_NOT_OUTPUT = ("cluster.", "mlflow.", "distill.", "tag.shards_in_flight", "tag.start_timeout_s", "retrieval.cache_dir",
               "model.prefix_cache_dir", "train.output_dir", "data.root", "model.name_or_path")


def input_arguments(p, checkpoint: str = "--checkpoint") -> None:
    p.add_argument(checkpoint, dest="checkpoint", required=True,
                   help="checkpoint folder of a trained run (e.g. <out>/seed95/best)")
    p.add_argument("--lang", help="language of the input: one of the checkpoint's data.unspaced_languages (zh) "
                                  "is read unspaced, as its test set is")
    p.add_argument("--encoder", help="folder of the retrieval encoder, where the one the checkpoint records is "
                                     "not on this machine (its weights must be the same)")
    p.add_argument("--source", help="the English source corpus, where the one the checkpoint records is not on "
                                    "this machine (its content must be the same)")


def prepare(job_cfg, args, sections=("cluster", "tag", "mlflow")):
    """(config, AdaptationInputs): the checkpoint's encoder and source, found and checked, and its
    settings (trainer.training.checkpoint.use_config) with this job's `sections` and the command
    line's overrides on top."""
    # torch, which trainer.training.checkpoint imports, takes seconds: a bad input or setting is named
    # before it is needed.
    from jobs.inputs import adaptation_inputs
    from trainer.training.checkpoint import use_config

    found = adaptation_inputs(args.checkpoint, encoder=args.encoder, source=args.source)
    job = job_cfg.to_dict()
    # Each sentence is adapted once: keeping its frozen bottom's states on disk would only fill it.
    overrides = [*((name, job[name]) for name in sections), ("model.prefix_cache_dir", "")]
    if not os.path.isdir(found.config.retrieval.cache_dir):
        overrides.append(("retrieval.cache_dir", job["retrieval"]["cache_dir"]))
    return use_config(found.checkpoint, overrides + list(args.overrides)), found


def open_input(specs: list[str], cfg, args, text_field: str = "text"):
    """The InputSet of `specs`, read through once (checked, counted) before any work."""
    if args.lang is not None and not re.fullmatch(r"[a-z]{2,3}", args.lang):
        raise InputError(f"--lang {args.lang}: give a language code such as es, de or zh")
    files = [f for spec in specs for f in expand(spec)]
    unspaced = args.lang in cfg.data.unspaced_languages
    inputs = InputSet(files, format=getattr(args, "format", "text"), unspaced=unspaced, text_field=text_field,
                      max_words=cfg.tag.max_words)
    total = inputs.count()
    if total == 0:
        raise InputError(f"--input {' '.join(specs)}: no sentence to tag in {len(files)} file(s)")
    return inputs, total


def record(cfg, found, inputs, conll: bool, soft: bool = False) -> dict:
    """What the shards in --out are made from: a run started again continues them only if equal."""
    # torch deferred: see prepare.
    from trainer.training.checkpoint import weights_sha256

    values = {k: v for k, v in cfg.flat().items() if not k.startswith(_NOT_OUTPUT)}
    values.update({"input.files": [os.path.abspath(f) for f in inputs.files], "input.digest": inputs.digest(),
                   "input.format": inputs.format, "input.unspaced": inputs.unspaced,
                   "input.text_field": inputs.text_field, "output.conll": conll, "output.soft": soft,
                   "checkpoint.weights": weights_sha256(found.checkpoint),
                   "checkpoint.labels": found.labels, "encoder.weights": weights_sha256(found.encoder),
                   "source.sha256": file_sha256(split_selector(found.source)[0]),
                   "source.split": split_selector(found.source)[1]})
    values = json.loads(json.dumps(values, sort_keys=True, default=str))
    return {"hash": values_sha256(values), "values": values}


def tag(cfg, found, items, total: int, out: Path, conll: bool = False, progress: bool = True,
        soft: bool = False) -> dict:
    """Stream the first `total` of `items` ((Sentence, where) in input order, as `sentences`
    yields them), every shard not yet in `out`, through the actors (keeping the model's
    probabilities with `soft`); the summary of the whole output."""
    # Ray and FAISS take seconds to import: only once the input is read and checked.
    from cluster.tag_stream import TagStream

    source = read_corpus(found.source).sentences  # a corpus that cannot be read stops here, before actors
    writer = ShardWriter(out, conll, soft)
    done, before, entities = _written(writer, total, cfg.tag.shard_size)
    started = time.perf_counter()
    if before < total:
        init_ray(cfg.cluster.address)
        check_resources(cfg, ("tag",))  # before any actor: a cluster that cannot place them all says so
        bar = tqdm(total=total, initial=before, desc="tag", unit="sent", disable=not progress, smoothing=0.1)

        def write(shard):
            entities.update(writer.write(shard.number, shard.first, shard.sentences, shard.wheres, shard.tags,
                                         shard.soft))

        try:
            with TagStream(found.checkpoint, found.encoder, cfg, source, RetrievalCache(cfg.retrieval.cache_dir),
                           soft) as stream:
                stream.run(shards(islice(items, total), cfg.tag.shard_size, skip=done), write, bar.update)
        finally:
            bar.close()
    seconds = time.perf_counter() - started
    summary = {"sentences": total, "sentences_this_run": total - before, "entities": dict(sorted(entities.items())),
               "seconds": seconds, "sentences_per_s": (total - before) / seconds if seconds > 0 else 0.0,
               "out": str(out), "files": [str(p) for p in writer.paths()]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _written(writer, total: int, size: int) -> tuple[set, int, Counter]:
    """Shards already in the output folder, how many sentences they hold, their entities per type."""
    done = writer.done()
    entities: Counter = Counter()
    for n in sorted(done):
        entities.update(writer.counts(n)[1])
    before = sum(min(size, total - n * size) for n in done)
    if done:
        logger.info("resuming: %d shards (%d sentences) already written in %s", len(done), before, writer.folder)
    return done, before, entities


def sentences(inputs):
    """(Sentence, file:line) of every sentence of the input, untagged, unspaced where asked."""
    for raw in inputs.sentences():
        yield Sentence(raw.words, ("O",) * len(raw.words), inputs.unspaced), raw.where


def print_summary(summary: dict) -> None:
    files = summary["files"]
    shown = files if len(files) <= 4 else files[:2] + [f"... ({len(files) - 3} more)"] + files[-1:]
    entities = "  ".join(f"{k} {v:,}" for k, v in summary["entities"].items()) or "none"
    print(f"sentences  {summary['sentences']:,} ({summary['sentences_this_run']:,} this run, "
          f"{summary['sentences_per_s']:.1f} sentences/s)")
    print(f"entities   {entities}")
    print(f"wall time  {summary['seconds']:.1f} s")
    print(f"output     {summary['out']}")
    for f in shown:
        print(f"           {f}")


def run(argv=None) -> int:
    def arguments(p):
        input_arguments(p)
        p.add_argument("--input", required=True, nargs="+", help="file(s), folder(s) or glob(s) of text to tag")
        p.add_argument("--format", choices=FORMATS, default="auto",
                       help="text: one sentence (or several) per line; paragraphs: lines joined up to a blank line; "
                            "conll: first column the word; jsonl: a text field per line (auto: by name and content)")
        p.add_argument("--text-field", default="text", help="JSONL field holding the text or a list of words")
        p.add_argument("--conll", action="store_true", help="also write part-*.conll (word TAB tag)")
        p.add_argument("--soft", action="store_true",
                       help="also keep the model's probabilities at every labelled unit (part-*.soft.npy, float16)")

    job_cfg, args = parse(argv, "tag", arguments, model_from_config=False)
    cfg, found = prepare(job_cfg, args)
    inputs, total = open_input(args.input, cfg, args, args.text_field)
    work = record(cfg, found, inputs, args.conll, args.soft)
    check_record(args.out, work)  # another run's shards in --out stop the job here
    write_record(args.out, work)
    print_summary(tag(cfg, found, sentences(inputs), total, args.out, args.conll, soft=args.soft))
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

"""The `metaner` console script: inspect corpora, score predictions, and run the jobs."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from dataclasses import replace

from trainer.data.corpus import read_corpus
from trainer.data.scoring import read_conll, score
from trainer.utils.errors import InputError

from .common import DEBUG_HELP, exit_status, one_line
from .console import debug_requested

# Subcommands that are whole jobs: each module has `main(argv)`; imported only when asked for,
# so that `metaner inspect` does not pay for torch, transformers or Ray.
JOBS = {
    "demo": "jobs.demo",
    "pipeline": "jobs.pipeline",
    "meta-train": "jobs.meta_train",
    "evaluate": "jobs.evaluate",
    "build-index": "jobs.build_index",
    "ablation": "jobs.ablation",
    "replicate": "jobs.replicate",
    "compare": "jobs.compare",
    "results": "jobs.results",
    "low-resource": "jobs.low_resource",
    "predict": "jobs.predict",
    "tag": "jobs.tag",
    "distill": "jobs.distill",
}


def _unspaced(sentences, tokenizer_path: str) -> dict:
    """The sentences read unspaced with a tokenizer, as for a language of data.unspaced_languages:
    pieces, and the gold entities with a boundary inside a piece (trainer.data.features.split_entities)."""
    # torch and transformers take seconds to import: only --tokenizer needs them, not every
    # `metaner inspect` and `metaner score`.
    from trainer.data.features import Featurizer, split_entities, vocabulary
    from trainer.modules.model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    featurizer = Featurizer(tokenizer)
    counts = split_entities(featurizer, [replace(s, unspaced=True) for s in sentences])
    return {"tokenizer": tokenizer_path, "vocabulary": vocabulary(tokenizer), "joined": featurizer.joins_unspaced,
            **counts}


def _print_unspaced(u: dict) -> None:
    how = "sentences joined without spaces" if u["joined"] else "word by word (WordPiece is never joined)"
    print(f"tokenizer   {u['tokenizer']} ({u['vocabulary']}): {how}")
    print(f"pieces      {u['pieces']:,} ({u['units']:,} labelled) for {u['words']:,} words")
    share = 100 * u["entities_split"] / max(1, u["entities"])
    print(f"split       {u['entities_split']:,} of {u['entities']:,} entities ({share:.2f} %) have a boundary "
          f"inside a piece, in {u['sentences_with_split']:,} sentences")


def _inspect(args: argparse.Namespace) -> int:
    corpus = read_corpus(args.file, misc_to_o=args.misc_to_o, split=args.split, format=args.format)
    stats = corpus.stats()
    if args.tokenizer:
        stats["unspaced"] = _unspaced(corpus.sentences, args.tokenizer)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
        return 0
    print(f"file        {stats['path']}" + (f"  (split: {stats['split']})" if stats["split"] else ""))
    print(f"encoding    {stats['encoding']}" + ("  (BOM)" if stats["bom"] else "") + f", {stats['line_end']} line ends")
    print(f"columns     {stats['columns']} ({stats['delimiter']}-separated), tag column {stats['tag_column']}")
    converted = "converted to BIO" if stats["converted"] else "kept as BIO"
    print(f"scheme      {stats['scheme']} ({converted}; {stats['repaired_tags']} I- after O repaired)")
    if stats["segmented_at_period"]:
        print("segments    no sentence breaks: split at each '.' token")
    print(f"MISC -> O   {'yes' if stats['misc_to_o'] else 'no'}")
    print(f"-DOCSTART-  {stats['docstart_dropped']} dropped")
    print(f"sentences   {stats['sentences']:,}")
    print(f"tokens      {stats['tokens']:,}")
    print(f"entities    {stats['entities']:,}  " + ", ".join(f"{k} {v:,}" for k, v in stats["entities_by_type"].items()))
    print(f"repairs     {len(stats['warnings'])}" + ("" if not stats["warnings"] else "  (warnings above)"))
    if args.tokenizer:
        _print_unspaced(stats["unspaced"])
    return 0


def _score(args: argparse.Namespace) -> int:
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    bad = [t for t in types if not t.replace("_", "").isalnum()]
    if not types or bad:
        raise InputError(f"--types {args.types!r}: give entity type names separated by commas, e.g. PER,LOC,ORG,MISC")
    _, gold, pred = read_conll(args.file, types=types, special_to_o=args.special_to_o)
    result = score(gold, pred)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'type':<8}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>9}")
    for name, row in sorted(result["per_type"].items()):
        print(f"{name:<8}{row['precision']:>10.2f}{row['recall']:>10.2f}{row['f1']:>10.2f}{row['support']:>9}")
    print(f"{'overall':<8}{result['precision']:>10.2f}{result['recall']:>10.2f}{result['f1']:>10.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a corpus file holds and how it was read")
    p.add_argument("file")
    p.add_argument("--format", choices=["auto", "sentences", "stream"], default="auto",
                   help="sentences: blank lines end sentences; stream: no sentence breaks, split at each '.' "
                        "(auto: a stream when the file has no blank line and at least 1,000 tokens)")
    p.add_argument("--split", choices=["train", "test"], help="split of a file without sentence breaks")
    p.add_argument("--misc-to-o", action="store_true", help="map MISC entities to O")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="read each sentence unspaced with this tokenizer (a model folder or hub id), as for a "
                        "language of data.unspaced_languages, and count the entities with a boundary inside a piece")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.set_defaults(func=_inspect)
    p = sub.add_parser("score", help="phrase-level P/R/F1 of a conlleval file (token ... gold pred)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--types", default="PER,LOC,ORG,MISC",
                   help="entity types a tag may name, comma-separated (default: %(default)s); any other tag is an error")
    p.add_argument("--special-to-o", action="store_true",
                   help="read the official Meta-Cross code's X, [CLS] and [SEP] labels as O")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.set_defaults(func=_score)
    for name, module in JOBS.items():
        p = sub.add_parser(name, help=f"run {module} (see its --help)", add_help=False)
        p.set_defaults(func=None, module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.func is None:  # a job sets up its own logging (INFO between stages), as `python -m jobs.X`
        try:
            job = importlib.import_module(args.module)
        except ModuleNotFoundError as err:
            if err.name != args.module:
                raise
            print(f"metaner: `{args.command}` is not available in this version", file=sys.stderr)
            return 2
        return job.main(rest) or 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if rest:
        print(f"metaner {args.command}: unexpected arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as err:  # as a job's main (jobs.common.main_guard) shows it
        if not one_line(err, args.debug or debug_requested(())):
            traceback.print_exc(file=sys.stderr)
        elif isinstance(err, OSError):  # the readers name every OSError themselves; this is the last guard
            print(f"metaner {args.command}: {err.filename or args.file}: {err.strerror or err}", file=sys.stderr)
        else:  # CorpusError and bad options carry their own file/line message
            print(f"metaner {args.command}: {err}", file=sys.stderr)
        return exit_status(err)


if __name__ == "__main__":
    sys.exit(main())

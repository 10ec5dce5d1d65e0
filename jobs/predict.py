"""Label raw text in any language with a trained checkpoint and print the entities: the tagging job
(jobs/tag.py) on sentences given on the command line.

    python -m jobs.predict --checkpoint FOLDER --text "Angela Merkel besuchte Paris ." [--file sentences.txt]
    python -m jobs.predict --checkpoint FOLDER --lang zh --text "江泽民访问美国。"

Each distinct input (text, checkpoint, settings) is tagged once into <out>/<its hash>; asking again
prints what is there.
"""
from __future__ import annotations

import json
import sys

from jobs.textio import ShardWriter
from trainer.utils.digest import text_sha256
from trainer.utils.errors import InputError

from .common import check_record, main_guard, parse, write_record
from .tag import input_arguments, open_input, prepare, record, sentences, tag


def run(argv=None) -> int:
    def arguments(p):
        input_arguments(p)
        p.add_argument("--text", action="append", default=[], help="a sentence (repeatable)")
        p.add_argument("--file", help="a file with one sentence per line")

    job_cfg, args = parse(argv, "predict", arguments, model_from_config=False)
    lines = [t.replace("\n", " ").strip() for t in args.text if t.strip()]
    if not lines and not args.file:
        raise InputError("nothing to label: give --text SENTENCE or --file FILE with one sentence per line")
    cfg, found = prepare(job_cfg, args)
    specs = []
    if lines:
        text = "\n".join(lines) + "\n"
        path = args.out / f"text-{text_sha256(text, 16)}.txt"
        path.write_text(text, encoding="utf-8")
        specs.append(str(path))
    if args.file:
        specs.append(args.file)
    args.format = "text"
    inputs, total = open_input(specs, cfg, args)
    work = record(cfg, found, inputs, conll=False)
    out = args.out / work["hash"]
    check_record(out, work)
    write_record(out, work)
    tag(cfg, found, sentences(inputs), total, out, progress=False)
    _print(out)
    return 0


def _print(out) -> None:
    for path in ShardWriter(out).paths():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                s = json.loads(line)
                found = [f"{e['type']}: {e['text']}" for e in s["entities"]]
                sys.stdout.write(" ".join(s["words"]) + "\n  " + ("; ".join(found) or "(no entities)") + "\n")


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

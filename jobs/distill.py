"""A target-language student trained on a teacher's soft labels over unlabelled target text.

    metaner distill --teacher CHECKPOINT --lang es --unlabelled FILES... [--out DIR] [section.key=value ...]
    python -m jobs.distill --teacher outputs/replicate/ours/seed95/best --lang es --unlabelled es.train --out distill-es

The teacher tags the unlabelled text as `metaner tag --soft` does (each sentence adapted to its
English neighbours, as the teacher was evaluated; resumable, in <out>/soft), then a student learns
its probabilities on the fine-tuning path (one Ray task with the job's training resources, the
frozen bottom kept once), with the teacher's encoder, windows and learning-rate settings, the
mean squared error between the two distributions as its loss (Wu et al., ACL 2020), and selection
on the English dev set. The student, <out>/student/best, is a normal checkpoint: `tag`, `predict`
and `evaluate` take it, without adaptation unless asked (distill.adapt).

Unlabelled text is any input `metaner tag` reads (a CoNLL file's tags are ignored), the first
distill.max_sentences sentences of it. A sentence of the language's test set in it is refused
before any work, with the count, or left out with distill.drop_test_sentences (a training file
shares boilerplate lines such as "( EFE )" or "-" with its test set).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
import numpy as np

from cluster.finetune import run_finetune
from cluster.progress import watching
from cluster.storage import job_storage
from cluster.tracking import tracking_uri
from trainer.config import with_overrides
from trainer.data.corpus import Sentence, read_corpus
from trainer.utils.digest import values_sha256
from trainer.utils.errors import InputError

from .common import (RECORD, check_record, file_digest, main_guard, parse, sample, start_cluster, tracked_run,
                     write_record)
from .console import duration
from .environment import hub_problems
from .tag import input_arguments, open_input, prepare, record, sentences, tag
from .textio import FORMATS, read_soft

logger = logging.getLogger(__name__)


def arguments(p) -> None:
    input_arguments(p, checkpoint="--teacher")
    p.add_argument("--unlabelled", required=True, nargs="+", help="file(s), folder(s) or glob(s) of target text")
    p.add_argument("--format", choices=FORMATS, default="auto", help="as metaner tag --format")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text or a list of words")
    p.add_argument("--test", help="the language's test set, checked for sentences in the unlabelled text "
                                  "(default: the teacher's data.target_files.<lang>)")
    p.add_argument("--dev", help="the English dev set the student is selected on (default: the teacher's "
                                 "data.source_dev)")
    p.add_argument("--seed", type=int, help="the student's seed (default: the first of train.seeds)")


def test_sentences(cfg, lang: str, test: str | None) -> set:
    """The words of every sentence of the language's test set."""
    d = cfg.data
    if test is None:
        if lang not in d.target_files:
            raise InputError(f"--lang {lang}: the teacher's data.target_files has no {lang} test set to check the "
                             "unlabelled text against; give it with --test FILE")
        test = d.resolve(d.target_files[lang])
    return {tuple(s.words) for s in read_corpus(test).sentences}


def unlabelled(items: Iterable, tests: set, cap: int, drop: bool, name: str) -> list:
    """The first `cap` (0: all) of `items` ((Sentence, where)) that are not test sentences. One of
    the test set among them is refused with their count, or with `drop` left out; nothing left
    is refused too."""
    kept, seen, overlap = [], 0, 0
    for item in items:
        if cap and len(kept) == cap:
            break
        seen += 1
        if tuple(item[0].words) in tests:
            overlap += 1
            if not drop:
                continue
        else:
            kept.append(item)
    if overlap and not drop:
        raise InputError(f"{name}: {overlap} of its first {seen} sentences are in the test set; a student must not "
                         "see the sentences it is scored on: remove them, or set distill.drop_test_sentences=true to "
                         "leave them out")
    if overlap:
        logger.info("%s: %d of %d sentences left out, being in the test set", name, overlap, seen)
    if not kept:
        raise InputError(f"{name}: no sentence left to label ({seen} read, {overlap} in the test set); give other text")
    return kept


def student_config(cfg, seed: int):
    """The teacher's settings with the student's training on top: the fine-tuning path on soft
    labels (no max term, no masking) for distill.num_steps updates of distill.batch_size."""
    d = cfg.distill
    return with_overrides(cfg, [
        ("train.mode", "base"), ("train.lambda_max", 0.0), ("train.mask_ratio", 0.0),
        ("train.meta_lr", cfg.train.meta_lr if d.lr is None else d.lr), ("train.base_batch_size", d.batch_size),
        ("train.num_meta_steps", d.num_steps), ("train.seeds", [seed]), ("adapt.enabled", d.adapt)])


def student_record(scfg, soft_work: dict, teacher_weights: str, seed: int, dev_digest: str) -> dict:
    """What the student in <out>/student is made from: a run started again reuses it only if equal."""
    values = {f"student.{k}": v for k, v in scfg.flat().items() if not k.startswith(("cluster.", "mlflow.", "tag."))}
    values.update({"soft.inputs": soft_work["hash"], "teacher.weights": teacher_weights, "seed": seed,
                   "input.dev": dev_digest})
    values = json.loads(json.dumps(values, sort_keys=True, default=str))
    return {"hash": values_sha256(values), "values": values}


def read_teacher(folder: Path, unspaced: bool) -> tuple[list, list]:
    """(sentences, soft labels) of the soft shards in `folder`: the teacher's tags only say which
    words a sentence has; the probabilities are copied out of the memory maps once."""
    # torch, which trainer.data.features imports, only once the inputs are checked and tagged.
    from trainer.data.features import Soft

    sentences, soft = [], []
    for s in read_soft(folder):
        sentences.append(Sentence(tuple(s.words), tuple(s.tags), unspaced))
        soft.append(Soft(np.asarray(s.units, dtype=np.int32), np.array(s.probs)))
    return sentences, soft


@dataclass
class Plan:
    """A distillation, every input checked and both output folders matched to their records."""

    cfg: Any  # the teacher's settings with this job's on top
    student: Any  # the student's (student_config)
    found: Any  # jobs.inputs.AdaptationInputs of the teacher
    inputs: Any  # jobs.textio.InputSet of the unlabelled text
    items: list  # the (Sentence, where) taken from it
    dev: list
    soft: tuple[Path, dict]  # folder of the soft shards and its record
    trained: tuple[Path, dict]  # folder of the student and its record


def plan(job_cfg, args) -> Plan:
    """Everything read and checked before any work: a bad input or setting, test sentences in the
    unlabelled text, or work of other inputs in --out stops the job here."""
    cfg, found = prepare(job_cfg, args, ("cluster", "tag", "distill", "mlflow"))
    seed = args.seed if args.seed is not None else cfg.train.seeds[0]
    inputs, _ = open_input(args.unlabelled, cfg, args, args.text_field)
    d = cfg.distill
    items = unlabelled(sentences(inputs), test_sentences(cfg, args.lang, args.test), d.max_sentences,
                       d.drop_test_sentences, "--unlabelled")
    scfg = student_config(cfg, seed)
    problems = hub_problems(scfg.model.name_or_path) if cfg.distill.init == "pretrained" else []
    if problems:
        raise InputError(f"the teacher's encoder, the student's start, is not here: {problems[0]}")
    dev_file = args.dev or scfg.data.resolve(scfg.data.source_dev)
    dev = sample(read_corpus(dev_file).sentences, scfg.data.dev_sample, seed)
    work = record(cfg, found, inputs, conll=False, soft=True)
    work["values"].update({"input.max_sentences": d.max_sentences, "input.drop_test_sentences": d.drop_test_sentences})
    work["hash"] = values_sha256(work["values"])
    trained = student_record(scfg, work, work["values"]["checkpoint.weights"], seed, file_digest(dev_file))
    p = Plan(cfg, scfg, found, inputs, items, dev, (args.out / "soft", work), (args.out / "student", trained))
    for folder, rec in (p.soft, p.trained):
        check_record(folder, rec)  # soft labels of another teacher, or another student, stop the job here
    return p


def train_student(p: Plan, lang: str) -> Path:
    """The student of the soft shards, trained unless <out>/student/best holds it already."""
    folder, rec = p.trained
    best = folder / "best"
    write_record(folder, rec)
    if best.is_dir():
        logger.info("distill %s: the student is trained already, in %s", lang, best, extra={"stage": True})
        return best
    sentences, soft = read_teacher(p.soft[0], p.inputs.unspaced)
    seed = p.student.train.seeds[0]
    logger.info("distill %s: training the student on %d sentences", lang, len(sentences), extra={"stage": True})
    with tracked_run(p.student, f"student-{lang}-seed{seed}", {"seed": seed, "role": "student"}) as run:
        run.set_tags({"teacher": str(Path(p.found.checkpoint).resolve()), "lang": lang})
        with watching(run.run_id, p.cfg.distill.num_steps, "distill"):
            run_finetune(p.student, sentences, p.dev, seed, str(folder), run.run_id,
                         tracking_uri(p.student.mlflow.tracking_uri),
                         init_checkpoint=p.found.checkpoint if p.cfg.distill.init == "teacher" else None,
                         storage=job_storage(p.student, folder), teacher=soft)
        run.set_tags({"checkpoint": str(best)})
    return best


def run(argv=None) -> int:
    job_cfg, args = parse(argv, "distill", arguments, model_from_config=False)
    p = plan(job_cfg, args)
    started = time.perf_counter()
    start_cluster(p.cfg, ("tag", "train"), args.out)
    write_record(*p.soft)
    logger.info("distill %s: the teacher tags %d sentences", args.lang, len(p.items), extra={"stage": True})
    tag(p.cfg, p.found, iter(p.items), len(p.items), p.soft[0], soft=True)
    best = train_student(p, args.lang)
    # torch, which the checkpoint module imports, only once the work is done.
    from trainer.training.checkpoint import read_info

    meta = read_info(best).get("meta", {})
    logger.info("distill %s: done in %s", args.lang, duration(time.perf_counter() - started), extra={"stage": True})
    print(f"student    {best}")
    print(f"trained on {len(p.items):,} {args.lang} sentences soft-labelled by {p.found.checkpoint}")
    if "best_f1" in meta:
        print(f"English dev F1 {meta['best_f1']:.2f} (step {meta['best_step']})")
    print(f"Next: metaner evaluate --checkpoint {best}   (inputs: {p.trained[0] / RECORD})")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

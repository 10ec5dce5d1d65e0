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
before any work, with the count.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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
from .tag import input_arguments, open_input, prepare, record, tag
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


def test_overlap(cfg, lang: str, test: str | None, words) -> int:
    """How many sentences of `words` (word tuples) are sentences of the language's test set."""
    d = cfg.data
    if test is None:
        if lang not in d.target_files:
            raise InputError(f"--lang {lang}: the teacher's data.target_files has no {lang} test set to check the "
                             "unlabelled text against; give it with --test FILE")
        test = d.resolve(d.target_files[lang])
    tests = {tuple(s.words) for s in read_corpus(test).sentences}
    return sum(1 for w in words if w in tests)


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
    total: int  # sentences taken from it
    dev: list
    soft: tuple[Path, dict]  # folder of the soft shards and its record
    trained: tuple[Path, dict]  # folder of the student and its record


def plan(job_cfg, args) -> Plan:
    """Everything read and checked before any work: a bad input or setting, test sentences in the
    unlabelled text, or work of other inputs in --out stops the job here."""
    cfg, found = prepare(job_cfg, args, ("cluster", "tag", "distill", "mlflow"))
    seed = args.seed if args.seed is not None else cfg.train.seeds[0]
    inputs, total = open_input(args.unlabelled, cfg, args, args.text_field)
    total = min(total, cfg.distill.max_sentences or total)
    words = [tuple(s.words) for _, s in zip(range(total), inputs.sentences())]
    overlap = test_overlap(cfg, args.lang, args.test, words)
    if overlap:
        raise InputError(f"--unlabelled: {overlap} of its first {total} sentences are in the {args.lang} test set; "
                         "a student must not see the sentences it is scored on: remove them and run again")
    scfg = student_config(cfg, seed)
    problems = hub_problems(scfg.model.name_or_path) if cfg.distill.init == "pretrained" else []
    if problems:
        raise InputError(f"the teacher's encoder, the student's start, is not here: {problems[0]}")
    dev_file = args.dev or scfg.data.resolve(scfg.data.source_dev)
    dev = sample(read_corpus(dev_file).sentences, scfg.data.dev_sample, seed)
    work = record(cfg, found, inputs, conll=False, soft=True)
    work["values"]["input.max_sentences"] = total
    work["hash"] = values_sha256(work["values"])
    trained = student_record(scfg, work, work["values"]["checkpoint.weights"], seed, file_digest(dev_file))
    p = Plan(cfg, scfg, found, inputs, total, dev, (args.out / "soft", work), (args.out / "student", trained))
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
    logger.info("distill %s: the teacher tags %d sentences", args.lang, p.total, extra={"stage": True})
    tag(p.cfg, p.found, p.inputs, p.total, p.soft[0], soft=True)
    best = train_student(p, args.lang)
    # torch, which the checkpoint module imports, only once the work is done.
    from trainer.training.checkpoint import read_info

    meta = read_info(best).get("meta", {})
    logger.info("distill %s: done in %s", args.lang, duration(time.perf_counter() - started), extra={"stage": True})
    print(f"student    {best}")
    print(f"trained on {p.total:,} {args.lang} sentences soft-labelled by {p.found.checkpoint}")
    if "best_f1" in meta:
        print(f"English dev F1 {meta['best_f1']:.2f} (step {meta['best_step']})")
    print(f"Next: metaner evaluate --checkpoint {best}   (inputs: {p.trained[0] / RECORD})")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

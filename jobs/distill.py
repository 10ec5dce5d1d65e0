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
from pathlib import Path
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
    from trainer.data.features import Soft

    sentences, soft = [], []
    for s in read_soft(folder):
        sentences.append(Sentence(tuple(s.words), tuple(s.tags), unspaced))
        soft.append(Soft(np.asarray(s.units, dtype=np.int32), np.array(s.probs)))
    return sentences, soft


def run(argv=None) -> int:
    job_cfg, args = parse(argv, "distill", arguments, model_from_config=False)
    cfg, found = prepare(job_cfg, args, ("cluster", "tag", "distill", "mlflow"))
    seed = args.seed if args.seed is not None else cfg.train.seeds[0]
    cap = cfg.distill.max_sentences
    inputs, total = open_input(args.unlabelled, cfg, args, args.text_field)
    total = min(total, cap) if cap else total
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

    soft_out = args.out / "soft"
    work = record(cfg, found, inputs, conll=False, soft=True)
    work["values"]["input.max_sentences"] = total
    work["hash"] = values_sha256(work["values"])
    check_record(soft_out, work)  # soft labels of another teacher or input in --out stop the job here
    student_out = args.out / "student"
    srecord = student_record(scfg, work, work["values"]["checkpoint.weights"], seed, file_digest(dev_file))
    check_record(student_out, srecord)

    start_cluster(cfg, ("tag", "train"), args.out)
    write_record(soft_out, work)
    logger.info("distill %s: the teacher tags %d sentences", args.lang, total, extra={"stage": True})
    tag(cfg, found, inputs, total, soft_out, soft=True)
    sentences, soft = read_teacher(soft_out, inputs.unspaced)
    # torch, which the checkpoint module imports, only once the inputs are checked and tagged.
    from trainer.training.checkpoint import read_info


    write_record(student_out, srecord)
    best = student_out / "best"
    started = time.perf_counter()
    if best.is_dir():
        logger.info("distill %s: the student is trained already, in %s", args.lang, best, extra={"stage": True})
    else:
        logger.info("distill %s: training the student", args.lang, extra={"stage": True})
        with tracked_run(scfg, f"student-{args.lang}-seed{seed}", {"seed": seed, "role": "student"}) as run_:
            run_.set_tags({"teacher": str(Path(found.checkpoint).resolve()), "lang": args.lang})
            with watching(run_.run_id, cfg.distill.num_steps, "distill"):
                run_finetune(scfg, sentences, dev, seed, str(student_out), run_.run_id,
                             tracking_uri(scfg.mlflow.tracking_uri),
                             init_checkpoint=found.checkpoint if cfg.distill.init == "teacher" else None,
                             storage=job_storage(scfg, student_out), teacher=soft)
            run_.set_tags({"checkpoint": str(best)})
    meta = read_info(best).get("meta", {})
    logger.info("distill %s: done in %s", args.lang, duration(time.perf_counter() - started), extra={"stage": True})
    print(f"student    {best}")
    print(f"trained on {len(sentences):,} {args.lang} sentences soft-labelled by {found.checkpoint}")
    if "best_f1" in meta:
        print(f"English dev F1 {meta['best_f1']:.2f} (step {meta['best_step']})")
    print(f"Next: metaner evaluate --checkpoint {best}   (inputs: {student_out / RECORD})")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

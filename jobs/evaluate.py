"""Adapt and label every target test set in parallel with a trained checkpoint; score per language.

    python -m jobs.evaluate --checkpoint outputs/meta_train/seed95/best [section.key=value ...]

The model, retrieval and adaptation settings are the checkpoint's own (trainer.training.checkpoint.use_config);
the job's file gives the data and where the work runs, and an override may change only what does
not change the checkpoint's meaning.
"""
from __future__ import annotations

import logging
from pathlib import Path

from cluster.adapt_pool import ReusedPool, adapt_targets
from cluster.report import PAPER_TABLE3, log_evaluation, score_language
from cluster.retrieval import Supports, build_supports
from cluster.tracking import tracking_uri
from trainer.utils.errors import ConfigError, InputError

from .common import Data, load_data, main_guard, parse, start_cluster, tracked_run
from .console import shown
from .environment import hub_problems

logger = logging.getLogger(__name__)


def evaluate_one(cfg, checkpoint: str, data: Data, supports: Supports, run, out: Path,
                 paper: dict[str, float] | None = None, label: str = "", pool: ReusedPool | None = None) -> dict:
    """Predictions through the adapter pool, scores per language, a child run per language;
    `paper`: the paper's F1 of the same row, drawn beside this run's in the chart; `label` names
    the chart (row, seed, encoder); `pool`: the job's pool, kept for its next evaluation (None: a
    pool of this evaluation's own)."""
    if cfg.retrieval.encoder == "finetuned":
        # Target neighbours by the trained encoder instead of the pretrained one.
        from trainer.training.checkpoint import load_model

        model, tokenizer, _ = load_model(checkpoint)
        if pool is not None:
            pool.close()  # the embedding actors need the CPUs and GPUs that the adapters hold
        supports = build_supports(cfg, data.source, data.targets, encoder=model.encoder, tokenizer=tokenizer,
                                  source_tasks=False)
    support_sentences = {lang: supports.sentences(lang, data.source) for lang in data.targets}
    predictions = adapt_targets(checkpoint, cfg, data.targets, support_sentences, out / "units", pool=pool)
    results = {lang: score_language(lang, data.targets[lang], predictions[lang], out,
                                    misc_to_o=lang in cfg.data.misc_to_o)
               for lang in data.targets}
    for lang, counts in boundary_loss(checkpoint, cfg, data.targets).items():
        results[lang]["entities_split"] = counts["entities_split"]
    log_evaluation(run, results, checkpoint, data.test_files, out, paper, label)
    return results


def boundary_loss(checkpoint: str, cfg, targets: dict[str, list]) -> dict[str, dict[str, int]]:
    """Per target read unspaced: how many gold entities have a boundary inside a piece of the
    checkpoint's tokenizer (trainer.data.features.split_entities), logged so that the loss is seen."""
    unspaced = {lang: sentences for lang, sentences in targets.items() if any(s.unspaced for s in sentences)}
    if not unspaced:
        return {}
    # torch deferred: see evaluate_one.
    from trainer.data.features import Featurizer, split_entities
    from trainer.modules.model import load_tokenizer

    featurizer = Featurizer(load_tokenizer(checkpoint), cfg.model.max_length, cfg.model.window_context)
    out = {}
    for lang, sentences in unspaced.items():
        out[lang] = counts = split_entities(featurizer, sentences)
        logger.info("%s read unspaced: %d characters in %d labelled pieces; %d of %d gold entities have a boundary "
                    "inside a piece and cannot be labelled exactly", lang, counts["words"], counts["units"],
                    counts["entities_split"], counts["entities"])
    return out


def _checkpoint_of(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    # MLflow takes seconds to import: only a --run-id is looked up in it.
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=tracking_uri(None)).get_run(args.run_id)
    if "checkpoint" not in run.data.tags:
        raise InputError(f"MLflow run {args.run_id} has no checkpoint tag; pass --checkpoint FOLDER")
    return run.data.tags["checkpoint"]


def checkpoint_config(checkpoint: str, job_cfg, overrides):
    """The checkpoint's settings (trainer.training.checkpoint.use_config) with this job's data, where and how
    the work runs and is tracked, and the command line's `overrides` on top; its encoder checked
    to resolve, as the job's own model is for a training job."""
    # torch, which trainer.training.checkpoint imports, takes seconds: deferred, see evaluate_one.
    from trainer.training.checkpoint import use_config

    job = job_cfg.to_dict()
    keep = [(section, job[section]) for section in ("data", "cluster", "tag", "mlflow")]
    keep += [("train.seeds", job["train"]["seeds"]), ("retrieval.cache_dir", job["retrieval"]["cache_dir"]),
             ("model.prefix_cache_dir", job["model"]["prefix_cache_dir"])]
    cfg = use_config(checkpoint, keep + list(overrides))
    problems = hub_problems(cfg.model.name_or_path)
    if problems:
        raise ConfigError(problems)
    return cfg


def run(argv=None) -> int:
    def arguments(p):
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--checkpoint", help="checkpoint folder")
        group.add_argument("--run-id", help="MLflow run of a training job (its checkpoint tag)")
        p.add_argument("--seed", type=int, default=None, help="seed of the target sample (default: first seed)")

    job_cfg, args = parse(argv, "evaluate", arguments, model_from_config=False)
    checkpoint = _checkpoint_of(args)
    cfg = checkpoint_config(checkpoint, job_cfg, args.overrides)
    seed = args.seed if args.seed is not None else cfg.train.seeds[0]
    data = load_data(cfg, seed)  # a corpus that cannot be read stops the job before Ray starts
    start_cluster(cfg, ("retrieval", "adapt"))
    supports = build_supports(cfg, data.source, data.targets)
    with tracked_run(cfg, "evaluate", {"checkpoint": checkpoint}) as tracked:
        label = f"{Path(checkpoint).resolve().parent.name}, {Path(cfg.model.name_or_path).name}"
        results = evaluate_one(cfg, checkpoint, data, supports, tracked, args.out, PAPER_TABLE3["ours"], label)
    logger.info("evaluate: predictions, scores and charts in %s", shown(args.out), extra={"stage": True})
    for lang, r in results.items():
        split = f"  ({r['entities_split']} gold entities split by pieces)" if "entities_split" in r else ""
        print(f"{lang}  F1 {r['f1']:6.2f}  P {r['precision']:6.2f}  R {r['recall']:6.2f}{split}")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

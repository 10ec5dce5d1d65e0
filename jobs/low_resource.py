"""The paper's Table 6: a few labelled target-language sentences (1 %, 2 %, 5 % of each target's
training set, sampled reproducibly from the seed), base model against ours.

    python -m jobs.low_resource [--config jobs/configs/low_resource.yaml] [section.key=value ...]

Both models, trained on English as in Table 3, are fine-tuned on the same target sample for
`train.low_resource_steps` steps. The base model then labels the test set directly; ours adapts to
each test sentence on its K most similar sentences of the target sample (target-language support
instead of English), then labels it. Languages without a training file in
`data.target_train_files` are skipped with a message.
"""
from __future__ import annotations

import logging
from pathlib import Path

from cluster.adapt_pool import adapt_targets
from cluster.finetune import run_finetune
from cluster.report import score_language
from cluster.retrieval import build_supports
from cluster.storage import job_storage
from trainer.data.corpus import read_corpus

from .common import (
    check_record,
    inputs_record,
    load_data,
    main_guard,
    parse,
    sample,
    start_cluster,
    tracked_run,
    write_record,
)
from .meta_train import train_one
from .tables import markdown
from .variants import mean_std, summarize, variant_config

logger = logging.getLogger(__name__)


def _one(vcfg, name: str, checkpoint: str, lang: str, train_sample: list, test: list, seed: int, out: Path) -> float:
    tuned = run_finetune(vcfg, train_sample, None, seed, str(out), init_checkpoint=checkpoint,
                         storage=job_storage(vcfg, out),
                         num_steps=vcfg.train.low_resource_steps)
    if vcfg.adapt.enabled:
        supports = build_supports(vcfg, train_sample, {lang: test}, source_tasks=False).sentences(lang, train_sample)
    else:
        supports = [[] for _ in test]
    predictions = adapt_targets(tuned, vcfg, {lang: test}, {lang: supports}, out / "units", progress=False)
    return score_language(lang, test, predictions[lang], out)["f1"]


def _records(cfg, langs: list[str], out: Path) -> dict:
    """{(model, seed): record}; a seed folder holding work of another configuration or of other
    corpora (target training files included) stops the job here."""
    files = {f"target_train.{lang}": cfg.data.target_train_files[lang] for lang in langs}
    records = {}
    for seed in cfg.train.seeds:
        for name in ("base", "ours"):
            records[name, seed] = inputs_record(variant_config(cfg, name), seed, extra_files=files)
            check_record(out / name / f"seed{seed}", records[name, seed])
    return records


def run(argv=None) -> int:
    cfg, args = parse(argv, "low_resource")
    d = cfg.data
    langs = [lang for lang in d.targets if lang in d.target_train_files]
    records = _records(cfg, langs, args.out)
    data = load_data(cfg, cfg.train.seeds[0])  # a corpus that cannot be read stops the job before Ray starts
    for lang in set(data.targets) - set(langs):
        logger.warning("%s has no entry in data.target_train_files: skipped", lang)
    pools = {lang: read_corpus(d.resolve(d.target_train_files[lang]), misc_to_o=lang in d.misc_to_o).sentences
             for lang in langs}
    start_cluster(cfg, out=args.out)
    supports = build_supports(cfg, data.source, {"dev": data.dev})
    scores: dict = {}
    with tracked_run(cfg, "low_resource") as tracked:
        for seed in cfg.train.seeds:
            for name in ("base", "ours"):
                vcfg = variant_config(cfg, name)
                folder = args.out / name / f"seed{seed}"
                write_record(folder, records[name, seed])
                with tracked.child(f"{name}-seed{seed}") as run:
                    checkpoint = train_one(vcfg, seed, data, supports, run, folder)
                    for fraction in d.low_resource_fractions:
                        for lang in langs:
                            n = max(1, round(fraction * len(pools[lang])))
                            f1 = _one(vcfg, name, checkpoint, lang, sample(pools[lang], n, seed), data.targets[lang],
                                      seed, folder / f"{fraction:g}" / lang)
                            run.log_metrics({f"f1_{lang}_{fraction:g}": f1})
                            scores.setdefault((name, fraction), {}).setdefault(seed, {})[lang] = f1
        rows = []
        for (name, fraction), per_seed in scores.items():
            row = summarize(per_seed)
            tracked.log_metrics({f"f1_{name}_{fraction:g}_{k}_mean": v[0] for k, v in row.items()})
            rows.append([name, f"{fraction:g}", *(mean_std(row[k]) for k in langs + ["avg"])])
    text = markdown(["model", "fraction", *langs, "avg"], rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's rows as config overrides, so that every job names them the same way."""
from __future__ import annotations

import statistics
from typing import Sequence

from trainer.config import Config, with_overrides
from trainer.utils.errors import ConfigError

from .tables import markdown

_BASE = ["train.mode=base", "train.lambda_max=0", "train.mask_ratio=0"]

# Table 3 and 4 of the paper, and the rows that take the method apart. Each variant changes only
# these keys of the job's config.
VARIANTS = {
    "ours": [],
    "no_max_loss": ["train.lambda_max=0"],
    "no_masking": ["train.mask_ratio=0"],
    "no_both": ["train.lambda_max=0", "train.mask_ratio=0"],
    # Direct transfer: plain fine-tuning on English, no adaptation at test time.
    "base": _BASE + ["adapt.enabled=false"],
    # The Base Model's checkpoint adapted at test time exactly as Ours is: what adaptation alone gives.
    "base_adapt": list(_BASE),
    # Ours' checkpoint labelled directly: what meta-training alone gives.
    "ours_noadapt": ["adapt.enabled=false"],
    # The loss over every subword position, as the official code computes it.
    "ours_official": ["train.loss_positions=all"],
    # The full method with sentence similarity by mean pooling instead of the first token: for
    # encoders trained with mean pooling (e5), where the [CLS] vector was never a sentence vector.
    "ours_mean": ["retrieval.pooling=mean"],
    # Meta-training started from the Base Model's checkpoint (model.init_checkpoint) instead of
    # the pretrained encoder, with the same meta budget: what a user holding a fine-tuned English
    # tagger would do.
    "ours_from_base": [],
}

# Rows that train nothing: they evaluate their parent's checkpoint under their own settings.
REUSES = {"base_adapt": "base", "ours_noadapt": "ours"}
# Rows whose training starts from their parent's checkpoint.
STARTS_FROM = {"ours_from_base": "base"}

TABLE3 = ["base", "ours"]
TABLE4 = ["ours", "no_max_loss", "no_masking", "no_both", "base"]

PAPER_ROWS = {"ours": "Ours", "no_max_loss": "w/o max loss", "no_masking": "w/o masking",
              "no_both": "w/o max loss & masking", "base": "Base Model", "ours_mean": "Ours, mean pooling",
              "base_adapt": "Base Model + adaptation", "ours_noadapt": "Ours w/o adaptation",
              "ours_official": "Ours, official loss", "ours_from_base": "Ours from Base"}


def parent_of(name: str) -> str | None:
    return REUSES.get(name) or STARTS_FROM.get(name)


def with_parents(names: list[str]) -> list[str]:
    """`names` in order, each row's parent added before it when missing (it needs the checkpoint)."""
    out: list[str] = []
    for name in names:
        parent = parent_of(name)
        if parent is not None and parent not in out:
            out.append(parent)
        if name not in out:
            out.append(name)
    return out


def variant_config(cfg: Config, name: str) -> Config:
    """A copy of `cfg` with the variant's overrides applied (and checked)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return with_overrides(cfg, VARIANTS[name])


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, tuple[float, float, int]]:
    """(mean, std, number of seeds) of F1 per language and of the average over languages."""
    langs = list(next(iter(per_seed.values())))
    rows = {lang: [scores[lang] for scores in per_seed.values()] for lang in langs}
    rows["avg"] = [sum(scores.values()) / len(scores) for scores in per_seed.values()]
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in rows.items()}


def mean_std(value: Sequence) -> str:
    """"51.00 ± 1.41" over several seeds; "51.00 (n=1)" for one, whose spread is unknown, not 0."""
    mean, std, n = (tuple(value) + (2,))[:3]
    return f"{mean:.2f} (n=1)" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def markdown_table(results: dict[str, dict[str, tuple[float, float]]], paper: dict[str, dict[str, float]],
                   wall_s: dict[str, float] | None = None) -> str:
    """Rows per variant (mean ± std over seeds) with the paper's mBERT row beside each."""
    langs = [k for k in next(iter(results.values())) if k != "avg"]
    timed = wall_s is not None
    rows = []
    for name, row in results.items():
        cells = [mean_std(row[k]) for k in langs + ["avg"]]
        rows.append([f"{PAPER_ROWS.get(name, name)} (this run)", *cells]
                    + ([f"{wall_s.get(name, 0.0) / 60:.1f} min"] if timed else []))
        if name in paper:
            vals = [paper[name].get(k) for k in langs]
            avg = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
            rows.append([f"{PAPER_ROWS.get(name, name)} (paper, mBERT)", *("—" if v is None else f"{v:.2f}" for v in vals),
                         f"{avg:.2f}"] + ([""] if timed else []))
    return markdown(["variant", *langs, "avg"] + (["wall"] if timed else []), rows)

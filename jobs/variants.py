"""The paper's rows as config overrides, so that every job names them the same way."""
from __future__ import annotations

import statistics

from trainer.config import Config, with_overrides

# Table 3 and 4 of the paper. Each variant changes only these keys of the job's config.
VARIANTS = {
    "ours": [],
    "no_max_loss": ["train.lambda_max=0"],
    "no_masking": ["train.mask_ratio=0"],
    "no_both": ["train.lambda_max=0", "train.mask_ratio=0"],
    # Direct transfer: plain fine-tuning on English, no adaptation at test time.
    "base": ["train.mode=base", "train.lambda_max=0", "train.mask_ratio=0", "adapt.enabled=false"],
    # The full method with sentence similarity by mean pooling instead of the first token: for
    # encoders trained with mean pooling (e5), where the [CLS] vector was never a sentence vector.
    "ours_mean": ["retrieval.pooling=mean"],
}

TABLE3 = ["base", "ours"]
TABLE4 = ["ours", "no_max_loss", "no_masking", "no_both", "base"]

PAPER_ROWS = {"ours": "Ours", "no_max_loss": "w/o max loss", "no_masking": "w/o masking",
              "no_both": "w/o max loss & masking", "base": "Base Model", "ours_mean": "Ours, mean pooling"}


def variant_config(cfg: Config, name: str) -> Config:
    """A copy of `cfg` with the variant's overrides applied (and checked)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return with_overrides(cfg, VARIANTS[name])


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """(mean, std) of F1 per language and of the average over languages, across seeds."""
    langs = list(next(iter(per_seed.values())))
    rows = {lang: [scores[lang] for scores in per_seed.values()] for lang in langs}
    rows["avg"] = [sum(scores.values()) / len(scores) for scores in per_seed.values()]
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in rows.items()}


def markdown_table(results: dict[str, dict[str, tuple[float, float]]], paper: dict[str, dict[str, float]],
                   wall_s: dict[str, float] | None = None) -> str:
    """Rows per variant (mean ± std over seeds) with the paper's mBERT row beside each."""
    langs = [k for k in next(iter(results.values())) if k != "avg"]
    timed = wall_s is not None
    head = ("| variant | " + " | ".join(langs) + " | avg |" + (" wall |" if timed else "") + "\n|---|"
            + "---|" * (len(langs) + 1 + timed) + "\n")
    lines = []
    for name, row in results.items():
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" for k in langs + ["avg"]]
        if timed:
            cells.append(f"{wall_s.get(name, 0.0) / 60:.1f} min")
        lines.append(f"| {PAPER_ROWS.get(name, name)} (this run) | " + " | ".join(cells) + " |")
        if name in paper:
            ref = paper[name]
            vals = [ref.get(k) for k in langs]
            avg = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
            lines.append(f"| {PAPER_ROWS.get(name, name)} (paper, mBERT) | "
                         + " | ".join("—" if v is None else f"{v:.2f}" for v in vals) + f" | {avg:.2f} |"
                         + (" |" if timed else ""))
    return head + "\n".join(lines) + "\n"

"""Scores per language, the paper's figures beside them, and their MLflow record."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

from trainer.data.corpus import drop_misc
from trainer.data.scoring import score, write_conll

logger = logging.getLogger(__name__)

# Wu et al. (AAAI 2020), mBERT: Table 3 (F1 on each target's test set).
PAPER_TABLE3 = {
    "base": {"es": 74.59, "nl": 79.57, "de": 70.79, "fr": 50.89, "zh": 76.42},
    "ours": {"es": 76.75, "nl": 80.44, "de": 73.16, "fr": 55.30, "zh": 77.89},
}
# Table 4 (ablation), mBERT, average of 5 runs; "w/o meta-training, max loss and masking" is the
# Base Model of Table 3.
PAPER_TABLE4 = {
    "no_max_loss": {"es": 76.05, "nl": 79.50, "de": 71.84, "fr": 52.64, "zh": 76.77},
    "no_masking": {"es": 75.57, "nl": 80.38, "de": 72.76, "fr": 54.29, "zh": 77.79},
    "no_both": {"es": 75.33, "nl": 80.13, "de": 71.49, "fr": 52.79, "zh": 76.50},
}
PAPER = {**PAPER_TABLE3, **PAPER_TABLE4}


def score_language(lang: str, sentences: Sequence, predictions: Sequence[Sequence[str]], out_dir: str | os.PathLike,
                   misc_to_o: bool = False) -> dict:
    """seqeval scores of one language and its conlleval-format predictions file.

    `misc_to_o`: the target's annotation has no MISC type (its gold MISC was mapped to O when
    read), so predicted MISC is mapped to O too: a type the test set cannot contain is not scored.
    """
    if misc_to_o:
        predictions = [drop_misc(p) for p in predictions]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"predictions.{lang}.txt"
    gold = [list(s.tags) for s in sentences]
    write_conll(path, [s.words for s in sentences], gold, predictions)
    result = score(gold, predictions)
    result["predictions_file"] = str(path)
    return result


def language_metrics(result: dict) -> dict[str, float]:
    metrics = {"f1": result["f1"], "precision": result["precision"], "recall": result["recall"]}
    if "entities_split" in result:  # a target read unspaced (jobs.evaluate.boundary_loss)
        metrics["entities_split"] = result["entities_split"]
    for kind, row in result["per_type"].items():
        for key in ("f1", "precision", "recall"):
            metrics[f"{kind}_{key}"] = row[key]
    return metrics


def f1_chart(scores: dict[str, float], path: str | os.PathLike, title: str, paper: dict[str, float] | None = None) -> str:
    """Bar chart (PNG) of F1 per language, with the paper's figure of the same row beside each bar
    (none when `paper` is None: a row the paper does not report)."""
    # matplotlib only when a chart is drawn, its backend (Agg) chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    # pyplot after the backend is chosen.
    import matplotlib.pyplot as plt

    langs = list(scores)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(langs))
    shift = 0.2 if paper is not None else 0.0
    ours = ax.bar([i - shift for i in x], [scores[lang] for lang in langs], width=0.4, label="this run")
    ax.bar_label(ours, fmt="%.1f", fontsize=7)
    if paper is not None:
        theirs = ax.bar([i + shift for i in x], [paper.get(lang, 0.0) for lang in langs], width=0.4,
                        label="paper (mBERT)")
        ax.bar_label(theirs, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(x), langs)
    ax.set_ylabel("F1")
    ax.set_ylim(0, 110)  # room above the bars for the legend
    ax.set_title(title)
    ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def log_evaluation(parent, results: dict[str, dict], checkpoint: str, test_files: dict[str, str],
                   out_dir: str | os.PathLike, paper: dict[str, float] | None = None,
                   label: str = "") -> dict[str, float]:
    """One child run per language under `parent`; the average and the chart on the parent.

    `label` (e.g. "ours, seed 95, me5-small-ner") names the chart in its title and file name."""
    for lang, result in results.items():
        with parent.child(f"eval-{lang}") as child:
            child.log_params({"language": lang, "test_file": test_files.get(lang, ""), "checkpoint": checkpoint})
            child.log_metrics(language_metrics(result))
            child.log_artifact(result["predictions_file"])
    f1 = {lang: r["f1"] for lang, r in results.items()}
    summary = {f"f1_{lang}": v for lang, v in f1.items()}
    summary["f1_avg"] = sum(f1.values()) / len(f1)
    parent.log_metrics(summary)
    name = "f1_" + re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_") if label else "f1_per_language"
    chart = f1_chart(f1, Path(out_dir) / f"{name}.png", "F1 per target language" + (f": {label}" if label else ""),
                     paper)
    parent.log_artifact(chart)
    return summary

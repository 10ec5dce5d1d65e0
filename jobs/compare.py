"""How much of a difference between two rows is more than the luck of the test sample.

    python -m jobs.compare OUT [--against base] [--resamples 1000]

Reads the conlleval-format predictions that evaluation wrote for each row of a pipeline,
ablation or replicate output folder (OUT/<row>/seed<S>/eval/predictions.<lang>.txt) and prints,
per language, each row's F1 with its standard deviation over resamples of the test sentences, and
its difference from the reference row with a 95 % paired-bootstrap interval.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def predictions(out: Path) -> dict[str, dict[str, Path]]:
    """{row: {lang: predictions file}} of the first seed of each row."""
    rows = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        seeds = sorted(folder.glob("seed*/eval"))
        if seeds:
            files = {p.name.split(".")[1]: p for p in sorted(seeds[0].glob("predictions.*.txt"))}
            if files:
                rows[folder.name] = files
    return rows


def compare(out: Path, against: str, resamples: int, seed: int = 0) -> str:
    from trainer.scoring import bootstrap_f1, read_conll

    rows = predictions(out)
    if against not in rows:
        raise ValueError(f"{out} has no evaluated row {against!r}; rows found: {', '.join(rows) or 'none'}")
    lines = [f"| row | lang | F1 | std over resamples | minus {against} | 95 % interval |", "|---|---|---|---|---|---|"]
    for lang in rows[against]:
        _, gold, reference = read_conll(rows[against][lang])
        preds = {against: reference}
        for name, files in rows.items():
            if name != against and lang in files:
                _, gold_other, pred = read_conll(files[lang])
                if gold_other != gold:
                    raise ValueError(f"{files[lang]} and {rows[against][lang]} are not the same test sentences")
                preds[name] = pred
        samples = bootstrap_f1(gold, preds, resamples, seed)
        for name, f1 in samples.items():
            diff = f1 - samples[against]
            lo, hi = np.percentile(diff, [2.5, 97.5])
            point = _f1(gold, preds[name])
            ref = _f1(gold, preds[against])
            cells = [name, lang, f"{point:.2f}", f"{f1.std():.2f}"]
            cells += ["—", "—"] if name == against else [f"{point - ref:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f1(gold, pred) -> float:
    from trainer.scoring import score

    return float(score(gold, pred)["f1"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metaner compare", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder of a pipeline, ablation or replicate job")
    parser.add_argument("--against", default="base", help="reference row (default: base)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    args = parser.parse_args(argv)
    try:
        print(compare(args.out, args.against, args.resamples), end="")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

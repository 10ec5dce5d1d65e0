"""How much of a difference between two rows is more than the luck of the test sample.

    python -m jobs.compare OUT [--against base] [--resamples 1000] [--seed S]

Reads the conlleval-format predictions that evaluation wrote for each row of a pipeline,
ablation or replicate output folder (OUT/<row>/seed<S>/eval/predictions.<lang>.txt) and prints,
per language, each row's F1 with its standard deviation over resamples of the test sentences, and
its difference from the reference row with a 95 % paired-bootstrap interval.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from trainer.data.scoring import bootstrap_f1, read_conll, score
from trainer.utils.errors import InputError

from .common import DEBUG_HELP, print_or_fail
from .tables import markdown


def predictions(out: Path, seed: int | None = None) -> dict[str, dict[str, Path]]:
    """{row: {lang: predictions file}} of `seed` (default: the lowest seed) of each row."""
    if not out.is_dir():
        raise InputError(f"{out}: no such folder; give the --out folder of a pipeline, ablation or replicate job")
    rows = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        if seed is None:  # the lowest seed: seed95 before seed495, whatever the string order
            found = sorted(folder.glob("seed*/eval"), key=lambda p: _seed_number(p.parent.name))
            evaluated = found[0] if found else None
        else:
            evaluated = folder / f"seed{seed}" / "eval"
        if evaluated is not None and evaluated.is_dir():
            files = {p.name.split(".")[1]: p for p in sorted(evaluated.glob("predictions.*.txt"))}
            if files:
                rows[folder.name] = files
    return rows


def _seed_number(name: str) -> float:
    digits = name[len("seed"):]
    return int(digits) if digits.isdigit() else float("inf")


def compare(out: Path, against: str, resamples: int, seed: int = 0, run_seed: int | None = None) -> str:
    """`seed` draws the resamples; `run_seed` picks the training seed whose predictions compare."""
    rows = predictions(out, run_seed)
    if against not in rows:
        which = "" if run_seed is None else f" for seed {run_seed}"
        raise InputError(f"{out} has no evaluated row {against!r}{which}; rows found: {', '.join(rows) or 'none'}")
    table = []
    for lang in rows[against]:
        _, gold, reference = read_conll(rows[against][lang])
        preds = {against: reference}
        for name, files in rows.items():
            if name != against and lang in files:
                _, gold_other, pred = read_conll(files[lang])
                if gold_other != gold:
                    raise InputError(f"{files[lang]} and {rows[against][lang]} are not the same test sentences")
                preds[name] = pred
        samples = bootstrap_f1(gold, preds, resamples, seed)
        for name, f1 in samples.items():
            diff = f1 - samples[against]
            lo, hi = np.percentile(diff, [2.5, 97.5])
            point = _f1(gold, preds[name])
            ref = _f1(gold, preds[against])
            cells = [name, lang, f"{point:.2f}", f"{f1.std():.2f}"]
            cells += ["—", "—"] if name == against else [f"{point - ref:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"]
            table.append(cells)
    return markdown(["row", "lang", "F1", "std over resamples", f"minus {against}", "95 % interval"], table)


def _f1(gold, pred) -> float:
    return float(score(gold, pred)["f1"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metaner compare", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder of a pipeline, ablation or replicate job")
    parser.add_argument("--against", default="base", help="reference row (default: base)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed whose predictions compare (default: each row's lowest)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    return print_or_fail(lambda: compare(args.out, args.against, args.resamples, run_seed=args.seed), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())

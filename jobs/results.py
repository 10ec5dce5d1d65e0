"""The results page of a replicate (or pipeline, ablation) output folder, from what its seeds wrote.

    python -m jobs.results OUT [--chart docs/replicate_cpu/dev_curves.png] [--resamples 1000]

Prints markdown: F1 per row (mean ± std over seeds) beside the paper's Table 3 and 4 numbers,
precision and recall, the two decompositions (meta-training effect = Ours − (Base Model +
adaptation), adaptation effect = Ours − Ours without adaptation) with their spread over seeds,
English-dev F1 by step (and a chart), the wall time of every row, and for each seed the paired
bootstrap intervals against the Base Model and against Ours.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cluster.report import PAPER
from trainer.utils.errors import InputError

from .common import DEBUG_HELP, print_or_fail
from .compare import compare
from .tables import markdown
from .variants import PAPER_ROWS, REUSES

# Differences that take the method apart: (name, row, minus row).
DECOMPOSITIONS = [("meta-training effect", "ours", "base_adapt"), ("adaptation effect", "ours", "ours_noadapt"),
                  ("adaptation effect on the Base Model", "base_adapt", "base"),
                  ("starting from the Base Model", "ours_from_base", "ours")]


def read_rows(out: Path) -> dict[str, dict[int, dict]]:
    """{row: {seed: scores.json}} of every finished seed under `out`, rows in the job's order."""
    # jobs.replicate imports the whole pipeline (Ray, FAISS: seconds): only its row names are read.
    from .replicate import ROWS

    if not out.is_dir():
        raise InputError(f"{out}: no such folder; give the --out folder of a replicate, pipeline or ablation job")
    found = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        seeds = {}
        for path in sorted(folder.glob("seed*/scores.json")):
            digits = path.parent.name[len("seed"):]
            if digits.isdigit():
                seeds[int(digits)] = json.loads(path.read_text(encoding="utf-8"))
        if seeds:
            found[folder.name] = seeds
    order = {name: i for i, name in enumerate(ROWS)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


def _stats(values: list[float], signed: bool = False) -> str:
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.2f}"
    return f"{mean} ± {statistics.stdev(values):.2f}" if len(values) > 1 else mean


def _langs(rows: dict) -> list[str]:
    first = next(iter(next(iter(rows.values())).values()))
    return list(first["f1"])


def _per_seed(seeds: dict[int, dict], metric: str, lang: str) -> list[float]:
    if lang == "avg":
        return [statistics.fmean(s[metric].values()) for s in seeds.values()]
    return [s[metric][lang] for s in seeds.values()]


def f1_table(rows: dict, paper: dict) -> str:
    langs = _langs(rows)
    out = []
    for name, seeds in rows.items():
        out.append([PAPER_ROWS.get(name, name), len(seeds), *(_stats(_per_seed(seeds, "f1", lang)) for lang in langs + ["avg"])])
        if name in paper:
            ref = [paper[name][lang] for lang in langs]
            out.append(["*paper (mBERT)*", 5, *(f"*{v:.2f}*" for v in ref), f"*{statistics.fmean(ref):.2f}*"])
    return markdown(["row", "seeds", *langs, "avg"], out)


def precision_recall_table(rows: dict) -> str:
    langs = _langs(rows)
    out = []
    for name, seeds in rows.items():
        if not all("precision" in s for s in seeds.values()):
            continue
        out.append([PAPER_ROWS.get(name, name), *(f"{statistics.fmean(_per_seed(seeds, 'precision', lang)):.1f} / "
                                                   f"{statistics.fmean(_per_seed(seeds, 'recall', lang)):.1f}"
                                                   for lang in langs + ["avg"])])
    return markdown(["row", *(f"{lang} P / R" for lang in langs), "avg P / R"], out)


def decomposition_table(rows: dict) -> str:
    """Each difference per seed first (paired by seed), then its mean ± std over seeds."""
    langs = _langs(rows)
    out = []
    for title, a, b in DECOMPOSITIONS:
        if a not in rows or b not in rows:
            continue
        seeds = sorted(set(rows[a]) & set(rows[b]))
        cells = []
        for lang in langs + ["avg"]:
            diffs = [_per_seed({s: rows[a][s]}, "f1", lang)[0] - _per_seed({s: rows[b][s]}, "f1", lang)[0]
                     for s in seeds]
            cells.append(_stats(diffs, signed=True) if diffs else "—")
        out.append([title, f"{PAPER_ROWS.get(a, a)} − {PAPER_ROWS.get(b, b)}", *cells])
    return markdown(["effect", "=", *langs, "avg"], out)


def curves(rows: dict) -> dict[str, dict[int, list[float]]]:
    """{row: {step: [dev F1 per seed]}} of the rows that trained (reused rows share their parent's)."""
    out = {}
    for name, seeds in rows.items():
        points: dict[int, list[float]] = {}
        for scores in seeds.values():
            for step, f1 in scores.get("dev_curve", []):
                points.setdefault(int(step), []).append(float(f1))
        if points and name not in REUSES:
            out[name] = dict(sorted(points.items()))
    return out


def curve_table(rows: dict) -> str:
    by_row = curves(rows)
    if not by_row:
        return ""
    steps = sorted({step for points in by_row.values() for step in points})
    out = [[PAPER_ROWS.get(name, name), *(f"{statistics.fmean(points[s]):.1f}" if s in points else "—" for s in steps)]
           for name, points in by_row.items()]
    return markdown(["row", *map(str, steps)], out)


def curve_chart(rows: dict, path: Path) -> Path:
    # matplotlib only when a chart is drawn, its backend (Agg) chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    # pyplot after the backend is chosen.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves(rows).items():
        steps = list(points)
        ax.plot(steps, [statistics.fmean(v) for v in points.values()], marker="o", label=PAPER_ROWS.get(name, name))
    ax.set_xlabel("step (meta-steps of 32 tasks; Base Model: updates of 32 sentences)")
    ax.set_ylabel("English dev F1 (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wall_table(rows: dict) -> str:
    out = [[PAPER_ROWS.get(name, name), ", ".join(f"{seed}: {s['wall_s'] / 60:.1f}" for seed, s in seeds.items()),
            f"{sum(s['wall_s'] for s in seeds.values()) / 60:.1f}"] for name, seeds in rows.items()]
    return markdown(["row", "wall per seed (min)", "total (min)"], out)


def page(out: Path, chart: Path | None = None, resamples: int = 1000) -> str:
    rows = read_rows(out)
    if not rows:
        raise InputError(f"{out} holds no finished seed (no <row>/seed<S>/scores.json); run the job first")
    parts = ["### F1 (mean ± std over seeds)\n", f1_table(rows, PAPER),
             "\n### Precision / recall (mean over seeds)\n", precision_recall_table(rows),
             "\n### Decompositions (paired by seed, mean ± std over seeds)\n", decomposition_table(rows),
             "\n### English dev F1 by step (mean over seeds)\n", curve_table(rows)]
    if chart is not None:
        parts.append(f"\n![English dev F1 by step]({curve_chart(rows, chart).name})\n")
    parts += ["\n### Wall time\n", wall_table(rows)]
    seeds = sorted({seed for s in rows.values() for seed in s})
    for against in ("base", "ours"):
        if against not in rows:
            continue
        for seed in seeds:
            parts += [f"\n### Seed {seed}: against {PAPER_ROWS[against]} (paired bootstrap, {resamples} resamples)\n",
                      compare(out, against, resamples, run_seed=seed)]
    return "".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metaner results", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder of a replicate, pipeline or ablation job")
    parser.add_argument("--chart", type=Path, default=None, help="write the English-dev curves here (PNG)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    return print_or_fail(lambda: page(args.out, args.chart, args.resamples), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())

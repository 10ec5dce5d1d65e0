"""The whole pipeline on one laptop with no download: synthetic corpora in six languages, a tiny
BERT built on the fly, a local Ray cluster, 2 DeepSpeed workers; prints a Table-3-style result.

    metaner demo [--data ../shared/data] [--out outputs/demo] [section.key=value ...]

Results go to <out>/synthetic, or with --data to <out>/data-<hash of the data root>.
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.demo --out /abs/out mlflow.tracking_uri=sqlite:////abs/mlflow.db
"""
from __future__ import annotations

import logging
from pathlib import Path

from cluster.tracking import tracking_uri
from jobs.synthetic import make_sentences, write_corpus
from jobs.tiny import build_tiny_bert
from trainer.config import DataConfig, with_overrides
from trainer.data.corpus import read_corpus
from trainer.utils.digest import text_sha256
from trainer.utils.errors import InputError

from .common import main_guard, parse
from .console import shown
from .pipeline import run_variants

logger = logging.getLogger(__name__)

LANGS = ("es", "nl", "de", "fr", "zh")
SIZES = {"train": 240, "valid": 40, "test": 40}


def synthetic_data(root: Path) -> dict[str, str]:
    """Write the synthetic corpora under `root` (same layout as the paper's files)."""
    write_corpus(root / "en/train.txt", make_sentences("en", SIZES["train"], seed=0))
    write_corpus(root / "en/valid.txt", make_sentences("en", SIZES["valid"], seed=1))
    for lang in LANGS:
        write_corpus(root / f"{lang}/test.txt", make_sentences(lang, SIZES["test"], seed=2))
    return {lang: f"{lang}/test.txt" for lang in LANGS}


def tiny_model(folder: Path, cfg) -> str:
    """A 2-layer BERT whose vocabulary is trained on the demo's own corpora."""
    if (folder / "config.json").is_file():
        return str(folder)
    d = cfg.data
    files = [d.resolve(d.source_train)] + [d.resolve(d.target_files[lang]) for lang in d.targets]
    texts = [s.words for f in files for s in read_corpus(f).sentences]
    return build_tiny_bert(folder, texts, num_layers=2, hidden=64, vocab_size=3000, seed=0,
                           max_length=cfg.model.max_length)


def data_folder(out: Path, root: Path | None) -> Path:
    """<out>/synthetic, or <out>/data-<hash of the data root>: one folder per data source, each with
    its own model (whose vocabulary is trained on that data), so that `--data` after a synthetic
    run builds and prints the real-data table instead of finding the synthetic rows finished."""
    if root is None:
        return out.resolve() / "synthetic"
    return out.resolve() / f"data-{text_sha256(str(root.resolve()), 8)}"


def run(argv=None) -> int:
    def arguments(p):
        p.add_argument("--data", default=None, help="a real data root (e.g. ../shared/data) instead of synthetic corpora")

    cfg, args = parse(argv, "demo", arguments, model_from_config=False)
    root = Path(args.data).resolve() if args.data else None
    if root and not root.is_dir():
        raise InputError(f"--data {args.data}: no such folder; give the data root (e.g. ../shared/data)")
    out = data_folder(args.out, root)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("demo: outputs in %s", shown(out), extra={"stage": True})
    if root:  # the real corpora at their usual places under that root, a sample of each test set
        real = DataConfig()
        cfg = with_overrides(cfg, [f"data.root={root}", f"data.source_train={real.source_train}",
                                   f"data.source_dev={real.source_dev}", "data.target_sample=60"]
                             + [f"data.target_files.{lang}={path}" for lang, path in real.target_files.items()])
    else:
        files = synthetic_data(out / "data")
        cfg = with_overrides(cfg, [f"data.root={out / 'data'}"]
                             + [f"data.target_files.{lang}={path}" for lang, path in files.items()])
    cfg = with_overrides(cfg, [f"model.name_or_path={tiny_model(out / 'model', cfg)}",
                               f"retrieval.cache_dir={out / 'cache'}", f"model.prefix_cache_dir={out / 'prefix'}"])
    run_variants(cfg, ["base", "ours"], out)
    print(_where(cfg, out))
    return 0


def _where(cfg, out: Path) -> str:
    """Where the demo's results went, and what to run next."""
    seed = out / "ours" / f"seed{cfg.train.seeds[0]}"
    checkpoint = seed / "best" if (seed / "best").is_dir() else seed / "final"
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite") else uri
    return "\n".join([
        "", f"Results table:   {shown(out / 'results.md')}",
        f"Predictions:     {shown(seed / 'eval')}/predictions.<lang>.txt (and of base/, conlleval format)",
        f"Charts:          {shown(seed / 'eval')}/*.png",
        f"MLflow:          {uri} (experiment {cfg.mlflow.experiment})",
        "Next:", f"  metaner results {shown(out)}          # the tables, decompositions and intervals",
        f"  {ui}", f"  metaner tag --checkpoint {shown(checkpoint)} --input PATH   # tag text with this run's model"])


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())

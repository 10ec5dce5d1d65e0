"""What every job shares: arguments, data loading, retrieval on Ray actors, MLflow runs."""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"


def parse(argv: Optional[Sequence[str]], job: str, add_arguments: Callable | None = None):
    """(cfg, args) from `--config FILE` (default jobs/configs/<job>.yaml) and `section.key=value`s."""
    from trainer.config import load_config

    parser = argparse.ArgumentParser(prog=f"metaner {job.replace('_', '-')}",
                                     description=f"python -m jobs.{job} [--config FILE] [section.key=value ...]")
    parser.add_argument("--config", default=str(CONFIGS / f"{job}.yaml"), help="job YAML (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: train.output_dir/<job>)")
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.meta_batch_size=16")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not os.path.isabs(cfg.model.name_or_path) and os.path.isdir(cfg.model.name_or_path):
        # Ray Train workers run in a directory of their own: a relative folder would not be found.
        cfg.model.name_or_path = os.path.abspath(cfg.model.name_or_path)
    args.out = Path(args.out or Path(cfg.train.output_dir) / job)
    from cluster.tracking import check_reachable, tracking_uri
    from trainer.config import ConfigError, tracking_uri_problems
    from trainer.paths import make_output_dir

    if cfg.mlflow.tracking_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        # load_config checked mlflow.tracking_uri; the environment's URI is checked here.
        problems = tracking_uri_problems(os.environ["MLFLOW_TRACKING_URI"])
        if problems:
            raise ConfigError([f"MLFLOW_TRACKING_URI: {p}" for p in problems])
    check_reachable(tracking_uri(cfg.mlflow.tracking_uri))  # before any work, naming the URI
    make_output_dir(args.out, "--out")
    return cfg, args


def main_guard(run: Callable[[Optional[Sequence[str]]], int]) -> Callable:
    """Wrap a job's main: logging set up, a bad setting or input ends in one clear line, exit 2."""
    def main(argv: Optional[Sequence[str]] = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "urllib3", "alembic", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            return run(argv) or 0
        except (ValueError, OSError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return main


# ------------------------------------------------------------------------------------- data


def sample(sentences: list, n: int, seed: int) -> list:
    """`n` sentences drawn reproducibly from `seed`, in their original order (all when n is 0)."""
    if n <= 0 or n >= len(sentences):
        return list(sentences)
    keep = sorted(random.Random(seed).sample(range(len(sentences)), n))
    return [sentences[i] for i in keep]


@dataclass
class Data:
    source: list
    dev: list
    targets: dict  # language -> sentences
    test_files: dict  # language -> path as configured


def load_data(cfg, seed: int, targets: Sequence[str] | None = None) -> Data:
    """English train and (sampled) dev, and each target's test set, MISC->O where configured."""
    from trainer.corpus import read_corpus

    d = cfg.data
    source = read_corpus(d.resolve(d.source_train)).sentences
    dev = sample(read_corpus(d.resolve(d.source_dev)).sentences, d.dev_sample, seed)
    langs = list(targets if targets is not None else d.targets)
    tests, files = {}, {}
    for lang in langs:
        if lang not in d.target_files:
            raise ValueError(f"data.target_files has no entry for {lang!r}; add data.target_files.{lang}=PATH")
        files[lang] = d.resolve(d.target_files[lang])
        corpus = read_corpus(files[lang], misc_to_o=lang in d.misc_to_o)
        if not corpus.sentences:
            raise ValueError(f"{files[lang]}: the {lang} test set is empty")
        tests[lang] = sample(corpus.sentences, d.target_sample, seed)
    logger.info("source %d sentences, dev %d, targets %s", len(source), len(dev),
                {k: len(v) for k, v in tests.items()})
    return Data(source, dev, tests, files)


# ------------------------------------------------------------------------------- retrieval


@dataclass
class Supports:
    source: object  # np.ndarray [n_source, K]: the pseudo task of each source sentence
    queries: dict  # name -> np.ndarray [n, K] of source ids

    def sentences(self, name: str, source: list) -> list[list]:
        return [[source[j] for j in row] for row in self.queries[name]]


def build_supports(cfg, source: list, queries: dict[str, list], encoder=None, tokenizer=None,
                   source_tasks: bool = True) -> Supports:
    """Pseudo tasks of the source (unless `source_tasks` is false) and support ids of every query
    set, on embedding and index actors (cached on disk: a second run encodes nothing)."""
    from cluster.retrieval import ShardedEmbedder, ShardedIndexSpec
    from retrieval.cache import RetrievalCache
    from retrieval.tasks import build_pseudo_tasks, retrieve_support

    r = cfg.retrieval
    cache = RetrievalCache(r.cache_dir)
    index = ShardedIndexSpec.from_config(cfg)
    with ShardedEmbedder.from_config(cfg, encoder, tokenizer) as embedder:
        support = build_pseudo_tasks(source, embedder, k=r.k, cache=cache, index=index) if source_tasks else None
        out = {name: retrieve_support(q, source, embedder, k=r.k, drop_top1=r.drop_top1_for_targets,
                                      cache=cache, index=index) for name, q in queries.items()}
    return Supports(support, out)


# ---------------------------------------------------------------------------------- MLflow


@contextmanager
def tracked_run(cfg, run_name: str, tags: dict | None = None) -> Iterator:
    """A top-level MLflow run with every config value as a parameter; FAILED if the block raises."""
    from cluster.tracking import finishing, make_logger

    run = make_logger(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_name)
    with finishing(run):
        run.log_params(cfg.flat())
        if tags:
            run.set_tags(tags)
        yield run

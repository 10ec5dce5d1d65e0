"""What every job shares: arguments, data loading, retrieval on Ray actors, MLflow runs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from cluster.runtime import PHASES, check_resources, cuda_problems, init_ray
from cluster.storage import check_shared, job_storage
from cluster.tracking import check_reachable, finishing, make_logger, tracking_uri
from trainer.config import affects, with_overrides
from trainer.data.corpus import os_error, read_corpus
from trainer.utils.digest import file_sha256, text_sha256, values_sha256
from trainer.utils.errors import ConfigError, CorpusError, InputError, MetanerError
from trainer.utils.paths import make_output_dir, split_selector, write_atomic

from .console import LOG_NAME, close_file, debug_requested, log_to_file, setup, verbose_requested
from .environment import hub_problems, load_job_config, tracking_store_problems

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
# Errors whose message is all a user needs (what is wrong, and what to do): a command ends in one
# `error:` line. A file error names its file. Anything else (a bug, CUDA out of memory, a worker
# that died) keeps its traceback: the line that raised it is what tells what went wrong.
USER_ERRORS = (MetanerError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
DEBUG_HELP = "show the traceback of every error, a bad setting or input's too (also METANER_DEBUG=1)"


def parse(argv: Optional[Sequence[str]], job: str, add_arguments: Callable | None = None,
          model_from_config: bool = True):
    """(cfg, args) from `--config FILE` (default jobs/configs/<job>.yaml) and `section.key=value`s,
    everything checked before --out is created: with `model_from_config` (the job uses the model
    the config names, not one it builds or finds in a checkpoint), that a hub id resolves."""
    parser = argparse.ArgumentParser(prog=f"metaner {job.replace('_', '-')}",
                                     description=f"python -m jobs.{job} [--config FILE] [section.key=value ...]")
    parser.add_argument("--config", default=str(CONFIGS / f"{job}.yaml"), help="job YAML (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: train.output_dir/<job>)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the workers' output and every INFO record on the console, not only in "
                             "<out>/logs/job.log (also METANER_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.meta_batch_size=16")
    args = parser.parse_args(argv)
    cfg = load_job_config(args.config, args.overrides)
    if not os.path.isabs(cfg.model.name_or_path) and os.path.isdir(cfg.model.name_or_path):
        # Ray Train workers run in a directory of their own: a relative folder would not be found.
        cfg = with_overrides(cfg, [("model.name_or_path", os.path.abspath(cfg.model.name_or_path))])
    args.out = Path(args.out or Path(cfg.train.output_dir) / job)

    if cfg.mlflow.tracking_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        # load_job_config checked mlflow.tracking_uri; the environment's URI is checked here.
        problems = tracking_store_problems(os.environ["MLFLOW_TRACKING_URI"])
        if problems:
            raise ConfigError([f"MLFLOW_TRACKING_URI: {p}" for p in problems])
    check_reachable(tracking_uri(cfg.mlflow.tracking_uri))  # before any work, naming the URI
    problems = hub_problems(cfg.model.name_or_path) if model_from_config else []
    if problems:
        raise ConfigError(problems)
    make_output_dir(args.out, "--out")
    log_to_file(args.out, job)
    return cfg, args


def exit_status(err: BaseException) -> int:
    """2 for an error of USER_ERRORS (a bad setting or input), 1 for anything else."""
    return 2 if isinstance(err, USER_ERRORS) else 1


def one_line(err: BaseException, debug: bool) -> bool:
    """Whether `err` is shown as one line without its traceback: one of USER_ERRORS, unless
    --debug or METANER_DEBUG asks for every traceback."""
    return isinstance(err, USER_ERRORS) and not debug


def main_guard(run: Callable[[Optional[Sequence[str]]], int]) -> Callable:
    """Wrap a job's main: the console and log file set up (jobs.console); a bad setting or input
    ends in one `error:` line, exit 2, anything else in its traceback, exit 1 (see USER_ERRORS;
    --debug or METANER_DEBUG=1: every error with its traceback)."""
    def main(argv: Optional[Sequence[str]] = None) -> int:
        setup(verbose_requested(argv))
        try:
            return run(argv) or 0
        except Exception as err:
            if one_line(err, debug_requested(argv)):
                logger.info("the job stopped", exc_info=True)  # the traceback in the log file only
                print(f"error: {err}", file=sys.stderr)
            else:
                logger.exception("the job failed")  # on the console and in the log file
            return exit_status(err)
        finally:
            close_file()
    return main


def print_or_fail(make: Callable[[], str], debug: bool = False) -> int:
    """Print what `make` returns (the read-only commands: results, compare); an error ends as a
    job's does (main_guard), without a log file: one `error:` line and exit status 2 for a bad
    input or path, the traceback otherwise or with `debug` (--debug, METANER_DEBUG=1)."""
    try:
        print(make(), end="")
    except Exception as err:
        if one_line(err, debug or debug_requested(())):
            print(f"error: {err}", file=sys.stderr)
        else:
            traceback.print_exc(file=sys.stderr)
        return exit_status(err)
    return 0


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
    """English train and (sampled) dev, and each target's test set, MISC->O and unspaced where
    configured."""
    d = cfg.data
    source = read_corpus(d.resolve(d.source_train)).sentences
    dev = sample(read_corpus(d.resolve(d.source_dev)).sentences, d.dev_sample, seed)
    langs = list(targets if targets is not None else d.targets)
    tests, files = {}, {}
    for lang in langs:
        if lang not in d.target_files:
            raise ConfigError(f"data.target_files has no entry for {lang!r}; add data.target_files.{lang}=PATH")
        files[lang] = d.resolve(d.target_files[lang])
        corpus = read_corpus(files[lang], misc_to_o=lang in d.misc_to_o)
        if not corpus.sentences:
            raise CorpusError(files[lang], None, f"the {lang} test set is empty",
                              f"Point data.target_files.{lang} at a corpus with sentences")
        tests[lang] = sample(corpus.sentences, d.target_sample, seed)
        if lang in d.unspaced_languages:
            tests[lang] = [replace(s, unspaced=True) for s in tests[lang]]
    logger.info("data: %d English train sentences, %d dev; test %s", len(source), len(dev),
                ", ".join(f"{k} {len(v)}" for k, v in tests.items()) or "none", extra={"stage": True})
    return Data(source, dev, tests, files)


def start_cluster(cfg, phases: Sequence[str] | None = None, out: Path | None = None) -> None:
    """Start (or join) Ray, then refuse actors the cluster cannot place together (`phases` as
    cluster.runtime.check_resources takes them; default all) and, on several nodes, folders that
    a process of another node writes or reads but does not see (the job's storage for `out`)."""
    # GPUs asked of a torch that cannot use them: refused before Ray starts, not after.
    local = cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS")
    problems = cuda_problems(cfg, tuple(phases) if phases is not None else PHASES, local)
    if problems:
        raise ConfigError("\n".join(problems))
    init_ray(cfg.cluster.address)
    if phases is None:
        check_resources(cfg)
    else:
        check_resources(cfg, tuple(phases))
    if out is not None:
        check_shared(cfg, job_storage(cfg, out))


# ---------------------------------------------------------------------------------- MLflow


@contextmanager
def tracked_run(cfg, run_name: str, tags: dict | None = None) -> Iterator:
    """A top-level MLflow run with every config value as a parameter; FAILED if the block raises."""
    run = make_logger(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_name)
    with finishing(run):
        run.log_params(cfg.flat())
        if tags:
            run.set_tags(tags)
        yield run


# --------------------------------------------------------------------- reuse of finished work
#
# A seed's folder holds `inputs.json`: the configuration and a digest of every input that made
# its work (training checkpoints, evaluation, scores.json). A later job reuses that work only when
# its own record is the same; otherwise it stops before starting anything, naming the first
# difference, instead of resuming or reprinting results that other inputs made.

RECORD = "inputs.json"
def file_digest(path: str) -> str:
    """sha256 of a file's content (16 hex digits); CorpusError naming a file that cannot be read."""
    try:
        if not os.path.isfile(path):
            os.stat(path)  # a missing file raises the OSError that names it
            raise CorpusError(path, None, "is not a regular file", "Give a regular file")
        return file_sha256(path)[:16]
    except OSError as err:
        raise os_error(path, err) from None


def _model_digest(name_or_path: str) -> str:
    """A hub id as it is; a local folder by the content of its files."""
    if not os.path.isdir(name_or_path):
        return name_or_path

    names = sorted(n for n in os.listdir(name_or_path)
                   if not n.startswith(".") and os.path.isfile(os.path.join(name_or_path, n)))
    listing = [(n, file_digest(os.path.join(name_or_path, n))) for n in names]
    return text_sha256(repr(listing), 16)


def inputs_record(cfg, seed: int, targets: Sequence[str] | None = None, parent: dict | None = None,
                  extra_files: dict[str, str] | None = None) -> dict:
    """{"hash", "values"}: what a seed's results depend on, as dotted keys (corpus files and the
    model folder by content digest); `targets` default data.targets. `parent`: the record of the
    work whose checkpoint this seed starts from or evaluates (the checkpoint may not exist yet);
    without it a model.init_checkpoint folder counts by its content. `extra_files`: more corpus
    files the work reads, {name: path under data.root}. Raises CorpusError naming a corpus file
    that cannot be read."""
    d = cfg.data
    # Settings that change what a seed computes (trainer.config: results=True); corpus and model
    # paths are counted by their content below, so that moving the data reuses the work.
    values = {k: v for k, v in cfg.flat().items() if affects(k, "results")}
    files = {"source_train": d.source_train, "source_dev": d.source_dev,
             **{f"target.{lang}": d.target_files[lang] for lang in (d.targets if targets is None else targets)},
             **(extra_files or {})}
    for name, relative in files.items():
        path, split = split_selector(d.resolve(relative))
        values[f"input.{name}"] = file_digest(path) + (f"#{split}" if split else "")
    values["input.model"] = _model_digest(cfg.model.name_or_path)
    if parent is not None:
        values["input.parent"] = parent["hash"]
    elif cfg.model.init_checkpoint:
        values["input.init_checkpoint"] = _model_digest(cfg.model.init_checkpoint)
    # The dev and target samples are drawn with the job's first seed, shared by every row.
    values["seed"], values["data_seed"] = seed, cfg.train.seeds[0]
    values = json.loads(json.dumps(values, sort_keys=True))
    return {"hash": values_sha256(values), "values": values}


def check_record(folder: Path, record: dict) -> None:
    """Refuse, naming the first difference, a folder whose work other inputs made (read-only)."""
    path = folder / RECORD
    redo = f"use another --out, or delete {folder} to run it again"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            values = dict(old["values"])
        except (ValueError, KeyError, TypeError, OSError):
            raise InputError(f"{path} is damaged, so the work in {folder} cannot be matched to its inputs; "
                             f"{redo}") from None
        if old.get("hash") == record["hash"]:
            return
        new = record["values"]
        changed = [k for k in sorted(set(values) | set(new)) if values.get(k) != new.get(k)]
        if changed:
            key = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise InputError(f"{folder} holds work made with other inputs: {key} was {values.get(key)!r}, now "
                             f"{new.get(key)!r}{more}; {redo}")
        return

    # The job's log file is not work: a job writes it before this check.
    if folder.is_dir() and any(p.name != LOG_NAME.parts[0] for p in folder.iterdir()):
        raise InputError(f"{folder} holds work without a record of the inputs that made it ({RECORD}, written "
                         f"since this check exists); {redo}")


def write_record(folder: Path, record: dict) -> None:
    """Mark `folder` as holding the work of `record`'s inputs (atomically)."""
    write_atomic(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))

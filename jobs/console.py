"""What a job shows on the console, and the log file that keeps everything else.

By default the console gets the job's stage lines (records logged with `extra={"stage": True}`),
its progress bars, its results, warnings of this project's own modules and errors from anywhere,
each message once. Everything (the driver's INFO logging, Ray's and MLflow's own records, and the
output of every Ray worker, forwarded by cluster.runtime.init_ray) goes to <out>/logs/job.log.
`--verbose` or METANER_VERBOSE=1 shows it all on the console too, as it is written to the file.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

# Top-level packages of this project: their warnings concern the user's run; other libraries'
# warnings (Ray's token notice, DeepSpeed's, MLflow's) go to the log file only.
OWN = ("jobs", "cluster", "trainer", "retrieval", "benchmarks")
LOG_NAME = Path("logs") / "job.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose_requested(argv: Optional[Sequence[str]]) -> bool:
    """--verbose among the arguments, or METANER_VERBOSE set to 1/true/yes."""
    args = sys.argv[1:] if argv is None else argv
    return "--verbose" in args or os.environ.get("METANER_VERBOSE", "").lower() in ("1", "true", "yes")


def debug_requested(argv: Optional[Sequence[str]]) -> bool:
    """--debug among the arguments, or METANER_DEBUG set to 1/true/yes: every error shown with its
    traceback (jobs.common.main_guard). Read from argv itself: a bad setting stops a job inside
    its parsing, before the parsed arguments exist."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("METANER_DEBUG", "").lower() in ("1", "true", "yes")


class _Console(logging.Filter):
    """Stage lines, own warnings and every error; a message already shown is not shown again."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "header", False):  # the console handler writes it itself
            return False
        if not self.verbose:
            own = record.name.split(".", 1)[0] in OWN
            wanted = (getattr(record, "stage", False) or record.levelno >= logging.ERROR
                      or (record.levelno >= logging.WARNING and own))
            if not wanted:
                return False
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, getattr(record, "dedup_key", None) or record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _ConsoleFormat(logging.Formatter):
    """Stage lines and worker output as they are; warnings and errors with their level; in
    verbose mode every other record as the log file has it."""

    def __init__(self, verbose: bool):
        super().__init__(FILE_FORMAT)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "stage", False) or getattr(record, "worker", False):
            return record.getMessage()
        if self.verbose:
            return super().format(record)
        text = f"{record.levelname}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _BarAwareHandler(logging.StreamHandler):
    """A line written while progress bars are drawn clears them first and redraws them after.
    `header` (where the log file is) goes before the first stage line: a job that stops on a
    bad setting before any stage still ends in its one `error:` line."""

    header: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=self.stream):
            if self.header and getattr(record, "stage", False):
                self.stream.write(self.header + self.terminator)
                self.header = None
            super().emit(record)


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_metaner", False)


def setup(verbose: bool) -> None:
    """The root logger at INFO with the console handler (replacing one set up before in this
    process); what other libraries would print themselves is sent through logging instead."""
    if not verbose:
        # transformers' and huggingface_hub's bars (writing shards, loading weights) say nothing
        # a user needs; set before either is imported, and inherited by a local cluster's workers.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    console = _BarAwareHandler(sys.stderr)
    console.addFilter(_Console(verbose))
    console.setFormatter(_ConsoleFormat(verbose))
    console._metaner = True
    root.addHandler(console)
    for noisy in ("httpx", "urllib3", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_to_file(out: Path, job: str) -> Path:
    """Append every record of this process (the workers' output included) to <out>/logs/job.log,
    named on the console before the first stage line."""
    path = Path(out) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    close_file()
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler._metaner = True
    root.addHandler(handler)
    # Every job writes to MLflow, whose import gives its loggers a stderr handler of their own
    # (its "Creating initial MLflow database tables" would reach the console): imported here,
    # and its records sent through this process's handlers. Workers keep MLflow's own set-up.
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic", "sqlalchemy.engine", "huey"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    header = f"metaner {job.replace('_', '-')}: log in {shown(path)} (--verbose shows it here)"
    logging.getLogger(__name__).info("%s", header, extra={"header": True})
    for console in [h for h in root.handlers if isinstance(h, _BarAwareHandler)]:
        console.header = header
    return path


def close_file() -> None:
    """Stop writing to the job's log file (a job run in-process ends; another may start)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h) and isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    for console in [h for h in root.handlers if isinstance(h, _BarAwareHandler)]:
        console.header = None  # it names the file just closed


def shown(path: Path | str) -> str:
    """`path` relative to the working directory where it lies below it, as a user would type it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def duration(seconds: float) -> str:
    """Wall time as a stage line gives it: seconds up to 90, then minutes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"

"""A progress bar on the driver for work that runs in Ray workers (meta-training, fine-tuning).

The metrics a worker logs for an MLflow run (cluster.tracking.MlflowLogger: rank 0's meta-loss,
tasks/s and English-dev F1 at every step) are also sent to a small Ray actor named after that
run, the board, which keeps the latest of each; the driver reads it about once a second from a
thread while it waits for the workers, and draws one bar. A Ray actor rather than a file: the
workers may run on nodes that share no disk with the driver, and Ray Train V2's own reports go to
its controller (and only at checkpoints), not to the driver.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NAMESPACE = "metaner-progress"
# Shown after the bar, in this order, where the workers report them.
SHOWN = {"meta_loss": "meta_loss {:.3f}", "train_loss": "loss {:.3f}", "dev_f1": "dev F1 {:.1f}",
         "tasks_per_s": "{:.0f} tasks/s"}


class Board:
    """The latest step and metrics of one run (a Ray actor)."""

    def __init__(self):
        self.step, self.metrics = 0, {}

    def update(self, step: int, metrics: dict) -> None:
        self.step = max(self.step, step)
        self.metrics.update(metrics)

    def latest(self) -> tuple[int, dict]:
        return self.step, self.metrics


def _name(run_id: str) -> str:
    return f"board-{run_id}"


def find_board(run_id: str | None):
    """The board the driver set up for `run_id`, or None (no Ray here, or nobody watching)."""
    ray = sys.modules.get("ray")  # a process that never imported Ray has no board to find
    if run_id is None or ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_actor(_name(run_id), namespace=NAMESPACE)
    except ValueError:
        return None


def publish(board, step: int | None, metrics: dict) -> None:
    """Hand `metrics` of `step` to `board` without waiting for it."""
    try:
        board.update.remote(step or 0, {k: float(v) for k, v in metrics.items() if k in SHOWN})
    except Exception as err:  # the run's own work matters more than its progress bar
        logger.debug("progress not published: %s", err)


def postfix(metrics: dict) -> str:
    return "  ".join(fmt.format(metrics[k]) for k, fmt in SHOWN.items()
                     if k in metrics and not math.isnan(metrics[k]))


@contextmanager
def watching(run_id: str | None, total: int, desc: str, interval_s: float = 1.0) -> Iterator[None]:
    """A bar of `total` steps, `desc` before it, following what the workers publish for
    `run_id` while the block runs (a no-op without a run or without Ray)."""
    # Ray deferred: cluster.tracking imports this module, and jobs.common that one for every
    # command.
    import ray

    if run_id is None or not ray.is_initialized():
        yield
        return
    board = ray.remote(Board).options(name=_name(run_id), namespace=NAMESPACE, num_cpus=0).remote()
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    stop = threading.Event()

    def show() -> None:
        step, metrics = ray.get(board.latest.remote(), timeout=30)
        bar.n = min(step, total)
        bar.set_postfix_str(postfix(metrics), refresh=False)
        bar.refresh()

    def follow() -> None:
        try:
            while not stop.wait(interval_s):
                show()
        except Exception as err:  # the bar stops; the work goes on
            logger.info("progress bar stopped: %s", err)

    thread = threading.Thread(target=follow, name="progress", daemon=True)
    thread.start()
    try:
        yield
        stop.set()
        thread.join()
        show()
    finally:
        stop.set()
        thread.join(timeout=5)
        bar.close()
        ray.kill(board)

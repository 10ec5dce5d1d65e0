"""What a job prints: stage lines, bars, results and the errors that matter on the console; the
workers' output in <out>/logs/job.log, and on the console too with --verbose."""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_demo

# Ray's prefix of a line a worker printed: (Name pid=123) or (pid=123, ip=...).
WORKER_LINE = re.compile(r"^\((?:[\w.]+ )?pid=\d+")


def _demo(tmp_path, *extra):
    out = tmp_path / "out"
    result = run_demo(out, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result, out


def _lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a bar redrawn with carriage returns is one line, what is
    written over it after the last carriage return is what remains."""
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]


@pytest.mark.slow
def test_the_demo_console_shows_stages_bars_and_results_and_the_log_file_the_rest(tmp_path):
    result, out = _demo(tmp_path)
    console = result.stdout + result.stderr
    lines = _lines(result.stdout) + _lines(result.stderr)
    assert len(lines) <= 40, console
    assert [line for line in lines if WORKER_LINE.match(line)] == [], console
    log = out / "logs" / "job.log"
    assert _lines(result.stderr)[0] == f"metaner demo: log in {log.relative_to(tmp_path)} (--verbose shows it here)"
    for stage in ("Ray cluster: local at 127.0.0.1:", "data: 240 English train sentences", "retrieval: ",
                  "base, seed 95: fine-tuning", "base, seed 95: trained in", "ours, seed 95: meta-training",
                  "ours, seed 95: trained in", "ours, seed 95: done in"):
        assert any(line.startswith(stage) for line in lines), (stage, console)
    assert "meta-train: 100%" in console and "fine-tune: 100%" in console and "adapt: 100%" in console
    assert "meta_loss" in console and "dev F1" in console  # what rank 0 reported, on the driver's bar
    assert "| Ours (this run) |" in console and "Next:" in console
    # Ray's, DeepSpeed's and the trainer's worker output, kept in the file.
    text = log.read_text(encoding="utf-8")
    assert "(RayTrainWorker pid=" in text and "meta-step 2/2" in text and "(TrainController pid=" in text
    assert "deepspeed" in text.lower() and "Failed to query Ray Train Controller" not in text


@pytest.mark.slow
def test_verbose_puts_the_workers_output_back_on_the_console(one_node_demo):
    result, _, out = one_node_demo
    console = result.stdout + result.stderr
    assert any(WORKER_LINE.match(line) and "RayTrainWorker" in line for line in _lines(console)), console
    assert "meta-step 2/2" in console and "| Ours (this run) |" in console
    assert "(RayTrainWorker pid=" in (out / "logs" / "job.log").read_text(encoding="utf-8")


def test_a_workers_traceback_reaches_the_console_once_and_its_other_lines_the_file(tmp_path):
    script = textwrap.dedent(f"""
        import logging, sys, time
        from jobs.console import log_to_file, setup
        setup(verbose=False)
        log_to_file({str(tmp_path)!r}, "test")
        from cluster.runtime import init_ray
        import ray
        init_ray(num_cpus=1, num_gpus=0)

        @ray.remote(num_cpus=0.25)
        def chatty(fail):
            print("chatter from a worker", flush=True)
            if fail:
                import traceback
                try:
                    raise ValueError("the worker's own error")
                except ValueError:
                    traceback.print_exc()
            sys.stderr.flush()
            return 1

        ray.get([chatty.remote(True), chatty.remote(True), chatty.remote(False)])
        time.sleep(3)  # the log monitor forwards lines about every second
        ray.shutdown()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert result.returncode == 0, result.stderr[-4000:]
    console = result.stdout + result.stderr
    assert console.count("Traceback (most recent call last):") == 1, console
    assert "ValueError: the worker's own error" in console and "chatter from a worker" not in console
    assert "Ray cluster: local at 127.0.0.1:" in console
    log = (tmp_path / "logs" / "job.log").read_text(encoding="utf-8")
    assert "chatter from a worker" in log and log.count("ValueError: the worker's own error") == 2

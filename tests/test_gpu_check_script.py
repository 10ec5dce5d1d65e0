"""benchmarks/gpu_check.py on this machine: its CPU-only checks pass and it reports them one line each.

The quick form leaves out the demo (minutes on 2 cores); about a minute, most of it the first
torch.compile of the meta-step's updates.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

# The benchmark scripts run end to end in the end-to-end tier (tests/conftest.py).
pytestmark = pytest.mark.slow

CHECKS = ["meta-step", "meta-step-bf16", "faiss-k2", "faiss-k2040", "faiss-k2100", "adapt-tags", "pytest-gpu"]


def test_the_cpu_only_checks_pass_one_line_each(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-only", "--quick",
                           "--keep", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [line.split()[1] for line in lines] == CHECKS
    assert all(line.startswith("PASS ") for line in lines)
    assert "ids equal to brute force" in lines[CHECKS.index("faiss-k2100")]
    assert "0 tags differ" in lines[CHECKS.index("adapt-tags")]
    assert done.stdout.strip().splitlines()[-1].startswith(f"{len(CHECKS)} of {len(CHECKS)} checks passed")
    assert "cuda_checks=False" in done.stdout


def test_a_failed_check_fails_the_run_and_an_unknown_name_is_refused(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_check.py")
    # A budget already spent: every check is reported as failed, not silently left out.
    done = subprocess.run([sys.executable, script, "--cpu-only", "--only", "faiss", "--budget-s", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert [line.split()[:2] for line in done.stdout.splitlines() if line.startswith("FAIL")] == \
        [["FAIL", "faiss-k2"], ["FAIL", "faiss-k2040"], ["FAIL", "faiss-k2100"]]
    done = subprocess.run([sys.executable, script, "--only", "nothing-such"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "names no check" in done.stderr

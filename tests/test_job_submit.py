"""`ray job submit` of the embedded demo to a real local head, as a user on a cluster would."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SMALL_DEMO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, env, check=True, timeout=120):
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, check=check, timeout=timeout)


def _stop_head(temp: Path) -> None:
    """Stop only the head this test started (its processes name its temp dir); `ray stop` would
    stop every Ray process of the user, the session's test cluster included."""
    import signal

    def ours():
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(temp).encode() in cmdline.read_bytes():
                    pids.append(int(cmdline.parent.name))
            except OSError:
                continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_demo_job_through_ray_job_submit(tmp_path):
    if not Path(sys.executable).with_name("ray").exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-{port}"  # Ray's socket paths must stay short
    # Every port of its own: the session's test cluster already holds Ray's default agent ports.
    ports = {name: _free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port",
                                             "ray-client-server-port")}
    _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
         *(f"--{name}={value}" for name, value in ports.items()), env=env)
    try:
        out, store = tmp_path / "out", tmp_path / "mlflow.db"
        for _ in range(24):  # the head's job agent comes up a little after `ray start` returns
            submit = _ray("job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                          "--submission-id", "demo-ci", "--no-wait", "--", "python", "-m", "jobs.demo",
                          "--out", str(out), f"mlflow.tracking_uri=sqlite:///{store}",
                          # the demo at its smallest: the plumbing is what is tested
                          *SMALL_DEMO, env=env, check=False)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0 and "demo-ci" in submit.stdout + submit.stderr, submit.stdout + submit.stderr
        deadline, status = time.time() + 900, ""
        while time.time() < deadline:
            done = _ray("job", "status", "--address", f"http://127.0.0.1:{dash}", "demo-ci", env=env)
            status = (done.stdout + done.stderr).lower()  # the CLI reports on its log stream
            if any(f"job 'demo-ci' {word}" in status for word in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = _ray("job", "logs", "--address", f"http://127.0.0.1:{dash}", "demo-ci", env=env, check=False).stdout
        assert "job 'demo-ci' succeeded" in status, f"job ended as: {status}\n{logs[-4000:]}"
        assert "| Ours (this run) |" in logs and "| Base Model (this run) |" in logs

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
        exp = client.get_experiment_by_name("metaner-demo")
        runs = client.search_runs([exp.experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        seed_run = by_name["ours-seed95"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == seed_run.info.run_id]
        assert sorted(r.data.params["language"] for r in children) == ["de", "es", "fr", "nl", "zh"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert (out / "synthetic" / "results.md").is_file()  # a folder per data source
        assert "f1_avg_mean" in by_name["ours"].data.metrics
    finally:
        _stop_head(temp)

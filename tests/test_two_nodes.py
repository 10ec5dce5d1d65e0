"""The demo job on a real two-node Ray cluster on this machine, its work spread over both nodes.

The second node runs in a mount namespace of its own, where the driver's per-row output folders
are covered by an empty tmpfs: a file that a process of that node writes there stays on that
node, as on a real cluster where --out is the driver's local disk. The job must still end with
the results of one node, which holds only if every model a worker or task makes reaches the
driver through the shared storage (cluster.storage_path). A storage folder that the second node
does not see is refused before any work.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="Linux mount namespaces")]

RAY = str(Path(sys.executable).with_name("ray"))
ROWS = ("base", "ours")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    # Every node and client on loopback (see _SECOND_NODE); no tokens between them.
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", **extra)
    return env


# `ray start` joins a second node only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which also makes
# it advertise the machine's external interface instead of the loopback address it is given:
# the join is allowed here, in `ray start` alone, and every address stays 127.0.0.1.
_SECOND_NODE = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import cli
cli.main(args=["start", *sys.argv[1:]], prog_name="ray")
"""


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


class TwoNodes:
    """A head node and a second node (its own mount namespace, `hidden` folders covered there)."""

    def __init__(self, tmp: Path, hidden: list[Path]):
        self.port, self.dashboard = _port(), _port()
        self.address = f"127.0.0.1:{self.port}"
        # Its own short temp root (socket paths are short): no trace in /tmp/ray, where a later
        # ray.init() would look for a cluster to join.
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--block", "--disable-usage-stats"]
        self.head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard}", "--include-dashboard=true", *common],
            env=self.env(), start_new_session=True, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
        mounts = " && ".join(f"mount -t tmpfs tmpfs '{h}'" for h in hidden)
        second = " ".join(shlex.quote(a) for a in [sys.executable, "-c", _SECOND_NODE, f"--address={self.address}",
                                                   *common])
        self.second = None
        self._wait(1)
        self.second = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                        f"{mounts} && exec {second}"], env=self.env(), start_new_session=True,
                                       stdout=open(tmp / "node2.log", "w"), stderr=subprocess.STDOUT)
        self._wait(2)

    def env(self, **extra) -> dict:
        return _env(RAY_TMPDIR=self.temp, **extra)

    def _wait(self, nodes: int) -> None:
        script = ("import ray, sys, time\nray.init(address=sys.argv[1], log_to_driver=False)\n"
                  "deadline = time.time() + 120\n"
                  "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.time() < deadline:\n"
                  "    time.sleep(0.5)\n"
                  "sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= int(sys.argv[2]) else 1)\n")
        deadline = time.monotonic() + 180
        while True:
            done = subprocess.run([sys.executable, "-c", script, self.address, str(nodes)], env=self.env(),
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the {nodes}-node Ray cluster did not come up: {done.stderr[-2000:]}")
            time.sleep(2)

    def actors(self) -> list[dict]:
        script = ("import json, ray, sys\nfrom ray.util.state import list_actors\n"
                  "ray.init(address=sys.argv[1], log_to_driver=False)\n"
                  "print(json.dumps([{'class_name': a.class_name, 'node_id': a.node_id} "
                  "for a in list_actors(limit=10000)]))\n")
        done = subprocess.run([sys.executable, "-c", script, self.address], env=self.env(), capture_output=True,
                              text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for proc in (self.second, self.head):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


def _demo(out: Path, shared: Path, *extra: str, nodes: TwoNodes) -> subprocess.CompletedProcess:
    """The small demo (conftest.SMALL_DEMO: one of each kind of worker and actor per node) on `nodes`."""
    return run_demo(out, f"mlflow.tracking_uri=sqlite:///{shared / (out.name + '.db')}", *extra, cwd=REPO,
                    env=nodes.env(RAY_ADDRESS=nodes.address))


def _f1(out: Path) -> dict:
    return {row: json.loads((out / "synthetic" / row / "seed95" / "scores.json").read_text())["f1"] for row in ROWS}


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (root, or CAP_SYS_ADMIN) for a node-local folder")
def test_the_demo_on_two_nodes_ends_as_on_one(tmp_path, one_node_demo):
    shared = tmp_path / "shared"
    shared.mkdir()
    out = tmp_path / "two"
    rows = [out / "synthetic" / row for row in ROWS]
    for folder in rows:
        folder.mkdir(parents=True)
    nodes = TwoNodes(tmp_path, hidden=rows)
    try:
        # A storage folder the second node does not see: refused before any work.
        refused = _demo(tmp_path / "refused", shared, f"cluster.storage_path={rows[0]}", nodes=nodes)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "cluster.storage_path" in refused.stderr and "not seen by 1 of the cluster's nodes" in refused.stderr
        assert not (tmp_path / "refused" / "synthetic" / "base" / "seed95").exists()

        two = _demo(out, shared, f"cluster.storage_path={shared / 'storage'}", nodes=nodes)
        assert two.returncode == 0, two.stderr[-5000:]
        placed = nodes.actors()
    finally:
        nodes.stop()
    on = {}
    for actor in placed:
        on.setdefault(actor["class_name"], set()).add(actor["node_id"])
    spread = {name: len(ids) for name, ids in on.items()}
    assert len(on.get("RayTrainWorker", ())) == 2, spread
    assert len(on.get("ShippedAdapter", ())) == 2, spread
    assert len(on.get("Embedder", set()) | on.get("IndexShard", set())) == 2, spread

    # The same job on one node (run once for the session, with --verbose, which changes only the console).
    two_f1, one_f1 = _f1(out), _f1(one_node_demo[2])
    for row in ROWS:
        assert two_f1[row] == pytest.approx(one_f1[row], abs=1e-9), row

"""Every service the project starts listens on 127.0.0.1 only, and no config file names another
host or holds credentials (the KubeRay head's in-pod dashboard host is the one documented exception)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, load_job_config

LOOPBACK = {"127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1"}
# (file, key, value): the KubeRay head must accept pod-network connections; its manifest says the
# dashboard is reached through `kubectl port-forward` only.
EXCEPTIONS = {("cluster/kuberay.yaml", "dashboard-host", "0.0.0.0")}
_HOST_KEY = re.compile(r"(host|address|bind|(^|[-_])ip($|[-_])|ip[-_]?address|uri$|url$|endpoint)", re.I)
_HOST_FLAG = re.compile(r"--([\w-]*(?:host|ip-address|address))[= ](\S+)")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/\s:'\"]+)")
_SECRET_KEY = re.compile(r"(pass(word|wd)?$|token|secret|api[-_]?key|access[-_]?key|private[-_]?key|credential)", re.I)
_SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[A-Za-z0-9]{30,}")


def _config_files() -> list[Path]:
    """Tracked and not-ignored YAML files of the checkout (virtual environments and stores left out)."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
        files = [REPO / n for n in names if n.endswith((".yaml", ".yml"))]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*.y*ml") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return sorted(p for p in files if p.is_file())


def _walk(node, key=""):
    """(key, scalar) pairs of a parsed YAML document; list items inherit their list's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _host(value: str) -> str:
    value = value.strip("'\"")
    match = _URL.search(value)
    if match:
        return match.group(1)
    if value.startswith("["):  # [::1]:port
        return value[1:value.find("]")]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _host_ok(host: str) -> bool:
    # "$RAY_HEAD_IP:6379": a worker joining its own head, filled in by the cluster launcher.
    return host in LOOPBACK or host.startswith("$") or host in ("", "null", "None")


def host_violations(name: str, text: str) -> list[str]:
    out = []
    for doc in yaml.safe_load_all(text):
        for key, value in _walk(doc):
            if value is None or isinstance(value, bool):
                continue
            value = str(value)
            found = [(key, value)] if _HOST_KEY.search(key) else []
            found += [(flag, arg) for flag, arg in _HOST_FLAG.findall(value)]
            for k, v in found:
                if not _host_ok(_host(v)) and (name, k, v) not in EXCEPTIONS:
                    out.append(f"{name}: {k} = {v}")
    return out


def secret_violations(name: str, text: str) -> list[str]:
    out = [f"{name}: a key-like value" for _ in _SECRET_VALUE.finditer(text)]
    for doc in yaml.safe_load_all(text):
        for key, value in _walk(doc):
            if _SECRET_KEY.search(key) and value not in (None, "", [], {}):
                out.append(f"{name}: {key} has a value")
    return out


def test_the_scanners_catch_what_they_look_for():
    bad = ("head:\n  host: 10.0.0.5\n  commands:\n    - ray start --head --dashboard-host=0.0.0.0\n"
           "    - mlflow server --host 192.168.1.2\nmlflow:\n  tracking_uri: http://mlflow.example.com:5000\n")
    assert len(host_violations("x.yaml", bad)) == 4
    assert host_violations("x.yaml", "a:\n  host: 127.0.0.1\n  cmd: ray start --node-ip-address=127.0.0.1\n") == []
    secrets = "auth:\n  password: hunter2\n  token: ''\nkey: AKIAABCDEFGHIJKLMNOP\n"
    assert len(secret_violations("x.yaml", secrets)) == 2


def test_no_config_names_a_host_other_than_loopback():
    files = _config_files()
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"cluster/cluster.yaml", "cluster/kuberay.yaml", "jobs/configs/meta_train.yaml"} <= names
    problems = [v for p in files for v in host_violations(str(p.relative_to(REPO)), p.read_text(encoding="utf-8"))]
    assert problems == []
    # The one exception is documented beside the setting.
    line, = [l for l in (REPO / "cluster/kuberay.yaml").read_text().splitlines() if "dashboard-host" in l]
    assert '"0.0.0.0"' in line and "port-forward" in line


def test_no_config_holds_credentials():
    problems = [v for p in _config_files() for v in secret_violations(str(p.relative_to(REPO)),
                                                                       p.read_text(encoding="utf-8"))]
    assert problems == []


def test_job_configs_default_to_a_local_cluster_and_store():
    from trainer.config import Config

    for cfg in [Config()] + [load_job_config(p) for p in sorted((REPO / "jobs/configs").glob("*.yaml"))]:
        assert cfg.cluster.address is None or _host(cfg.cluster.address) in LOOPBACK
        uri = cfg.mlflow.tracking_uri
        assert uri is None or uri.startswith(("sqlite:", "file:")) or _host(uri) in LOOPBACK


def _calls(tree: ast.AST, attr: str, owner: str | None = None) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == attr
         and (owner is None or getattr(n.func.value, "id", None) == owner))
        or (owner is None and isinstance(n.func, ast.Name) and n.func.id == attr))]


def test_ray_is_started_only_through_init_ray():
    conftest = ast.parse((REPO / "tests/conftest.py").read_text())
    fixture, = [f for f in ast.walk(conftest) if isinstance(f, ast.FunctionDef) and f.name == "ray_local"]
    assert _calls(fixture, "init_ray") and not _calls(fixture, "init", "ray")
    callers = [str(p.relative_to(REPO)) for folder in ("trainer", "retrieval", "cluster", "jobs", "benchmarks", "tests")
               for p in (REPO / folder).rglob("*.py") if _calls(ast.parse(p.read_text()), "init", "ray")]
    assert callers == ["cluster/runtime.py"]


def test_every_process_of_the_local_cluster_listens_on_loopback(ray_local):
    psutil = pytest.importorskip("psutil")
    from cluster.runtime import init_ray

    assert init_ray().startswith("127.0.0.1:")
    node = ray_local._private.worker._global_node
    if node is None or not node.all_processes:
        pytest.skip("this session joined a Ray cluster it did not start")

    @ray_local.remote(num_cpus=0.25)
    def worker_pid():
        import os

        return os.getpid()

    pids = {info.process.pid for infos in node.all_processes.values() for info in infos}
    pids.add(ray_local.get(worker_pid.remote()))
    for pid in list(pids):
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 2  # at least the GCS server and the raylet
    assert [x for x in listening if x[1].ip not in LOOPBACK] == []

"""The cluster launcher YAML, the KubeRay manifest and the runtime env are well-formed."""
import json
import subprocess
import sys

import yaml

from conftest import REPO, load_job_config


def test_launcher_and_kuberay_configs_parse():
    launcher = yaml.safe_load((REPO / "cluster/cluster.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in launcher["available_node_types"].values())
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])
    manifest = yaml.safe_load((REPO / "cluster/kuberay.yaml").read_text())
    assert manifest["kind"] == "RayCluster" and manifest["spec"]["workerGroupSpecs"]


def test_runtime_env_excludes_private_and_large_folders(monkeypatch):
    from cluster.runtime_env import runtime_env

    monkeypatch.setenv("METANER_DATA", "/corpora")
    env = runtime_env(REPO)
    assert {".venv", "mlflow.db", "outputs"} <= set(env["excludes"])
    assert env["env_vars"]["METANER_DATA"] == "/corpora"
    out = subprocess.run([sys.executable, "-m", "cluster.runtime_env"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert json.loads(out.stdout)["working_dir"] == str(REPO)


def test_every_job_config_loads_and_names_its_launch_command():
    for path in sorted((REPO / "jobs/configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("python -m jobs." in first or "metaner " in first), path.name
        load_job_config(path)

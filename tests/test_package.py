"""The top-level names are also names of unrelated PyPI packages: they must resolve to this repo."""
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["trainer", "retrieval", "cluster", "jobs"])
def test_package_imports_from_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_trainer_imports_no_distributed_stack():
    """trainer/ runs in one process: importing it must not pull in Ray, DeepSpeed or MLflow."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, trainer\n"
            "for m in pkgutil.iter_modules(trainer.__path__):\n"
            "    importlib.import_module('trainer.' + m.name)\n"
            "bad = [n for n in ('ray', 'deepspeed', 'mlflow') if n in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "", f"trainer imported {out.stdout.strip()}"

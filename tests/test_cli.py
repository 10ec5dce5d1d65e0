"""The `metaner` console script as a user runs it."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, needs_data


def _metaner(*args, check=True):
    exe = shutil.which("metaner") or None
    cmd = [exe, *args] if exe else [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=REPO)


@needs_data
def test_inspect_json_on_raw_conll(data_root):
    out = json.loads(_metaner("inspect", str(data_root / "raw/conll2003/eng.testb"), "--json").stdout)
    assert (out["sentences"], out["entities"], out["encoding"], out["scheme"]) == (3453, 5648, "utf-8", "IOB1")
    assert out["entities_by_type"] == {"LOC": 1668, "MISC": 702, "ORG": 1661, "PER": 1617}
    assert out["tokens"] == 46435 and out["docstart_dropped"] == 231 and out["converted"] is True


@needs_data
def test_inspect_text_on_europeana_split(data_root):
    out = _metaner("inspect", str(data_root / "raw/europeana/enp_FR.bnf.bio"), "--split", "test", "--misc-to-o").stdout
    assert "2,375" in out and "split at each '.'" in out and "IO" in out


def test_inspect_bad_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("John B-PER\nSmith Q-PER\n")
    result = _metaner("inspect", str(bad), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:2: unknown tag 'Q-PER'" in result.stderr


def test_score_json(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("John NNP B-PER B-PER\nSmith NNP I-PER I-PER\nin IN O O\nParis NNP B-LOC B-ORG\n\n")
    out = json.loads(_metaner("score", str(path), "--json").stdout)
    assert out["precision"] == pytest.approx(50.0) and out["recall"] == pytest.approx(50.0)
    assert out["per_type"]["PER"]["f1"] == 100.0 and out["per_type"]["LOC"]["f1"] == 0.0
    text = _metaner("score", str(path)).stdout
    assert "overall" in text and "50.00" in text


def test_inspect_format_option(tmp_path):
    path = tmp_path / "stream.txt"
    path.write_text("Le O\nmaire O\n. O\nParis I-LOC\nvote O\n. O\n")
    out = json.loads(_metaner("inspect", str(path), "--format", "stream", "--json").stdout)
    assert out["sentences"] == 2 and out["segmented_at_period"] and out["entities"] == 1


def test_a_relative_model_folder_reaches_workers_as_an_absolute_path(tmp_path, monkeypatch):
    # Ray Train workers run in a directory of their own, where a relative folder is not found.
    from jobs.common import parse

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "enc").mkdir(parents=True)
    (tmp_path / "models" / "enc" / "config.json").write_text('{"num_hidden_layers": 12}')  # checked by load_config
    cfg, _ = parse(["--out", "o", "model.name_or_path=models/enc"], "meta_train")
    assert cfg.model.name_or_path == str(tmp_path / "models" / "enc")
    hub, _ = parse(["--out", "o", "model.name_or_path=bert-base-multilingual-cased"], "meta_train")
    assert hub.model.name_or_path == "bert-base-multilingual-cased"

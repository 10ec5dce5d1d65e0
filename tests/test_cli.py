"""The `metaner` console script as a user runs it."""
import json
import logging
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


def test_metaner_logs_a_job_at_info_as_python_m_does(tmp_path):
    """`metaner JOB` shows the same INFO progress between stages as `python -m jobs.JOB`."""
    snippet = ("import logging, sys, importlib; module, argv = sys.argv[1], sys.argv[2:]; "
               "rc = importlib.import_module(module).main(argv); "
               "print(rc, logging.getLogger().getEffectiveLevel())")
    bad = ["--config", str(tmp_path / "missing.yaml")]
    direct = subprocess.run([sys.executable, "-c", snippet, "jobs.meta_train", *bad], capture_output=True,
                            text=True, cwd=REPO, check=True).stdout.split()
    via_cli = subprocess.run([sys.executable, "-c", snippet, "jobs.cli", "meta-train", *bad], capture_output=True,
                             text=True, cwd=REPO, check=True).stdout.split()
    assert direct == via_cli == ["2", str(logging.INFO)]


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
    # A hub id stays as it is (here found in a local Hugging Face cache, as the job requires).
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--bert-base-multilingual-cased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"num_hidden_layers": 12}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub, _ = parse(["--out", "o", "model.name_or_path=bert-base-multilingual-cased"], "meta_train")
    assert hub.model.name_or_path == "bert-base-multilingual-cased"


def test_load_data_marks_the_unspaced_targets(tmp_path, toy_corpus):
    from jobs.common import load_data
    from jobs.synthetic import write_corpus
    from trainer.config import load_config

    for name in ("en/train.txt", "en/valid.txt"):
        write_corpus(tmp_path / name, toy_corpus["en"])
    for lang in ("es", "zh"):
        write_corpus(tmp_path / f"{lang}.txt", toy_corpus[lang])
    base = [f"data.root={tmp_path}", "data.source_train=en/train.txt", "data.source_dev=en/valid.txt",
            "data.targets=[es, zh]", "data.target_files.es=es.txt", "data.target_files.zh=zh.txt",
            "data.target_sample=7"]
    data = load_data(load_config(overrides=base), seed=95)
    assert all(s.unspaced for s in data.targets["zh"]) and not any(s.unspaced for s in data.targets["es"])
    assert not any(s.unspaced for s in data.source + data.dev)
    plain = load_data(load_config(overrides=base + ["data.unspaced_languages=[]"]), seed=95)
    assert not any(s.unspaced for s in plain.targets["zh"])
    # The same sample either way: only the reading differs.
    assert [s.words for s in plain.targets["zh"]] == [s.words for s in data.targets["zh"]]


def test_inspect_counts_entities_split_by_pieces(tmp_path):
    from conftest import MODELS

    if not (MODELS / "me5-small-ner").is_dir():
        pytest.skip(f"pretrained encoder not found at {MODELS / 'me5-small-ner'}")
    path = tmp_path / "zh.tsv"
    # e5 has a piece "北京": an entity of "北" alone has its end inside it.
    path.write_text("北\tB-LOC\n京\tO\n大\tO\n学\tO\n\n北\tB-ORG\n京\tI-ORG\n大\tI-ORG\n学\tI-ORG\n\n", encoding="utf-8")
    out = json.loads(_metaner("inspect", str(path), "--tokenizer", str(MODELS / "me5-small-ner"), "--json").stdout)
    u = out["unspaced"]
    assert (u["vocabulary"], u["joined"], u["words"], u["entities"]) == ("Unigram", True, 8, 2)
    assert (u["entities_split"], u["sentences_with_split"]) == (1, 1) and u["units"] < 8
    text = _metaner("inspect", str(path), "--tokenizer", str(MODELS / "me5-small-ner")).stdout
    assert "1 of 2 entities" in text and "inside a piece" in text
    bad = _metaner("inspect", str(path), "--tokenizer", str(tmp_path / "none"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_evaluation_counts_split_entities_of_unspaced_targets(tmp_path, e5_tokenizer, toy_corpus):
    from dataclasses import replace

    from cluster.report import language_metrics
    from jobs.evaluate import boundary_loss
    from trainer.config import load_config
    from trainer.data.corpus import Sentence

    e5_tokenizer.save_pretrained(tmp_path)  # a checkpoint folder holds its tokenizer
    zh = [Sentence(tuple("北京大学"), ("B-LOC", "O", "O", "O"), unspaced=True), replace(toy_corpus["zh"][0], unspaced=True)]
    found = boundary_loss(str(tmp_path), load_config(), {"es": toy_corpus["es"][:3], "zh": zh})
    assert list(found) == ["zh"] and found["zh"]["entities_split"] == 1
    assert boundary_loss(str(tmp_path), load_config(), {"zh": toy_corpus["zh"][:3]}) == {}
    metrics = language_metrics({"f1": 1.0, "precision": 1.0, "recall": 1.0, "per_type": {}, "entities_split": 1})
    assert metrics["entities_split"] == 1


def test_the_demo_ends_by_saying_where_everything_is_and_what_to_run_next(tmp_path):
    from jobs.common import CONFIGS
    from jobs.demo import _where
    from trainer.config import load_config

    cfg = load_config(CONFIGS / "demo.yaml", [f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    (tmp_path / "ours" / "seed95" / "best").mkdir(parents=True)
    text = _where(cfg, tmp_path)
    assert f"Results table:   {tmp_path / 'results.md'}" in text
    assert f"{tmp_path / 'ours' / 'seed95' / 'eval'}/predictions.<lang>.txt" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'm.db'}" in text and "metaner-demo" in text
    assert f"metaner results {tmp_path}" in text
    assert f"metaner tag --checkpoint {tmp_path / 'ours' / 'seed95' / 'best'} --input PATH" in text

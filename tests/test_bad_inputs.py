"""Malformed inputs of every kind end in one clear message naming what is wrong and what to do;
the harmless oddities of real files are read correctly instead, each repair a warning naming its
first lines. Every case runs under a deadline (SIGALRM here, `timeout=` on subprocesses), so a
reader that blocks (a FIFO, a device) fails its case instead of hanging the suite; CLI cases
assert the exit status, the file:line or key named, and that no traceback is printed.

Also referenced, not repeated here: a label set other than the checkpoint's and a pickled trainer
state (tests/test_model.py: test_a_different_label_set_is_refused_naming_both,
test_trainer_state_round_trips_and_pickled_objects_are_refused).
"""
from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings, strategies as st

from jobs.environment import load_job_config
from trainer.config import load_config
from trainer.data.corpus import LABELS, MEMORY_MULTIPLE, CorpusError, Sentence, read_corpus

# Seconds any one case may take; subprocesses get their own, shorter, timeout.
CASE_DEADLINE = 240


@pytest.fixture(autouse=True)
def _deadline():
    """Fail a case that runs past CASE_DEADLINE (a blocked read included) instead of hanging."""
    def expired(signum, frame):
        raise TimeoutError(f"the case ran past {CASE_DEADLINE} s: something blocks or loops")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(CASE_DEADLINE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _write(folder: Path, content: bytes | str, name: str = "c.txt") -> Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _stream(segment_lengths: list[int]) -> str:
    """A file without sentence breaks whose '.' tokens end segments of the given lengths."""
    return "".join(f"w{i} O\n" * (n - 1) + ". O\n" for i, n in enumerate(segment_lengths))


# ------------------------------------------------------------------------ corpora: refused
# (id, content, suffix appended to the path, line named or None, fragments the message holds)
CORPUS_ERRORS = [
    ("no-tag-column", "John B-PER\nSmith\n", "", 2, ["the line 'Smith' has no tag column", "Write each token as"]),
    ("tab-file-empty-tag", "John\tB-PER\nSmith\t\n", "", 2, ["has no tag column"]),
    ("unknown-tag", "John B-PER\nSmith B-PERSON\n", "", 2, ["unknown tag 'B-PERSON'", "Use O or B-/I-", "PER"]),
    ("lowercase-tag", "john b-per\n", "", 1, ["unknown tag 'b-per'"]),
    ("numeric-tag", "John 1\n", "", 1, ["unknown tag '1'"]),
    ("mixed-columns", "a NN O\nb NN O\nc O\nd O\ne O\n", "", 1,
     ["mixed column counts", "most lines have 2", "Give every token line the same columns"]),
    ("empty-file", b"", "", None, ["the file is empty", "one `word ... TAG` line per token"]),
    ("blank-lines-only", b" \n\t\n\r\n", "", None, ["the file is empty"]),
    ("only-docstart", "-DOCSTART- -X- -X- O\n\n-DOCSTART- -X- -X- O\n", "", None,
     ["only -DOCSTART- markers", "at least one sentence"]),
    ("utf-16", "John B-PER\nSmith I-PER\n".encode("utf-16"), "", 1,
     ["NUL bytes", "UTF-16 or binary", "re-save it as UTF-8"]),
    ("gzip", gzip.compress(b"John B-PER\n", mtime=0), "", 1, ["NUL bytes", "Decompress it"]),
    ("utf-8-with-stray-byte", "Köln B-LOC\nMünchen B-LOC\n".encode() + b"Sch\xf6ne O\n", "", 3,
     ["byte 0xf6 is not UTF-8", "a mix of encodings", "Re-save the whole file in one encoding"]),
    ("empty-test-split", _stream([600, 600]), "#test", None,
     ["the '#test' split is empty (2 segments in all)", "Use the whole file"]),
    ("split-of-segmented-file", "a O\n\nb O\n", "#test", None,
     ["'#test' split was asked of a file that already has sentence breaks", "Drop the '#split' suffix"]),
    ("unknown-split", "a O\n", "#dev", None, ["unknown split 'dev'", "Use '#train' or '#test'"]),
    ("nbsp-as-separator", "John\u00a0B-PER\n", "", 1,
     ["has no tag column (only spaces and tabs separate columns, not a non-breaking"]),
    ("whitespace-only-word", "a O\n\u00a0 O\n", "", 2, ["the word before the tag is empty or only white space"]),
    ("empty-word-in-tab-file", "John\tB-PER\n\tI-PER\n", "", 2, ["the word before the tag is empty"]),
    ("control-characters-only", "\x01\n\x02 \n", "", None, ["only blank or control-character lines"]),
    ("cr-line-ends-count-lines", "John B-PER\rSmith B-FOO\r", "", 2, ["unknown tag 'B-FOO'"]),
    ("chunk-tag-as-ner-tag", "EU NNP I-NP\n", "", 1, ["unknown tag 'I-NP'"]),
]


@pytest.mark.parametrize("content, suffix, line, fragments",
                         [c[1:] for c in CORPUS_ERRORS], ids=[c[0] for c in CORPUS_ERRORS])
def test_malformed_corpus_is_refused_naming_file_line_and_fix(tmp_path, content, suffix, line, fragments):
    path = _write(tmp_path, content)
    with pytest.raises(CorpusError) as err:
        read_corpus(f"{path}{suffix}")
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_file_and_folder_name_the_path_and_the_setting(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file\. Check the path, or set data.root / METANER_DATA"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="is a folder, not a corpus file. Name a file inside it"):
        read_corpus(tmp_path)


# ----------------------------------------------------------- corpora: not regular files, OSError


def _special(kind: str, folder: Path) -> str:
    """A path that is not a readable regular file, of the given kind."""
    if kind == "fifo":
        os.mkfifo(folder / "fifo")  # no writer: a plain open() would block for ever
        return str(folder / "fifo")
    if kind == "device":
        return "/dev/zero"  # endless: a plain read() would fill memory
    if kind == "null-device":
        return "/dev/null"
    if kind == "symlink-loop":
        os.symlink(folder / "loop", folder / "loop")
        return str(folder / "loop")
    if kind == "through-a-file":
        (folder / "a-file").write_text("x O\n")
        return str(folder / "a-file" / "c.txt")
    if kind == "name-too-long":
        return str(folder / ("n" * 300))
    if kind == "folder":
        return str(folder)
    raise AssertionError(kind)


SPECIAL = [("fifo", "is a named pipe (FIFO), not a regular file", "Give a regular file"),
           ("device", "is a character device, not a regular file", "Give a regular file"),
           ("null-device", "is a character device, not a regular file", "Give a regular file"),
           ("symlink-loop", "the path is a loop of symbolic links", "Point it at the file itself"),
           ("through-a-file", "a part of the path is a file, not a folder", "Check each folder"),
           ("name-too-long", "the path or a name in it is too long", "Shorten it"),
           ("folder", "is a folder, not a corpus file", "Name a file inside it")]


@pytest.mark.parametrize("kind, problem, fix", SPECIAL, ids=[c[0] for c in SPECIAL])
def test_special_files_are_refused_up_front_without_reading(tmp_path, kind, problem, fix):
    path = _special(kind, tmp_path)
    started = time.monotonic()
    with pytest.raises(CorpusError) as err:
        read_corpus(path)
    assert str(err.value) == f"{path}: {problem}. {err.value.args[0].split(f'{problem}. ', 1)[1]}"
    assert fix in str(err.value) and time.monotonic() - started < 5


def test_a_socket_is_refused(tmp_path):
    folder = tempfile.mkdtemp(dir="/tmp")  # a socket path must stay under 108 bytes
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(f"{folder}/s")
        with pytest.raises(CorpusError, match=r"/s: is a socket"):
            read_corpus(f"{folder}/s")
        sock.close()
    finally:
        shutil.rmtree(folder)


def test_permission_denied_is_one_line_naming_the_path(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: the refusal of open() is simulated.
    path = _write(tmp_path, "a O\n")
    real_open = os.open

    def refuse(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CorpusError) as err:
        read_corpus(path)
    assert str(err.value).startswith(f"{path}: permission denied. Make the file readable")


def test_split_given_twice_differently_is_refused(tmp_path):
    path = _write(tmp_path, _stream([600, 600]))
    with pytest.raises(CorpusError, match=r"selects '#test' but split='train' was asked"):
        read_corpus(f"{path}#test", split="train")


# ---------------------------------------------------------------------- corpora: tolerated


def test_bom_is_not_part_of_the_first_word(tmp_path):
    corpus = read_corpus(_write(tmp_path, b"\xef\xbb\xbfJohn B-PER\nSmith I-PER\n"))
    assert corpus.info.bom and corpus.info.encoding == "utf-8"
    assert corpus.sentences == [Sentence(("John", "Smith"), ("B-PER", "I-PER"))]


def test_crlf_line_ends_leave_no_carriage_return(tmp_path):
    corpus = read_corpus(_write(tmp_path, "John B-PER\r\nSmith I-PER\r\n\r\nin O\r\nParis B-LOC\r\n"))
    assert corpus.info.crlf and len(corpus.sentences) == 2
    assert all("\r" not in w and "\r" not in t for s in corpus.sentences for w, t in zip(s.words, s.tags))
    assert corpus.sentences[1].tags == ("O", "B-LOC")


def test_tab_and_space_mix_reads_as_whitespace_columns(tmp_path):
    corpus = read_corpus(_write(tmp_path, "John\tB-PER\nSmith I-PER\n\nin   O\nParis\t B-LOC\n"))
    assert corpus.info.delimiter == "whitespace" and corpus.info.columns == 2
    assert [s.words for s in corpus.sentences] == [("John", "Smith"), ("in", "Paris")]
    assert [s.tags for s in corpus.sentences] == [("B-PER", "I-PER"), ("O", "B-LOC")]


def test_latin1_file_is_decoded_as_latin1(tmp_path):
    corpus = read_corpus(_write(tmp_path, "in O\nKöln B-LOC\n".encode("latin-1")))
    assert corpus.info.encoding == "latin-1" and corpus.sentences[0].words == ("in", "Köln")


def test_cr_and_mixed_line_ends_are_read(tmp_path):
    cr = read_corpus(_write(tmp_path, "John B-PER\rSmith I-PER\r\rin O\rParis B-LOC\r", "cr.txt"))
    assert cr.info.line_end == "CR" and [s.words for s in cr.sentences] == [("John", "Smith"), ("in", "Paris")]
    mixed = read_corpus(_write(tmp_path, "John B-PER\r\nSmith I-PER\n\nin O\r\nParis B-LOC\n", "mixed.txt"))
    assert mixed.info.line_end == "LF and CRLF" and mixed.sentences == cr.sentences
    assert not mixed.info.warnings


def test_a_non_breaking_space_stays_inside_its_word(tmp_path):
    corpus = read_corpus(_write(tmp_path, "10\u00a0000 O\nNew\u00a0York B-LOC\n"))
    assert corpus.sentences[0].words == ("10\u00a0000", "New\u00a0York") and corpus.info.odd_column_lines == 0


def test_only_a_trailing_split_suffix_selects_a_split(tmp_path):
    folder = tmp_path / "corpora#v2"
    folder.mkdir()
    named = _write(folder, "a O\n\nb O\n", "fr#1.txt")
    assert len(read_corpus(named).sentences) == 2  # '#' inside folder and file names is part of the path
    stream = _write(folder, _stream([5] * 10), "stream.bio")
    assert len(read_corpus(f"{stream}#test", format="stream").sentences) == 2


# (content, read_corpus kwargs, fragments of the one warning, sentences' words when checked)
REPAIRS = [
    ("control-characters", "Jo\x01hn B-PER\nSmith I-PER\n\nParis\x1f B-LOC\n", {},
     ["control characters removed from 2 lines (lines 1, 4)"], [("John", "Smith"), ("Paris",)]),
    ("stray-cr-in-lf-file", "Jo\rhn B-PER\nSmith I-PER\n", {}, ["control characters removed from 1 lines (line 1)"],
     [("John", "Smith")]),
    ("c1-controls-kept", "Itali\x81e B-LOC\n".encode("latin-1"), {}, ["1 lines hold C1 control characters", "(line 1)",
                                                                     "kept"], [("Itali\x81e",)]),
    ("stream-tail", _stream([3, 3]) + "w O\nx O\n", {"format": "stream"},
     ["the 2 tokens after the last '.' (lines 7-8) form no segment and were left out"], None),
    ("i-after-o", "a O\nb I-PER\n\nc O\nd I-LOC\n\ne B-ORG\n\nf O\ng I-ORG\n\nh O\ni I-MISC\n"
     + "\nj B-PER\n\nk B-LOC\n\nl B-MISC\n\nm B-ORG\n", {},
     ["4 entities started with I- after O in BIO input (lines 2, 5, 10, ...); read as B-"], None),
    ("odd-columns", "".join(f"w{i} NN O\n" for i in range(200)) + "v O\n", {},
     ["1 lines have a column count other than 3 (line 201)"], None),
]


@pytest.mark.parametrize("content, kwargs, fragments, words", [r[1:] for r in REPAIRS], ids=[r[0] for r in REPAIRS])
def test_every_repair_is_a_warning_naming_its_first_lines(tmp_path, caplog, content, kwargs, fragments, words):
    path = _write(tmp_path, content)
    with caplog.at_level(logging.WARNING, logger="trainer.data.corpus"):
        corpus = read_corpus(path, **kwargs)
    warning, = corpus.info.warnings
    for fragment in fragments:
        assert fragment in warning, (fragment, warning)
    assert f"{path}: {warning}" in caplog.text
    if words is not None:
        assert [s.words for s in corpus.sentences] == words


def _big_file(path: Path, kind: str) -> None:
    """About 1 MB in the shape that costs the reader most memory per byte."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(110_000 if kind != "conlleval" else 90_000):
            word = f"{i:x}" if kind != "stream" else ("." if i % 25 == 24 else f"w{i % 5000}")
            fh.write(f"{word} O O\n" if kind == "conlleval" else f"{word} O\n")
            if kind != "stream" and i % 20 == 19:
                fh.write("\n")


@pytest.mark.parametrize("kind", ["unique-words", "stream", "conlleval"])
def test_reading_memory_is_bounded_by_a_multiple_of_the_file_size(tmp_path, kind):
    from trainer.data.scoring import read_conll

    path = tmp_path / "big.txt"
    _big_file(path, kind)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = read_conll(path) if kind == "conlleval" else read_corpus(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result
    assert peak <= MEMORY_MULTIPLE * size + 2 ** 20, f"peak {peak / size:.1f}x the file size of {size:,} bytes"


@pytest.fixture(scope="module")
def tiny_model(tiny_bert, tiny_tokenizer):
    from trainer.data.features import Featurizer
    from trainer.modules.model import NerModel

    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0)
    return model, Featurizer(tiny_tokenizer, max_length=32, context=8)


def test_a_2000_word_sentence_is_windowed_and_every_word_predicted_once(tmp_path, tiny_model):
    from trainer.training.predict import predict

    model, featurizer = tiny_model
    words = [f"Paris{i % 7}" if i % 5 == 0 else "the" for i in range(2000)]
    path = _write(tmp_path, "".join(f"{w} {'B-LOC' if i % 5 == 0 else 'O'}\n" for i, w in enumerate(words)))
    sentence, = read_corpus(path).sentences
    assert len(sentence.words) == 2000
    windows = featurizer.encode([sentence])
    assert len(windows) >= 2000 // 30 and all(len(w) <= 32 for w in windows)
    owned = [word for w in windows for word in w.words]
    assert owned == list(range(2000))  # each word labelled in exactly one window, in order
    tags, = predict(model, featurizer, [sentence], batch_size=64)
    assert len(tags) == 2000 and set(tags) <= set(LABELS)


def test_punctuation_only_and_invisible_words_are_read_and_predicted(tmp_path, tiny_model):
    from trainer.training.predict import predict

    model, featurizer = tiny_model
    # "\u200b" (zero-width space) is no whitespace to str.split but tokenises to nothing.
    path = _write(tmp_path, ". O\n, O\n!!! O\n... O\n\n\u200b O\n-- O\n")
    corpus = read_corpus(path)
    assert [s.words for s in corpus.sentences] == [(".", ",", "!!!", "..."), ("\u200b", "--")]
    assert featurizer.word_pieces(corpus.sentences[1:])[0][0] == [featurizer._unk]
    tags = predict(model, featurizer, corpus.sentences)
    assert [len(t) for t in tags] == [4, 2]


# --------------------------------------------------------------------------------- configs
# (override(s), fragments the message holds)
CONFIG_ERRORS = [
    (["train.meta_batchsize=3"], ["unknown key 'train.meta_batchsize'", "allowed keys here", "train.meta_batch_size"]),
    (["nosection.key=1"], ["unknown key 'nosection'", "train"]),
    (["train.meta_batch_size=abc"], ["train.meta_batch_size: expected an integer, got 'abc'"]),
    (["train.meta_batch_size=null"], ["train.meta_batch_size: expected an integer, got None"]),
    (["model.dropout=true"], ["model.dropout: expected a number, got True"]),
    (["train.seeds=5"], ["train.seeds: expected a list, got 5"]),
    (["train=5"], ["train: expected a mapping of"]),
    (["train.meta_lr=-1"], ["train.meta_lr: must be positive"]),
    (["train.inner_lr=0"], ["train.inner_lr: must be positive"]),
    (["adapt.adapt_lr=-1e-5"], ["adapt.adapt_lr: must be positive"]),
    (["train.mask_ratio=1.5"], ["train.mask_ratio: must be in [0, 1]"]),
    (["train.mask_ratio=-0.1"], ["train.mask_ratio: must be in [0, 1]"]),
    (["data.targets=[]"], ["data.targets: name at least one target language"]),
    (["data.targets=[xx]"], ["'xx' has no entry in data.target_files", "add data.target_files.xx=PATH"]),
    (["retrieval.k=0"], ["retrieval.k: must be at least 1"]),
    (["retrieval.pooling=max"], ["retrieval.pooling: 'max' is not allowed; choose one of 'cls', 'mean'"]),
    (["model.window_context=100"], ["model.window_context: must be between 0 and half of model.max_length (64)"]),
    (["train.meta_batch_size"], ["write it as section.key=value"]),
    (["train.meta_lr=.inf"], ["train.meta_lr: expected a finite number, got inf"]),
    (["train.inner_lr=.nan"], ["train.inner_lr: expected a finite number, got nan"]),
    (["adapt.adapt_lr=1e999"], ["adapt.adapt_lr: expected a finite number, got inf"]),
    (["cluster.cpus_per_worker=-2"], ["cluster.cpus_per_worker: must be 0 or more"]),
    (["cluster.cpus_per_actor=-1"], ["cluster.cpus_per_actor: must be 0 or more"]),
    (["cluster.gpus_per_actor=1.5"], ["cluster.gpus_per_actor: 1.5: amounts above 1 must be whole numbers"]),
    (["cluster.num_workers=-1"], ["cluster.num_workers: must be 0 (one process, no Ray Train) or more"]),
    (["cluster.address=http://127.0.0.1:8265"], ["cluster.address: 'http://127.0.0.1:8265' is not a Ray address",
                                                  "`ray job submit`"]),
    (["retrieval.ivf_nlist=0"], ["retrieval.ivf_nlist: must be at least 1 (IVF lists)"]),
    (["retrieval.ivf_nprobe=300"], ["retrieval.ivf_nprobe: must be between 1 and retrieval.ivf_nlist (256)"]),
    (["data.targets=[es, nl, es]"], ["data.targets: 'es' is named more than once"]),
    (["data.misc_to_o=[fr, fr]"], ["data.misc_to_o: 'fr' is named more than once"]),
    (["data.target_files.es="], ["data.target_files.es: give a corpus path"]),
    (["train.seeds=[95, 95]"], ["train.seeds: seed 95 is given more than once"]),
    (["train.seeds=[-1]"], ["train.seeds: seed -1 must be in [0, 2**32)"]),
    (["adapt.lambda_max=-1"], ["adapt.lambda_max: must be 0 or more"]),
    (["mlflow.experiment="], ["mlflow.experiment: give an experiment name"]),
    (["mlflow.tracking_uri=mongodb://h/x"], ["mlflow.tracking_uri: 'mongodb://h/x': unknown scheme 'mongodb'"]),
    (["mlflow.tracking_uri=sqlite:////no/such/dir/m.db"],
     ["mlflow.tracking_uri: 'sqlite:////no/such/dir/m.db': the folder /no/such/dir of the sqlite store does not exist"]),
    (["mlflow.tracking_uri=sqlite://"], ["name a database file"]),
    (["model.name_or_path=/no/such/model"], ["model.name_or_path: '/no/such/model' is not a folder"]),
    (["model.name_or_path=bert base!"], ["model.name_or_path: 'bert base!' is neither a folder nor a hub id"]),
    (["data.target_files={es: a.txt, es: b.txt}"], ["duplicate key 'es' (first at line 1)"]),
]


@pytest.mark.parametrize("overrides, fragments", CONFIG_ERRORS, ids=[c[0][0] for c in CONFIG_ERRORS])
def test_bad_setting_names_the_key_and_what_is_allowed(overrides, fragments):
    with pytest.raises(ValueError) as err:
        load_job_config(overrides=overrides)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize("text, fragments", [
    ("trian:\n  meta_lr: 1e-4\n", ["bad.yaml:1: unknown key 'trian'"]),
    ("- train\n- adapt\n", ["bad.yaml: expected a mapping of sections at the top level"]),
    ("train: [unclosed\n", ["bad.yaml is not valid YAML"]),
    ("train:\n  meta_lr: fast\n", ["bad.yaml:2: train.meta_lr: expected a number, got 'fast'"]),
    ("train:\n  meta_lr: 1.0e-4\n  meta_lr: 1.0e-3\n", ["bad.yaml:3: duplicate key 'train.meta_lr' (first at line 2)",
                                                     "the last one would silently win"]),
    ("model:\n  dropout: 0.1\ntrain: {}\nmodel:\n  max_length: 64\n", ["bad.yaml:4: duplicate key 'model' (first at line 1)"]),
    ("train:\n  meta_lr: .inf\n  seeds: [1, 1]\n", ["2 problems in the configuration",
                                                   "bad.yaml:2: train.meta_lr: expected a finite number, got inf",
                                                   "train.seeds: seed 1 is given more than once"]),
])
def test_bad_config_file_is_named(tmp_path, text, fragments):
    path = _write(tmp_path, text, "bad.yaml")
    with pytest.raises(ValueError) as err:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_a_config_path_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=rf"config file {tmp_path} cannot be read \(Is a directory\); give a readable"):
        load_config(tmp_path)


def test_a_file_store_is_refused_unless_mlflow_allows_it(monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"mlflow.tracking_uri: './mlruns' is a file store, which MLflow 3 refuses"):
        load_job_config(overrides=["mlflow.tracking_uri=./mlruns"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert load_job_config(overrides=["mlflow.tracking_uri=./mlruns"]).mlflow.tracking_uri == "./mlruns"


@pytest.mark.parametrize("config_json, overrides, fragment", [
    ('{"num_hidden_layers": 6}', ["model.num_frozen_layers=99"],
     "model.num_frozen_layers: 99, but the encoder in {model} has 6 layers (config.json); use 0 to 6"),
    ('{"num_hidden_layers": 6, "max_position_embeddings": 64}', ["model.num_frozen_layers=1"],
     "model.max_length: 128, but the encoder in {model} takes at most 64 positions"),
    (None, [], "model.name_or_path: the folder {model} holds no config.json"),
    ('{"num_hidden', [], "model.name_or_path: {model}/config.json cannot be read as JSON"),
])
def test_model_settings_are_checked_against_the_encoders_own_config(tmp_path, config_json, overrides, fragment):
    model = tmp_path / "encoder"
    model.mkdir()
    if config_json is not None:
        (model / "config.json").write_text(config_json)
    with pytest.raises(ValueError) as err:
        load_job_config(overrides=[f"model.name_or_path={model}", *overrides])
    assert fragment.format(model=model) in str(err.value), str(err.value)


def test_values_at_the_edge_of_their_range_are_accepted(tmp_path):
    model = tmp_path / "encoder"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 3, "max_position_embeddings": 128}')
    cfg = load_job_config(overrides=[f"model.name_or_path={model}", "model.num_frozen_layers=3", "cluster.num_workers=0",
                                 "cluster.gpus_per_actor=0.25", "cluster.cpus_per_actor=2", "retrieval.ivf_nprobe=256",
                                 f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", "cluster.address=127.0.0.1:6379"])
    assert cfg.cluster.num_workers == 0 and cfg.model.num_frozen_layers == 3


def _sentences(texts: list[str]) -> list[Sentence]:
    return [Sentence(tuple(t.split()), ("O",) * len(t.split())) for t in texts]


def test_k_larger_than_the_source_pool_names_retrieval_k():
    from retrieval.tasks import source_support, target_support

    rng = np.random.default_rng(0)
    source = _sentences(["a b", "c d", "e f"])
    xb = rng.normal(size=(3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k=3 supports were asked; lower retrieval\.k or add source sentences"):
        source_support(xb, source, k=3)
    assert source_support(xb, source, k=2).shape == (3, 2)
    # Duplicates do not count as supports: "a b" has only one other distinct sentence.
    dup = _sentences(["a b", "a b", "a b", "c d"])
    with pytest.raises(ValueError, match=r"only 1 other distinct sentences.*retrieval\.k"):
        source_support(rng.normal(size=(4, 8)).astype(np.float32), dup, k=2)
    with pytest.raises(ValueError, match=r"k=3 \+ 1 dropped supports asked of 3 source sentences; lower retrieval\.k"):
        target_support(xb[:1], xb, k=3, drop_top1=True)


# ---------------------------------------------------------------------------------- models


def test_a_missing_model_folder_names_model_name_or_path(tmp_path):
    from retrieval.embed import Embedder
    from trainer.modules.model import load_encoder, load_tokenizer

    missing = str(tmp_path / "no-model")
    for load in (load_encoder, load_tokenizer, Embedder):
        with pytest.raises(ValueError, match=r"no-model' is not a folder; set model\.name_or_path"):
            load(missing)


def _hub_cache(root, repo: str, config: str) -> None:
    """A Hugging Face cache as the hub client writes it: refs/main naming a snapshot with config.json."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text(config)


def test_a_hub_id_must_resolve_before_the_cluster_starts(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from jobs.environment import hub_problems

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hub_cache(tmp_path / "hub", "someone/ner-encoder", '{"num_hidden_layers": 4}')
    _hub_cache(tmp_path / "hub", "someone/broken", "{not json")
    assert hub_problems("someone/ner-encoder") == []  # cached: no network needed
    assert hub_problems(str(tmp_path)) == []  # a folder is check_environment's to check
    [broken] = hub_problems("someone/broken")
    assert broken.startswith("model.name_or_path: ") and "config.json cannot be read as JSON" in broken
    [offline] = hub_problems("someone/not-cached")
    assert "'someone/not-cached' is not in the local Hugging Face cache" in offline and "HF_HUB_OFFLINE" in offline


def test_a_job_on_a_hub_id_that_cannot_resolve_stops_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    result = _job(["jobs.meta_train", "--out", str(out), "model.name_or_path=someone/not-cached",
                   f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *_synthetic_overrides(tmp_path / "data")],
                  env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    _one_clear_line(result, "model.name_or_path: 'someone/not-cached' is not in the local Hugging Face cache")
    assert "Ray" not in result.stderr and not out.exists()  # refused before --out is created


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tiny_bert):
    from retrieval.embed import Embedder
    from trainer.modules.model import load_tokenizer

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert) / name, folder / name)
    # Without the check, transformers builds a 5-token vocabulary and every word becomes [UNK].
    for load in (load_tokenizer, Embedder):
        with pytest.raises(ValueError, match=r"holds no tokenizer files.*tokenizer\.save_pretrained"):
            load(folder)


@pytest.fixture()
def checkpoint(tmp_path, tiny_model):
    from trainer.training.checkpoint import save_checkpoint

    model, featurizer = tiny_model
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer=featurizer.tokenizer)


def test_checkpoint_labels_that_do_not_fit_the_classifier_are_refused(checkpoint):
    from trainer.training.checkpoint import load_model

    (checkpoint / "labels.json").write_text(json.dumps(["O", "B-PER", "I-PER"]))
    with pytest.raises(ValueError, match=r"the weights do not fit labels\.json \(3 labels\)"):
        load_model(checkpoint)


def test_damaged_checkpoint_files_are_named(checkpoint, tmp_path):
    from trainer.training.checkpoint import load_model

    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read .*cut short, save the checkpoint again"):
        load_model(checkpoint)
    (checkpoint / "metaner.json").write_text('{"format": 1, "conf')
    with pytest.raises(ValueError, match=r"metaner\.json or labels\.json is not valid JSON"):
        load_model(checkpoint)
    (checkpoint / "metaner.json").unlink()
    with pytest.raises(ValueError, match=r"is not a metaner checkpoint: metaner\.json is missing"):
        load_model(checkpoint)
    with pytest.raises(ValueError, match=r"no-ckpt: no such folder; give the folder a training job wrote"):
        load_model(tmp_path / "no-ckpt")


def test_pickled_weights_file_is_refused_without_running_it(checkpoint, tmp_path):
    import torch
    from test_model import _Payload

    from trainer.training.checkpoint import load_model

    marker = tmp_path / "pwned"
    torch.save({"weight": _Payload(str(marker))}, checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        load_model(checkpoint)
    assert not marker.exists()


# ----------------------------------------------------------------------------------- paths


@pytest.fixture()
def under_a_file(tmp_path) -> Path:
    """A path below a regular file: not creatable even by root (tests run as root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker / "sub"


def test_unwritable_output_folders_name_their_setting(under_a_file):
    from cluster.adapt_pool import UnitStore
    from retrieval.cache import RetrievalCache
    from trainer.utils.paths import make_output_dir

    cases = [(lambda: make_output_dir(under_a_file, "--out"), "--out"),
             (lambda: RetrievalCache(under_a_file), "retrieval.cache_dir"),
             (lambda: UnitStore(under_a_file), "adapter work folder"),
             (lambda: make_output_dir(under_a_file.parent, "--out"), "--out")]
    for make, setting in cases:
        with pytest.raises(ValueError) as err:
            make()
        message = str(err.value)
        assert message.startswith(f"{setting}") or f"{setting}" in message, message
        assert "is a file, not a folder" in message and "choose a writable folder" in message, message


def test_checkpoint_below_a_file_is_refused_before_writing(under_a_file, tiny_model):
    from trainer.training.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match=r"checkpoint folder .*ckpt: cannot write to the folder .*a part of it is a file"):
        save_checkpoint(under_a_file / "ckpt", tiny_model[0])


# ------------------------------------------------------------------------------------- CLI


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_cli_inspect_refuses_bad_files_with_exit_2_and_one_line(tmp_path):
    cases = [
        (_write(tmp_path, "John B-PER\nSmith Q-PER\n", "tag.txt"), ":2: unknown tag 'Q-PER'"),
        (_write(tmp_path, "John B-PER\n".encode("utf-16"), "u16.txt"), ":1: the file holds NUL bytes"),
        (_write(tmp_path, b"", "empty.txt"), ": the file is empty"),
        (tmp_path / "missing.txt", ": no such file"),
        (tmp_path, ": is a folder, not a corpus file"),
    ]
    for path, expected in cases:
        result = _run("jobs.cli", "inspect", str(path))
        assert result.returncode == 2, (path, result.stderr)
        assert "Traceback" not in result.stderr and f"{path}{expected}" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("argv, expected", [
    (["jobs.meta_train", "train.meta_lr=-1"], "train.meta_lr: must be positive"),
    (["jobs.cli", "meta-train", "train.mask_ratio=2"], "train.mask_ratio: must be in [0, 1]"),
    (["jobs.evaluate", "--checkpoint", "x", "retrieval.k=0"], "retrieval.k: must be at least 1"),
    (["jobs.pipeline", "data.targets=[]"], "data.targets: name at least one target language"),
    (["jobs.meta_train", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
])
def test_jobs_refuse_bad_settings_before_starting_work(argv, expected):
    result = _run(*argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr


def _one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if not line.startswith("WARNING")]) == 1, result.stderr


@pytest.mark.parametrize("kind, problem", [(k, p) for k, p, _ in SPECIAL], ids=[c[0] for c in SPECIAL])
def test_cli_inspect_and_score_refuse_special_paths_in_one_line(tmp_path, kind, problem):
    path = _special(kind, tmp_path)
    for command in ("inspect", "score"):
        _one_clear_line(_run("jobs.cli", command, path), f"{path}: {problem}")


# ----------------------------------------------------------------------------------- score
# (id, content, extra arguments, line named (None: the file), fragments)
SCORE_ERRORS = [
    ("unknown-predicted-tag", "John B-PER B-PER\nSmith I-PER Q-PER\n", [], 2,
     ["unknown predicted tag 'Q-PER' (column 3 of 3)", "Tags must be O or B-/I- with one of PER, LOC, ORG, MISC"]),
    ("unknown-gold-tag", "John B-PERSON B-PER\n", [], 1, ["the gold column (column 2 of 3) holds 'B-PERSON'"]),
    ("original-conll-without-prediction", "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n", [], 3,
     ["holds 'I-NP', not an NER tag", "the prediction column is missing", "the predicted tag last"]),
    ("chunk-tags-both-columns", "EU I-NP I-NP\nrejects I-VP I-VP\n", [], 1, ["unknown gold tag 'I-NP'"]),
    ("swapped-token-and-gold", "B-PER John B-PER\n", [], 1, ["holds 'John'", "or the columns are swapped"]),
    ("two-columns", "John B-PER\n", [], 1, ["expected `token ... gold pred`", "(2 columns)"]),
    ("column-count-changes", "John B-PER B-PER\n\nSmith NNP B-PER B-PER\n", [], 3,
     ["4 columns, but line 1 has 3", "Give every token line the same columns"]),
    ("official-x-label", "John B-PER B-PER\nSmith I-PER X\n", [], 2, ["unknown predicted tag 'X'", "--special-to-o"]),
    ("other-entity-type", "May B-DATE B-DATE\n", [], 1, ["unknown gold tag 'B-DATE'", "--types PER,LOC,ORG,MISC,DATE"]),
    ("lowercase-tag", "john b-per b-per\n", [], 1, ["unknown gold tag 'b-per'"]),
    ("empty-file", "\n\n", [], None, ["the file is empty"]),
    ("utf-16", "John B-PER B-PER\n".encode("utf-16"), [], 1, ["NUL bytes"]),
    ("bad-types-option", "John B-PER B-PER\n", ["--types", "PER,,B-X"], None, ["--types 'PER,,B-X'"]),
]


@pytest.mark.parametrize("content, extra, line, fragments", [c[1:] for c in SCORE_ERRORS], ids=[c[0] for c in SCORE_ERRORS])
def test_score_refuses_what_is_not_token_gold_pred(tmp_path, content, extra, line, fragments):
    path = _write(tmp_path, content, "pred.txt")
    result = _run("jobs.cli", "score", str(path), *extra)
    where = "" if extra else f"{path}:{line}: " if line else f"{path}: "
    _one_clear_line(result, where)
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert "overall" not in result.stdout


@pytest.mark.parametrize("content, extra, f1", [
    ("John B-PER B-PER\rSmith I-PER I-PER\r\rin O O\r", [], 100.0),  # CR line ends
    ("John B-PER B-PER\r\nSmith I-PER X\r\n", ["--special-to-o"], 0.0),  # X read as O: PER missed
    ("[CLS] O [CLS]\nMay B-DATE B-DATE\n[SEP] O [SEP]\n", ["--special-to-o", "--types", "DATE"], 100.0),
])
def test_score_reads_valid_variants(tmp_path, content, extra, f1):
    path = _write(tmp_path, content, "pred.txt")
    result = _run("jobs.cli", "score", str(path), "--json", *extra)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout)["f1"] == pytest.approx(f1)


# ------------------------------------------------------------------------------------ jobs


def _job(args: list[str], env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("METANER_DATA", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**environment, **(env or {})})


def test_a_job_with_a_bad_tracking_store_stops_before_writing(tmp_path):
    out = tmp_path / "out"
    result = _job(["jobs.meta_train", "--out", str(out), "mlflow.tracking_uri=sqlite:////no/such/folder/m.db"])
    _one_clear_line(result, "mlflow.tracking_uri: 'sqlite:////no/such/folder/m.db': the folder /no/such/folder")
    assert not out.exists() and not Path("/no/such/folder").exists()
    result = _job(["jobs.meta_train", "--out", str(out)], env={"MLFLOW_TRACKING_URI": "mongodb://x"})
    _one_clear_line(result, "MLFLOW_TRACKING_URI: 'mongodb://x': unknown scheme 'mongodb'")
    assert not out.exists()


def test_a_job_config_file_with_a_repeated_key_is_refused(tmp_path):
    config = _write(tmp_path, "train:\n  meta_lr: 1.0e-4\n  num_meta_steps: 10\n  meta_lr: 1.0e-3\n", "job.yaml")
    result = _job(["jobs.pipeline", "--config", str(config), "--out", str(tmp_path / "out")])
    _one_clear_line(result, f"config file {config}:4: duplicate key 'train.meta_lr' (first at line 2)")


def test_several_problems_are_reported_at_once_one_line_each(tmp_path):
    result = _job(["jobs.meta_train", "--out", str(tmp_path / "out"), "train.meta_lr=.inf", "cluster.cpus_per_actor=-1",
                   "data.targets=[es, es]"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 3 problems in the configuration:" and len(lines) == 4, result.stderr
    for line in ("  train.meta_lr: expected a finite number, got inf", "  cluster.cpus_per_actor: must be 0 or more",
                 "  data.targets: 'es' is named more than once; name each target language once"):
        assert line in lines, result.stderr


def _synthetic_overrides(root: Path) -> list[str]:
    from jobs.demo import synthetic_data

    files = synthetic_data(root)
    return ([f"data.root={root}", "data.source_train=en/train.txt", "data.source_dev=en/valid.txt", "train.seeds=[95]"]
            + [f"data.target_files.{lang}={path}" for lang, path in files.items()])


def _model_folder(root: Path) -> str:
    """A folder that passes the model checks (config.json), for jobs stopped before any model loads."""
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text('{"num_hidden_layers": 12}')
    return f"model.name_or_path={root / 'model'}"


def test_a_missing_corpus_stops_the_pipeline_before_ray_starts(tmp_path):
    started = time.monotonic()
    result = _job(["jobs.pipeline", "--out", str(tmp_path / "out"), f"data.root={tmp_path / 'none'}",
                   f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", _model_folder(tmp_path)])
    _one_clear_line(result, f"{tmp_path / 'none'}/meta-cross/en/train.txt: no such file. Check the path")
    assert "Ray" not in result.stderr and time.monotonic() - started < 60


def test_a_seed_folder_made_with_other_inputs_stops_the_job_naming_the_difference(tmp_path):
    out = tmp_path / "out"
    (out / "ours" / "seed95").mkdir(parents=True)
    (out / "ours" / "seed95" / "inputs.json").write_text(json.dumps({"hash": "0", "values": {"train.meta_lr": 1.0}}))
    (out / "ours" / "seed95" / "scores.json").write_text(json.dumps({"f1": {"es": 99.0}, "wall_s": 1}))
    result = _job(["jobs.pipeline", "--out", str(out), f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                   *_synthetic_overrides(tmp_path / "data"), _model_folder(tmp_path)])
    _one_clear_line(result, f"{out / 'ours' / 'seed95'} holds work made with other inputs: ")
    assert "use another --out, or delete" in result.stderr and "Ray" not in result.stderr


def test_low_resource_refuses_a_folder_made_from_other_target_training_data(tmp_path):
    """Table 6's seed folders carry a record too: changing a target's training file is named."""
    from jobs.common import CONFIGS, inputs_record, write_record
    from jobs.variants import variant_config
    from trainer.config import load_config

    common = _synthetic_overrides(tmp_path / "data") + ["data.targets=[es]", "data.target_train_files.es=es/test.txt",
                                                        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                                                        _model_folder(tmp_path)]
    out = tmp_path / "out"
    cfg = load_config(CONFIGS / "low_resource.yaml", common)
    record = inputs_record(variant_config(cfg, "base"), 95, extra_files={"target_train.es": "es/test.txt"})
    write_record(out / "base" / "seed95", record)
    (tmp_path / "data" / "es" / "train.txt").write_text((tmp_path / "data" / "es" / "test.txt").read_text() + "\nX O\n")
    result = _job(["jobs.low_resource", "--out", str(out), *common, "data.target_train_files.es=es/train.txt"],
                  env={"HF_HUB_OFFLINE": "1"})
    _one_clear_line(result, f"{out / 'base' / 'seed95'} holds work made with other inputs: input.target_train.es was ")
    assert "Ray" not in result.stderr


def test_finished_rows_are_reused_only_for_the_same_inputs(tmp_path):
    from jobs.common import write_record
    from jobs.pipeline import _done, plan
    from trainer.config import load_config, with_overrides

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"num_hidden_layers": 2}')
    cfg = load_config(overrides=_synthetic_overrides(tmp_path / "data")
                      + [f"model.name_or_path={tmp_path / 'model'}", "model.num_frozen_layers=1"])
    out = tmp_path / "out"
    planned = plan(cfg, ["base", "ours"], out)
    for (name, seed), (_, record) in planned.items():
        write_record(out / name / f"seed{seed}", record)
    record = planned["ours", 95][1]
    (out / "ours" / "seed95" / "scores.json").write_text(json.dumps({"f1": {}, "wall_s": 0, "inputs": record["hash"]}))
    assert plan(cfg, ["base", "ours"], out).keys() == planned.keys()  # same inputs: reused
    assert _done(out / "ours" / "seed95", record)["inputs"] == record["hash"]
    with pytest.raises(ValueError, match=r"ours/seed95 holds work made with other inputs: train.mask_ratio was 0.2, now 0.5"):
        plan(with_overrides(cfg, ["train.mask_ratio=0.5"]), ["ours"], out)
    (tmp_path / "model" / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"input.model was '[0-9a-f]+', now '[0-9a-f]+'"):
        plan(cfg, ["ours"], out)
    with pytest.raises(ValueError, match=r"scores.json was made from other inputs"):
        _done(out / "ours" / "seed95", {**record, "hash": "other"})


def test_demo_keeps_each_data_source_in_its_own_folder(tmp_path):
    from jobs.demo import data_folder

    synthetic, real = data_folder(tmp_path, None), data_folder(tmp_path, tmp_path / "data")
    assert synthetic != real and synthetic.parent == real.parent == tmp_path.resolve()
    assert data_folder(tmp_path, tmp_path / "data" / ".." / "data") == real
    result = _job(["jobs.demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none")])
    _one_clear_line(result, f"--data {tmp_path / 'none'}: no such folder")


# -------------------------------------------------------------------------------- fuzzing

_LINE = st.one_of(
    st.builds(lambda w, t: f"{w} {t}", st.sampled_from(["John", "Köln", ".", "-", "a_b", "東京"]),
              st.sampled_from(LABELS)),
    st.builds(lambda w, t: f"{w}\t{t}", st.sampled_from(["New York", "x"]), st.sampled_from(LABELS)),
    st.builds(lambda w, t: f"{w} NNP I-NP {t}", st.sampled_from(["EU", "rejects"]), st.sampled_from(LABELS)),
    st.sampled_from(["", "  ", "-DOCSTART- -X- O", "-DOCSTART-", "John", "John X-PER", "John B-FOO",
                     "a b c d e f O", "\t", "John\t", " -DOCSTART- O", "é O"]),
    st.text(max_size=12),
)


def _valid_bio(tags: tuple[str, ...]) -> bool:
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            return False
        prev = tag
    return True


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, max_size=30), bom=st.booleans(), crlf=st.booleans(),
       encoding=st.sampled_from(["utf-8", "latin-1"]), misc=st.booleans())
def test_random_line_mixes_read_or_raise_corpus_error(lines, bom, crlf, encoding, misc):
    text = ("\r\n" if crlf else "\n").join(lines)
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding, errors="replace")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.txt"
        path.write_bytes(raw)
        try:
            corpus = read_corpus(path, misc_to_o=misc)
        except CorpusError as err:
            assert str(path) in str(err)
            return
    assert corpus.sentences
    for sentence in corpus.sentences:
        assert len(sentence.words) == len(sentence.tags) > 0
        assert set(sentence.tags) <= set(LABELS) and _valid_bio(sentence.tags), sentence.tags
        assert all(w and not w.isspace() for w in sentence.words), sentence.words
        if misc:
            assert not any(t.endswith("-MISC") for t in sentence.tags)

"""Malformed inputs of every kind end in one clear message naming what is wrong and what to do;
the harmless oddities of real files are read correctly instead.

Also referenced, not repeated here: a label set other than the checkpoint's and a pickled trainer
state (tests/test_model.py: test_a_different_label_set_is_refused_naming_both,
test_trainer_state_round_trips_and_pickled_objects_are_refused).
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from trainer.config import load_config
from trainer.corpus import LABELS, CorpusError, Sentence, read_corpus


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


@pytest.fixture(scope="module")
def tiny_model(tiny_bert, tiny_tokenizer):
    from trainer.features import Featurizer
    from trainer.model import NerModel

    model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0)
    return model, Featurizer(tiny_tokenizer, max_length=32, context=8)


def test_a_2000_word_sentence_is_windowed_and_every_word_predicted_once(tmp_path, tiny_model):
    from trainer.adapt import predict

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
    from trainer.adapt import predict

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
]


@pytest.mark.parametrize("overrides, fragments", CONFIG_ERRORS, ids=[c[0][0] for c in CONFIG_ERRORS])
def test_bad_setting_names_the_key_and_what_is_allowed(overrides, fragments):
    with pytest.raises(ValueError) as err:
        load_config(overrides=overrides)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize("text, fragments", [
    ("trian:\n  meta_lr: 1e-4\n", ["bad.yaml:1: unknown key 'trian'"]),
    ("- train\n- adapt\n", ["bad.yaml: expected a mapping of sections at the top level"]),
    ("train: [unclosed\n", ["bad.yaml is not valid YAML"]),
    ("train:\n  meta_lr: fast\n", ["bad.yaml:2: train.meta_lr: expected a number, got 'fast'"]),
])
def test_bad_config_file_is_named(tmp_path, text, fragments):
    path = _write(tmp_path, text, "bad.yaml")
    with pytest.raises(ValueError) as err:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


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
    from trainer.model import load_encoder, load_tokenizer

    missing = str(tmp_path / "no-model")
    for load in (load_encoder, load_tokenizer, Embedder):
        with pytest.raises(ValueError, match=r"no-model' is not a folder; set model\.name_or_path"):
            load(missing)


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tiny_bert):
    from retrieval.embed import Embedder
    from trainer.model import load_tokenizer

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
    from trainer.checkpoint import save_checkpoint

    model, featurizer = tiny_model
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer=featurizer.tokenizer)


def test_checkpoint_labels_that_do_not_fit_the_classifier_are_refused(checkpoint):
    from trainer.checkpoint import load_model

    (checkpoint / "labels.json").write_text(json.dumps(["O", "B-PER", "I-PER"]))
    with pytest.raises(ValueError, match=r"the weights do not fit labels\.json \(3 labels\)"):
        load_model(checkpoint)


def test_damaged_checkpoint_files_are_named(checkpoint, tmp_path):
    from trainer.checkpoint import load_model

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
    from trainer.checkpoint import load_model

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
    from trainer.paths import make_output_dir

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
    from trainer.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match=r"checkpoint folder .*ckpt: cannot write to the folder .*a part of it is a file"):
        save_checkpoint(under_a_file / "ckpt", tiny_model[0])


# ------------------------------------------------------------------------------------- CLI


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


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

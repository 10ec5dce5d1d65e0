"""Readers against the real shared corpora (published counts) and against malformed files."""
import logging

import pytest
from conftest import needs_data

from trainer.data.corpus import CorpusError, Sentence, entity_spans, read_corpus

# (path, misc_to_o, sentences, entities) as published (see ../shared/data/README.md and the paper).
PUBLISHED = [
    ("meta-cross/en/train.txt", False, 14041, 23499),
    ("meta-cross/en/valid.txt", False, 3250, 5942),
    ("meta-cross/en/test.txt", False, 3453, 5648),
    ("meta-cross/de/train.txt", False, 12152, 11851),
    ("meta-cross/de/test.txt", False, 3005, 3673),
    ("meta-cross/nl/train.txt", False, 15806, 13344),
    ("meta-cross/nl/test.txt", False, 5195, 3941),
    ("meta-cross/es/train.txt", False, 8323, 18798),
    # 3,558 B- tags; one entity starts with I-MISC and is read as a B- (conlleval counts it too).
    ("meta-cross/es/test.txt", False, 1517, 3559),
    ("raw/conll2003/eng.testb", False, 3453, 5648),
]


@needs_data
@pytest.mark.parametrize("path, misc, sentences, entities", PUBLISHED)
def test_published_counts(data_root, path, misc, sentences, entities):
    stats = read_corpus(data_root / path, misc_to_o=misc).stats()
    assert (stats["sentences"], stats["entities"]) == (sentences, entities)


@needs_data
@pytest.mark.parametrize("raw, processed, encoding, columns, scheme", [
    ("raw/conll2002/ned.testb", "meta-cross/nl/test.txt", "latin-1", 3, "IOB2"),
    ("raw/conll2003/deu.testb", "meta-cross/de/test.txt", "latin-1", 5, "IOB1"),
    ("raw/conll2002/esp.testb", "meta-cross/es/test.txt", "latin-1", 2, "IOB2"),
    ("raw/conll2003/eng.testb", "meta-cross/en/test.txt", "utf-8", 4, "IOB1"),
])
def test_raw_distribution_equals_processed(data_root, raw, processed, encoding, columns, scheme):
    a, b = read_corpus(data_root / raw), read_corpus(data_root / processed)
    assert (a.info.encoding, a.info.columns, a.info.scheme) == (encoding, columns, scheme)
    assert [s.tags for s in a.sentences] == [s.tags for s in b.sentences]
    # ned.testb carries mangled bytes (0x81, 0x82) where the processed file has "ë", "ü", "é"...;
    # every sentence without it is identical word for word.
    differing = [x for x, y in zip(a.sentences, b.sentences) if x.words != y.words]
    assert all(any(ch in w for ch in "\x81\x82" for w in x.words) for x in differing)
    assert len(differing) < 0.06 * len(b.sentences)


@needs_data
def test_ned_docstart_is_dropped_inside_sentence(data_root):
    corpus = read_corpus(data_root / "raw/conll2002/ned.testb")
    assert corpus.info.docstart_dropped == 118
    assert all("-DOCSTART-" not in s.words for s in corpus.sentences)


@needs_data
def test_iob1_conversion_is_reported(data_root):
    info = read_corpus(data_root / "raw/conll2003/eng.testb").info
    assert info.scheme == "IOB1" and info.converted and info.docstart_dropped == 231


@needs_data
def test_europeana_split_and_io_conversion(data_root):
    path = data_root / "raw/europeana/enp_FR.bnf.bio"
    full = read_corpus(path)
    train, test = read_corpus(f"{path}#train", misc_to_o=True), read_corpus(path, misc_to_o=True, split="test")
    assert full.info.segmented_at_period and full.info.scheme == "IO" and full.info.converted
    assert len(full.sentences) == 11902 and full.dropped_tail == 14
    assert (len(train.sentences), len(test.sentences)) == (9527, 2375)
    assert train.sentences + test.sentences == full.sentences
    assert all(s.words[-1] == "." for s in test.sentences)
    assert all(t[:2] in ("O", "B-", "I-") for s in test.sentences for t in s.tags)


@needs_data
def test_panx_zh_tab_separated_characters(data_root):
    corpus = read_corpus(data_root / "raw/panx/dev-zh.tsv", misc_to_o=True)
    assert corpus.info.delimiter == "tab" and len(corpus.sentences) == 10000
    assert all(len(w) == 1 or w.isascii() for s in corpus.sentences[:200] for w in s.words)
    assert not any(t.endswith("MISC") for s in corpus.sentences for t in s.tags)


def _write(tmp_path, content, name="c.txt", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def test_bom_crlf_and_latin1_are_tolerated(tmp_path):
    path = _write(tmp_path, b"\xef\xbb\xbfJohn B-PER\r\nSmith I-PER\r\n\r\nin O\r\nK\xc3\xb6ln B-LOC\r\n")
    corpus = read_corpus(path)
    assert corpus.info.bom and corpus.info.crlf and corpus.sentences[1].words == ("in", "Köln")
    latin = _write(tmp_path, "in O\nKöln B-LOC\n".encode("latin-1"), "l.txt")
    corpus = read_corpus(latin)
    assert corpus.info.encoding == "latin-1" and corpus.sentences[0].words[1] == "Köln"


def test_misc_to_o(tmp_path):
    path = _write(tmp_path, "Euro B-MISC\n2000 I-MISC\nin O\nParis B-LOC\n")
    assert read_corpus(path, misc_to_o=True).sentences[0].tags == ("O", "O", "O", "B-LOC")


def test_io_tags_become_bio(tmp_path):
    path = _write(tmp_path, "A I-PER\nB I-PER\nand O\nC I-LOC\nD I-ORG\n")
    corpus = read_corpus(path)
    assert corpus.info.scheme == "IO"
    assert corpus.sentences[0].tags == ("B-PER", "I-PER", "O", "B-LOC", "B-ORG")


def test_iob2_repair_is_counted_in_a_warning(tmp_path, caplog):
    path = _write(tmp_path, "A B-PER\nB I-PER\nx O\nC B-LOC\n\nz O\nD I-ORG\nE I-ORG\n")
    with caplog.at_level(logging.WARNING):
        corpus = read_corpus(path)
    assert corpus.info.scheme == "IOB2" and corpus.info.repaired_tags == 1
    assert corpus.sentences[1].tags == ("O", "B-ORG", "I-ORG")
    assert "1 entities started with I- after O" in caplog.text


@pytest.mark.parametrize("content, line, problem", [
    ("John B-PER\nSmith\n", 2, "no tag column"),
    ("John B-PER\nSmith X-PER\n", 2, "unknown tag 'X-PER'"),
    ("John B-PER\nSmith B-FOO\n", 2, "unknown tag 'B-FOO'"),
    ("a NN O\nb NN O\nc O\nd O\ne O\n", 1, "mixed column counts"),
    ("", None, "empty"),
    ("   \n\n", None, "empty"),
    ("-DOCSTART- -X- -X- O\n\n-DOCSTART- -X- -X- O\n", None, "only -DOCSTART-"),
])
def test_malformed_input_names_file_and_line(tmp_path, content, line, problem):
    path = _write(tmp_path, content)
    with pytest.raises(CorpusError) as err:
        read_corpus(path)
    message = str(err.value)
    assert str(path) in message and problem in message
    assert err.value.line == line
    if line:
        assert f"{path}:{line}:" in message


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "nope.txt")
    path = _write(tmp_path, "a O\n\nb O\n")
    with pytest.raises(CorpusError, match="already has sentence breaks"):
        read_corpus(f"{path}#test")
    with pytest.raises(CorpusError, match="unknown split"):
        read_corpus(path, split="dev")


def test_entity_spans():
    assert entity_spans(("B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG")) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]


def test_sentence_rejects_length_mismatch():
    with pytest.raises(ValueError):
        Sentence(("a", "b"), ("O",))


def test_format_forces_stream_or_sentences(tmp_path):
    path = _write(tmp_path, "Le O\nmaire O\n. O\nParis I-LOC\nvote O\n. O\n")
    assert len(read_corpus(path).sentences) == 1  # short, no blank line: one sentence
    stream = read_corpus(path, format="stream")
    assert [s.words for s in stream.sentences] == [("Le", "maire", "."), ("Paris", "vote", ".")]
    assert stream.info.segmented_at_period and stream.sentences[1].tags[0] == "B-LOC"
    assert len(read_corpus(path, format="sentences").sentences) == 1
    with pytest.raises(CorpusError, match="unknown format"):
        read_corpus(path, format="xml")


@needs_data
def test_europeana_read_as_sentences_is_one_block(data_root):
    corpus = read_corpus(data_root / "raw/europeana/enp_FR.bnf.bio", format="sentences")
    assert len(corpus.sentences) == 1 and not corpus.info.segmented_at_period

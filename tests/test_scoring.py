"""Phrase-level scores must equal the official conlleval.pl on real test files."""
import random
import shutil
import subprocess

import pytest
from conftest import DATA, needs_data

from trainer.data.corpus import entity_spans, read_corpus
from trainer.data.scoring import read_conll, score, write_conll

CONLLEVAL = DATA / "conlleval.pl"


def _perturb(sentences, seed):
    """Drop, shift and retype some entities, and invent a few, deterministically."""
    rng = random.Random(seed)
    types = ["PER", "LOC", "ORG", "MISC"]
    out = []
    for s in sentences:
        tags = list(s.tags)
        for kind, start, end in entity_spans(s.tags):
            r = rng.random()
            if r < 0.1:
                tags[start:end] = ["O"] * (end - start)
            elif r < 0.2:
                tags[start] = "B-" + rng.choice([t for t in types if t != kind])
            elif r < 0.3 and end < len(tags) and tags[end] == "O":
                tags[end] = "I-" + kind
            elif r < 0.35:
                tags[start] = "I-" + kind  # conlleval still reads this as the start of a chunk
        if rng.random() < 0.05:
            i = rng.randrange(len(tags))
            if tags[i] == "O":
                tags[i] = "B-" + rng.choice(types)
        out.append(tags)
    return out


def _conlleval(path):
    out = subprocess.run(["perl", str(CONLLEVAL), "-d", " "], stdin=open(path), capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("accuracy"))
    # accuracy:  97.00%; precision:  80.00%; recall:  75.00%; FB1:  77.42
    parts = line.replace("%", "").replace(";", "").split()
    return float(parts[3]), float(parts[5]), float(parts[7])


@needs_data
@pytest.mark.skipif(shutil.which("perl") is None, reason="perl is needed to run conlleval.pl")
@pytest.mark.parametrize("path, seed", [("meta-cross/en/test.txt", 0), ("meta-cross/es/test.txt", 1),
                                        ("meta-cross/nl/test.txt", 2), ("raw/panx/dev-zh.tsv", 3)])
def test_scores_equal_conlleval(tmp_path, data_root, path, seed):
    corpus = read_corpus(data_root / path)
    gold = [list(s.tags) for s in corpus.sentences]
    pred = _perturb(corpus.sentences, seed)
    out = tmp_path / "pred.txt"
    write_conll(out, [s.words for s in corpus.sentences], gold, pred)
    p, r, f = _conlleval(out)
    ours = score(gold, pred)
    assert (round(ours["precision"], 2), round(ours["recall"], 2), round(ours["f1"], 2)) == (p, r, f)
    words, g2, p2 = read_conll(out)
    assert g2 == gold and p2 == pred and len(words) == len(corpus.sentences)


def test_per_type_and_all_o():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    result = score(gold, pred)
    assert result["per_type"]["PER"]["f1"] == 100.0 and result["per_type"]["LOC"]["recall"] == 0.0
    assert result["precision"] == pytest.approx(200 / 3) and result["recall"] == pytest.approx(200 / 3)
    assert score(gold, [["O"] * 4, ["O"] * 2])["f1"] == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sentence 0"):
        score([["O", "O"]], [["O"]])


def test_files_are_written_whole_or_not_at_all(tmp_path):
    """The one atomic-write helper that records, shards, units, caches and predictions use."""
    from trainer.utils.paths import atomic_file, write_atomic

    path = tmp_path / "sub" / "out.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
    with atomic_file(path, "wb") as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and len(list(path.parent.iterdir())) == 1

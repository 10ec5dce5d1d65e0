"""The demo's tiny model is the same in every process: its WordPiece vocabulary depends on the
words alone (tokenizers' own trainer breaks ties in hash order, which changed from one process to
the next, and with it the demo's results)."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

_VOCAB = """
from tokenizers import normalizers, pre_tokenizers
from jobs.synthetic import TEMPLATES, make_sentences
from jobs.tiny import wordpiece_vocab
texts = [s.words for lang in TEMPLATES for s in make_sentences(lang, 60, seed=1)]
vocab = wordpiece_vocab(texts, 500, normalizers.BertNormalizer(lowercase=False, strip_accents=False),
                        pre_tokenizers.BertPreTokenizer())
print(sorted(vocab.items(), key=lambda kv: kv[1]))
"""


def test_the_vocabulary_is_the_same_in_every_process():
    runs = [subprocess.run([sys.executable, "-c", _VOCAB], cwd=REPO, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
    vocab = dict(eval(runs[0]))  # noqa: S307 (our own output: a list of (token, id) pairs)
    assert list(vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 500
    assert any(t.startswith("##") and len(t) > 3 for t in vocab), "no merged continuation pieces"

"""Embedding, pseudo-task construction and the cache, on the tiny BERT and the toy corpus."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from retrieval.cache import RetrievalCache
from retrieval.embed import Embedder
from retrieval.index import IndexSpec, brute_force
from retrieval.tasks import (ReusedIndex, build_pseudo_tasks, duplicate_groups, retrieve_support, source_support,
                             target_support)
from trainer.data.corpus import Sentence


@pytest.fixture(scope="module")
def embedder(tiny_bert):
    return Embedder(tiny_bert, max_length=32, progress=False)


@pytest.fixture(scope="module")
def source(toy_corpus):
    """English toy sentences plus exact copies (like the repeated lines of the real train set)."""
    english = list(toy_corpus["en"])
    return english + [english[3]] * 3 + [english[10]] + [Sentence(("--",), ("O",))] * 4


def counting(embedder):
    calls = []

    def embed(sentences):
        calls.append(len(sentences))
        return embedder.embed(sentences)

    return embed, calls


# ---------------------------------------------------------------- embedding


def test_vectors_are_unit_float32_in_input_order(embedder, toy_corpus):
    sentences = toy_corpus["en"][:8]
    x = embedder.embed(sentences)
    assert x.shape == (8, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    one_by_one = np.concatenate([embedder.embed([s]) for s in sentences])
    np.testing.assert_allclose(x, one_by_one, atol=1e-5)
    assert embedder.embed([]).shape == (0, 64)


def test_mean_pooling_differs_from_cls(tiny_bert, embedder, toy_corpus):
    mean = Embedder(tiny_bert, max_length=32, pooling="mean", progress=False)
    sentences = toy_corpus["en"][:5]
    assert np.abs(mean.embed(sentences) - embedder.embed(sentences)).max() > 1e-3
    assert mean.key() != embedder.key()
    with pytest.raises(ValueError, match="pooling"):
        Embedder(tiny_bert, pooling="max")


def test_long_sentence_is_its_first_window(embedder, toy_corpus):
    words = tuple(w for s in toy_corpus["en"][:30] for w in s.words)
    long = Sentence(words, ("O",) * len(words))
    (window,) = embedder.first_windows([long])[:1]
    assert 0 < len(window.words) < len(words)
    prefix = words[:len(window.words)]
    np.testing.assert_allclose(embedder.embed([long]), embedder.embed([list(prefix)]), atol=1e-6)


def test_built_encoder_matches_folder_and_keeps_training_mode(tiny_bert, embedder, toy_corpus):
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_bert, num_labels=9)
    model.train()
    built = Embedder(model, tiny_bert, max_length=32, progress=False)
    sentences = toy_corpus["es"][:6]
    np.testing.assert_allclose(built.embed(sentences), embedder.embed(sentences), atol=1e-6)
    assert model.training
    with pytest.raises(ValueError, match="tokenizer"):
        Embedder(model)


def test_fingerprint_follows_the_weights(tiny_bert, embedder, tmp_path):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    first = Embedder(model, tiny_bert, progress=False).weights_fingerprint()
    with torch.no_grad():
        model.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert Embedder(model, tiny_bert, progress=False).weights_fingerprint() != first
    model.save_pretrained(tmp_path)
    changed = Embedder(str(tmp_path), tiny_bert, max_length=32, progress=False)
    assert changed.weights_fingerprint() != embedder.weights_fingerprint()
    assert Embedder(tiny_bert, max_length=32, progress=False).key() == embedder.key()
    # The same folder spelled another way (relative, with a trailing "/.") names the same vectors.
    other_spelling = os.path.join(os.path.relpath(tiny_bert), ".")
    assert Embedder(other_spelling, max_length=32, progress=False).key() == embedder.key()


def test_unspaced_sentence_is_embedded_as_its_joined_text(e5_tokenizer, tiny_encoder_e5_vocab):
    from dataclasses import replace

    from retrieval.cache import corpus_hash

    words = tuple("江泽民访问美国。")
    spaced = Sentence(words, ("B-PER", "I-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"))
    unspaced = replace(spaced, unspaced=True)
    embedder = Embedder(tiny_encoder_e5_vocab, e5_tokenizer, max_length=32, progress=False)
    (window,) = embedder.first_windows([unspaced])
    joined = e5_tokenizer("".join(words))["input_ids"]  # with <s> and </s>, as the encoder read text
    assert list(window.input_ids) == joined
    assert list(embedder.first_windows([spaced])[0].input_ids) != joined
    x = embedder.embed([unspaced, spaced])
    assert np.abs(x[0] - x[1]).max() > 1e-4
    np.testing.assert_allclose(x[:1], embedder.embed([Sentence(words, ("O",) * len(words), unspaced=True)]),
                               atol=1e-6)
    # The cache tells the two readings apart; a spaced corpus keeps the hash it always had.
    assert corpus_hash([unspaced]) != corpus_hash([spaced]) == corpus_hash([list(words)])


# ---------------------------------------------------------------- tasks


def test_source_support_excludes_self_and_duplicates(embedder, source):
    xb = embedder.embed(source)
    support = source_support(xb, source, k=2)
    groups = duplicate_groups(source)
    assert support.shape == (len(source), 2) and support.dtype == np.int64
    for query, ids in enumerate(support):
        assert len(set(ids.tolist())) == 2
        assert query not in ids and (groups[ids] != groups[query]).all()
    # The same as ranking every sentence by brute force and skipping the query's own text.
    _, ranked = brute_force(xb, xb, len(source))
    expected = [[i for i in row if groups[i] != groups[q]][:2] for q, row in enumerate(ranked)]
    assert support.tolist() == expected


def test_source_support_needs_enough_distinct_sentences(embedder):
    few = [Sentence(("a",), ("O",)), Sentence(("a",), ("O",)), Sentence(("b",), ("O",))]
    with pytest.raises(ValueError, match="retrieval.k"):
        source_support(embedder.embed(few), few, k=2)


def test_target_support_and_drop_top1(embedder, source, toy_corpus):
    xb, xq = embedder.embed(source), embedder.embed(toy_corpus["de"])
    _, ranked = brute_force(xq, xb, 3)
    np.testing.assert_array_equal(target_support(xq, xb, 2), ranked[:, :2])
    np.testing.assert_array_equal(target_support(xq, xb, 2, drop_top1=True), ranked[:, 1:3])


class _Counted:
    """An index builder that counts its builds and the searchers still open."""

    def __init__(self):
        self.spec, self.builds, self.open = IndexSpec("flat", device="cpu"), 0, 0

    def key(self):
        return self.spec.key()

    def build(self, xb):
        self.builds += 1
        self.open += 1
        shard, owner = self.spec.build(xb), self

        class Searcher:
            search = shard.search

            def close(self):
                owner.open -= 1

        return Searcher()


def test_one_index_serves_the_pseudo_tasks_and_every_target_set(embedder, source, toy_corpus):
    xb = embedder.embed(source)
    counted = _Counted()
    with ReusedIndex(counted) as index:
        support = source_support(xb, source, 2, index)
        targets = {lang: target_support(embedder.embed(toy_corpus[lang]), xb.copy(), 2, index=index)
                   for lang in ("de", "zh")}
        assert (counted.builds, counted.open) == (1, 1)
        other = target_support(xb[:5], xb[5:], 1, index=index)  # another xb: a new index, the first closed
        assert (counted.builds, counted.open) == (2, 1)
    assert counted.open == 0
    # Tolerance 0: the same flat search as a fresh index each time, which matches brute force.
    np.testing.assert_array_equal(support, source_support(xb, source, 2))
    for lang, ids in targets.items():
        _, ranked = brute_force(embedder.embed(toy_corpus[lang]), xb, 2)
        np.testing.assert_array_equal(ids, ranked)
    np.testing.assert_array_equal(other, brute_force(xb[:5], xb[5:], 1)[1])


# ---------------------------------------------------------------- cache


def test_second_run_does_no_encoding(embedder, source, toy_corpus, tmp_path):
    cache = RetrievalCache(tmp_path)
    embed, calls = counting(embedder)
    first = build_pseudo_tasks(source, embed, k=2, cache=cache, key=embedder.key())
    again = build_pseudo_tasks(source, embed, k=2, cache=cache, key=embedder.key())
    assert calls == [len(source)]
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, source_support(embedder.embed(source), source, 2))
    targets = toy_corpus["fr"]
    support = retrieve_support(targets, source, embed, k=2, cache=cache, key=embedder.key())
    assert calls == [len(source), len(targets)]  # the source vectors came from the cache
    np.testing.assert_array_equal(retrieve_support(targets, source, embed, k=2, cache=cache,
                                                   key=embedder.key()), support)
    assert len(calls) == 2
    assert build_pseudo_tasks(source, embedder, k=2, cache=cache).tolist() == first.tolist()
    assert len(calls) == 2


def test_changed_corpus_or_model_is_recomputed(embedder, tiny_bert, source, tmp_path):
    cache = RetrievalCache(tmp_path)
    embed, calls = counting(embedder)
    build_pseudo_tasks(source, embed, k=2, cache=cache, key=embedder.key())
    edited = list(source)
    edited[0] = Sentence(edited[0].words[:-1] + ("!",), edited[0].tags)
    build_pseudo_tasks(edited, embed, k=2, cache=cache, key=embedder.key())
    assert len(calls) == 2
    other = Embedder(tiny_bert, max_length=16, progress=False)
    build_pseudo_tasks(source, embed, k=2, cache=cache, key=other.key())
    assert len(calls) == 3
    build_pseudo_tasks(source, embed, k=3, cache=cache, key=embedder.key())
    assert len(calls) == 3  # a new k reuses the vectors


def test_half_written_entries_are_never_read(embedder, source, tmp_path):
    cache = RetrievalCache(tmp_path)
    embed, calls = counting(embedder)
    good = build_pseudo_tasks(source, embed, k=2, cache=cache, key=embedder.key())
    entries = sorted(glob.glob(str(tmp_path / "*.npy")))
    assert len(entries) == 2 and not glob.glob(str(tmp_path / "*.tmp"))
    for path in entries:  # a write cut short: a truncated entry and a stray temporary file
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        open(path + ".x.tmp", "wb").write(data)
    again = build_pseudo_tasks(source, embed, k=2, cache=cache, key=embedder.key())
    assert len(calls) == 2
    np.testing.assert_array_equal(again, good)
    assert all(os.path.getsize(p) > 0 and np.load(p).shape[0] == len(source) for p in entries)


def test_failed_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = RetrievalCache(tmp_path)
    real_save = np.save

    def save_half_then_fail(fh, array, **kwargs):
        real_save(fh, array[: len(array) // 2], **kwargs)
        raise OSError("no space left on device")

    monkeypatch.setattr("retrieval.cache.np.save", save_half_then_fail)
    with pytest.raises(OSError, match="no space"):
        cache.get_or_compute("embeddings", {"x": 1}, 4, np.float32, lambda: np.ones((4, 2)))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    stored = cache.get_or_compute("embeddings", {"x": 1}, 4, np.float32, lambda: np.ones((4, 2)))
    assert stored.shape == (4, 2) and len(glob.glob(str(tmp_path / "*.npy"))) == 1


def test_wrong_computed_shape_and_missing_key_are_named(tmp_path):
    cache = RetrievalCache(tmp_path)
    with pytest.raises(ValueError, match="expected 4 rows"):
        cache.get_or_compute("embeddings", {"x": 1}, 4, np.float32, lambda: np.ones((3, 2)))
    with pytest.raises(ValueError, match="no key"):
        build_pseudo_tasks([Sentence(("a",), ("O",))], lambda s: np.ones((1, 2), np.float32), k=1, cache=cache)

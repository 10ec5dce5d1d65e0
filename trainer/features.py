"""Sentences to model inputs: subword windows with first-subword labels, and back.

Only a word's first subword carries its label (-100 elsewhere, and on [CLS]/[SEP]). A sentence
longer than the model's window is cut into windows; each window after the first starts with the
last `context` subwords of the words before it, unlabelled, so that every word is predicted exactly
once, with left context, when the windows are merged back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .corpus import LABELS, Sentence

IGNORE = -100
# Bumped whenever the same words and tokenizer give other pieces or windows: caches of anything
# computed from windows (retrieval vectors, frozen-bottom states) carry it in their keys.
# 2: a bare sentencepiece word marker is dropped (see Featurizer._drop_bare_marker).
FEATURES_VERSION = 2
# The official code's head has 13 classes: the 9 BIO tags, X (every subword after a word's first),
# [CLS], [SEP] and [PAD] (a class it never trains on, but whose logit takes part in the softmax).
# `train.loss_positions=all` adds them, and the loss covers every position of a window.
OFFICIAL_EXTRA = ("X", "[CLS]", "[SEP]", "[PAD]")
LOSS_POSITIONS = ("first_subword", "all")


def labels_for(loss_positions: str) -> tuple[str, ...]:
    """The classifier's label set for `train.loss_positions`."""
    if loss_positions not in LOSS_POSITIONS:
        raise ValueError(f"train.loss_positions={loss_positions!r}: choose one of {', '.join(LOSS_POSITIONS)}")
    return LABELS + (OFFICIAL_EXTRA if loss_positions == "all" else ())


@dataclass(frozen=True)
class Window:
    sentence: int  # index of the sentence in the encoded list
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE except at the first subword of each word owned by the window
    words: tuple[int, ...]  # for each labelled position, in order, the word index in the sentence

    def __len__(self) -> int:
        return len(self.input_ids)


class Featurizer:
    """Tokenise with a fast Hugging Face tokenizer and cut sentences into labelled windows."""

    def __init__(self, tokenizer, max_length: int = 128, context: int = 32, labels: Sequence[str] = LABELS):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast tokenizer is needed for word alignment; load it with AutoTokenizer(use_fast=True)")
        if not 0 <= context <= (max_length - 2) // 2:
            raise ValueError(f"context ({context}) must be between 0 and half the window ({(max_length - 2) // 2})")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.context = context
        self.labels = tuple(labels)
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        # A label set with the official extra classes means the official loss positions: the
        # checkpoint's labels alone decide it, wherever the featurizer is built.
        self.all_positions = "X" in self.label2id
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self._cls, self._sep, self._unk = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
        self._special = frozenset(tokenizer.all_special_ids)
        self._bare_marker: dict[int, bool] = {}

    def word_pieces(self, sentences: Sequence[Sentence]) -> list[list[list[int]]]:
        """Subword ids of every word; a word that tokenises to nothing becomes the unknown token."""
        # Whole sentences are tokenised before windowing: the tokenizer's length warning is moot.
        enc = self.tokenizer([list(s.words) for s in sentences], is_split_into_words=True,
                             add_special_tokens=False, verbose=False)
        out = []
        for i, sentence in enumerate(sentences):
            pieces: list[list[int]] = [[] for _ in sentence.words]
            for token_id, word in zip(enc["input_ids"][i], enc.word_ids(i)):
                if word is not None:
                    pieces[word].append(token_id)
            out.append([self._drop_bare_marker(p) or [self._unk] for p in pieces])
        return out

    def _drop_bare_marker(self, pieces: list[int]) -> list[int]:
        # Sentencepiece vocabularies (XLM-R, e5) split a word with no "▁word" piece into a bare
        # "▁" and the rest: every Chinese character of a character-per-word corpus becomes
        # "▁ 江". The bare marker carries nothing of the word, yet it would carry the label, and
        # such a run of markers is unlike the contiguous characters seen in pretraining (and like
        # nothing mBERT produces, which gives each CJK character one piece). Dropping it lets the
        # word's own first piece carry the label.
        if len(pieces) > 1 and self._is_bare_marker(pieces[0]):
            return pieces[1:]
        return pieces

    def _is_bare_marker(self, token_id: int) -> bool:
        if token_id not in self._bare_marker:
            # A piece that decodes to nothing visible: sentencepiece's "▁", byte-level BPE's "Ġ".
            # WordPiece pieces all decode to themselves, so BERT vocabularies never match.
            self._bare_marker[token_id] = (
                token_id not in self._special
                and self.tokenizer.decode([token_id]).strip() == "")
        return self._bare_marker[token_id]

    def encode(self, sentences: Sequence[Sentence]) -> list[Window]:
        windows: list[Window] = []
        for index, (sentence, pieces) in enumerate(zip(sentences, self.word_pieces(sentences))):
            tags = [self.label2id[t] for t in sentence.tags]
            windows.extend(self._windows(index, pieces, tags))
        return windows

    def _windows(self, index: int, pieces: list[list[int]], tags: list[int]) -> list[Window]:
        budget = self.max_length - 2
        # A single word longer than a whole window keeps only its first pieces (it is labelled
        # by its first one anyway).
        pieces = [p[:budget - self.context] for p in pieces]
        out, start = [], 0
        while start < len(pieces) or not out:
            context_words = self._context_words(pieces, start) if start else []
            used = sum(len(pieces[w]) for w in context_words)
            end = start
            while end < len(pieces) and used + len(pieces[end]) <= budget:
                used += len(pieces[end])
                end += 1
            ids, labels, words = [self._cls], [IGNORE], []
            for w in context_words:
                ids += pieces[w]
                labels += [IGNORE] * len(pieces[w])
            for w in range(start, end):
                ids += pieces[w]
                labels += [tags[w]] + [IGNORE] * (len(pieces[w]) - 1)
                words.append(w)
            ids.append(self._sep)
            labels.append(IGNORE)
            out.append(Window(index, tuple(ids), tuple(labels), tuple(words)))
            start = end
        return out

    def _context_words(self, pieces: list[list[int]], start: int) -> list[int]:
        words, used, w = [], 0, start - 1
        while w >= 0 and used + len(pieces[w]) <= self.context:
            used += len(pieces[w])
            words.insert(0, w)
            w -= 1
        return words

    def collate(self, windows: Sequence[Window], width: int | None = None) -> dict[str, torch.Tensor]:
        """Pad to the longest window of the batch (not to max_length), or to a fixed `width`."""
        width = max(len(w) for w in windows) if width is None else width
        ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(windows), width), dtype=torch.long)
        for row, w in enumerate(windows):
            ids[row, : len(w)] = torch.tensor(w.input_ids)
            labels[row, : len(w)] = torch.tensor(w.labels)
            mask[row, : len(w)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Targets of the loss for a collated batch: its first-subword labels, or with the official
        loss positions every position of each window (continuation subwords X, [CLS], [SEP]).

        Left-context subwords of a later window stay unlabelled: their words belong to the window
        before (the official code truncates instead, so it has no such positions). Rows without a
        labelled word (fillers) stay unlabelled.
        """
        labels = batch["labels"]
        if not self.all_positions:
            return labels
        mask = batch["attention_mask"].bool()
        labelled = labels != IGNORE
        pos = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
        big = labels.shape[-1]
        first = torch.where(labelled, pos, torch.full_like(pos, big)).min(dim=-1, keepdim=True).values
        last = mask.sum(dim=-1, keepdim=True) - 1
        has_word = labelled.any(dim=-1, keepdim=True)
        out = labels.clone()
        out[mask & ~labelled & (pos > first) & (pos < last)] = self.label2id["X"]
        out[has_word & (pos == 0)] = self.label2id["[CLS]"]
        out[has_word & (pos == last)] = self.label2id["[SEP]"]
        return out

    def tag(self, label_id: int) -> str:
        """The tag of a predicted label id; the official extra classes are no entity (O)."""
        label = self.labels[int(label_id)]
        return "O" if label in OFFICIAL_EXTRA else label

    def merge(self, sentences: Sequence[Sentence], windows: Sequence[Window],
              predictions: Sequence[Sequence[int]]) -> list[list[str]]:
        """Tags per word from per-window predictions (one label id per labelled position)."""
        out: list[list[str | None]] = [[None] * len(s.words) for s in sentences]
        for window, predicted in zip(windows, predictions):
            if len(predicted) != len(window.words):
                raise ValueError(f"window of sentence {window.sentence} has {len(window.words)} labelled "
                                 f"positions but {len(predicted)} predictions")
            for word, label in zip(window.words, predicted):
                if out[window.sentence][word] is not None:
                    raise ValueError(f"word {word} of sentence {window.sentence} predicted twice")
                out[window.sentence][word] = self.tag(label)
        for i, tags in enumerate(out):
            if any(t is None for t in tags):
                raise ValueError(f"sentence {i}: some words were not predicted; were all its windows given?")
        return out  # type: ignore[return-value]


def labelled_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Argmax label ids at the labelled positions of each row, in order."""
    best = logits.argmax(-1)
    return [best[row][labels[row] != IGNORE].tolist() for row in range(labels.shape[0])]

"""Sentences to model inputs: subword windows with one labelled subword per unit, and back.

A unit is a word, whose first subword carries its label (-100 elsewhere, and on [CLS]/[SEP]). For
an unspaced sentence (`Sentence.unspaced`: Chinese, one character per word) and a sentencepiece or
byte-level vocabulary, a unit is a run of characters instead: the sentence is tokenised as one
string, as the encoder read such text in pretraining, each piece is placed on its characters
through the tokenizer's offsets, and a piece takes the label of its first character. Merging back
expands a piece's label over its characters (B-X on the first, I-X on the rest, O stays O), so
that scores stay per character. A gold entity with a boundary inside a piece cannot be labelled
exactly; `split_entities` counts them. WordPiece vocabularies (mBERT) give every CJK character a
piece of its own anyway: there unspaced sentences keep the word-by-word path.

A sentence longer than the model's window is cut into windows; each window after the first starts
with the last `context` subwords of the units before it, unlabelled, so that every word is
predicted exactly once, with left context, when the windows are merged back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from trainer.config import default
from trainer.data.corpus import LABELS, Sentence, entity_spans
from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE = -100
# Bumped whenever the same words and tokenizer give other pieces or windows: caches of anything
# computed from windows (retrieval vectors, frozen-bottom states) carry it in their keys.
# 2: a bare sentencepiece word marker is dropped (see Featurizer._drop_bare_marker).
# The unspaced path changed no pieces of any input that existed before it: it applies only to
# sentences flagged unspaced, and the flag is part of every cache key (see corpus.content_key).
FEATURES_VERSION = 2
# The official code's head has 13 classes: the 9 BIO tags, X (every subword after a word's first),
# [CLS], [SEP] and [PAD] (a class it never trains on, but whose logit takes part in the softmax).
# `train.loss_positions=all` adds them, and the loss covers every position of a window.
OFFICIAL_EXTRA = ("X", "[CLS]", "[SEP]", "[PAD]")
LOSS_POSITIONS = ("first_subword", "all")


def labels_for(loss_positions: str) -> tuple[str, ...]:
    """The classifier's label set for `train.loss_positions`."""
    if loss_positions not in LOSS_POSITIONS:
        raise ConfigError(f"train.loss_positions={loss_positions!r}: choose one of {', '.join(LOSS_POSITIONS)}")
    return LABELS + (OFFICIAL_EXTRA if loss_positions == "all" else ())


@dataclass(frozen=True)
class Window:
    sentence: int  # index of the sentence in the encoded list
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE except at the labelled subword of each unit owned by the window
    words: tuple[int, ...]  # for each labelled position, in order, the index of its unit's first word
    # For each labelled position, how many words its label stands for: 1 for a word, more for a
    # piece of an unspaced sentence that spans several characters. Empty: 1 each.
    widths: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)


class Units(NamedTuple):
    """A sentence's labelled units, as columns: unit i stands for words firsts[i] .. firsts[i] +
    widths[i] - 1, is tokenised as pieces[i], and carries its label on pieces[i][label_at[i]]."""
    firsts: Sequence[int]
    widths: Sequence[int]
    pieces: list[list[int]]
    label_at: Sequence[int]

    @classmethod
    def of_words(cls, pieces: list[list[int]]) -> "Units":
        """One unit per word, labelled on its first piece."""
        n = len(pieces)
        return cls(range(n), (1,) * n, pieces, (0,) * n)


def vocabulary(tokenizer) -> str:
    """The subword model of a fast tokenizer: "WordPiece", "Unigram" (sentencepiece), "BPE", ..."""
    return type(tokenizer.backend_tokenizer.model).__name__


class Featurizer:
    """Tokenise with a fast Hugging Face tokenizer and cut sentences into labelled windows."""

    def __init__(self, tokenizer, max_length: int = default("model.max_length"), context: int = default("model.window_context"),
                 labels: Sequence[str] = LABELS):
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
        # WordPiece's pre-tokenizer splits every CJK character off anyway: joining the characters
        # would only change how digits and Latin letters inside Chinese text are cut, away from
        # what mBERT (the paper's encoder) is given.
        self.joins_unspaced = vocabulary(tokenizer) != "WordPiece"
        self._told_wordpiece = False

    def units(self, sentences: Sequence[Sentence]) -> list[Units]:
        """The labelled units of every sentence, in order; together they cover every word once."""
        out: list[Units | None] = [None] * len(sentences)
        joined = [i for i, s in enumerate(sentences) if s.unspaced and self.joins_unspaced]
        if joined:
            for i, units in zip(joined, self._unspaced_units([sentences[i] for i in joined])):
                out[i] = units
        if not self.joins_unspaced and not self._told_wordpiece and any(s.unspaced for s in sentences):
            logger.info("WordPiece vocabulary: unspaced sentences are tokenised word by word, as for mBERT")
            self._told_wordpiece = True
        spaced = [i for i, units in enumerate(out) if units is None]
        if spaced:
            for i, pieces in zip(spaced, self.word_pieces([sentences[i] for i in spaced])):
                out[i] = Units.of_words(pieces)
        return out  # type: ignore[return-value]

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

    def _unspaced_units(self, sentences: Sequence[Sentence]) -> list[Units]:
        enc = self.tokenizer(["".join(s.words) for s in sentences], add_special_tokens=False,
                             return_offsets_mapping=True, verbose=False)
        return [self._align(s.words, ids, offsets)
                for s, ids, offsets in zip(sentences, enc["input_ids"], enc["offset_mapping"])]

    def _align(self, words: Sequence[str], ids: list[int], offsets: list[tuple[int, int]]) -> Units:
        """Units of one unspaced sentence from the pieces of its joined text and their offsets.

        A piece that starts on a word no earlier piece reached opens a unit; one that starts on a
        word already reached (the rest of a multi-character word, a character normalised into
        several pieces) joins the open unit. Pieces that stand for no character of their own (the
        bare "▁" that opens sentencepiece text) are kept, since the encoder read text so, but join
        the next unit without its label (see `_drop_bare_marker`). A character no piece covers (a
        space the tokenizer dropped) belongs to the unit before it, or at the start to the first.
        """
        if not words:
            return Units.of_words([])
        owner = [w for w, word in enumerate(words) for _ in word]
        firsts: list[int] = []
        units: list[list[int]] = []
        label_at: list[int] = []
        pending: list[int] = []
        reached = -1
        for token_id, (a, b) in zip(ids, offsets):
            if b <= a or self._is_bare_marker(token_id):
                pending.append(token_id)
                continue
            if owner[a] > reached:
                firsts.append(owner[a])
                label_at.append(len(pending))
                units.append(pending + [token_id])
            else:
                units[-1] += pending + [token_id]
            pending = []
            reached = max(reached, owner[b - 1])
        if not units:  # only characters the tokenizer drops
            return Units([0], [len(words)], [[self._unk]], [0])
        units[-1] += pending
        firsts[0] = 0
        ends = firsts[1:] + [len(words)]
        return Units(firsts, [e - f for f, e in zip(firsts, ends)], units, label_at)

    def encode(self, sentences: Sequence[Sentence]) -> list[Window]:
        windows: list[Window] = []
        for index, (sentence, units) in enumerate(zip(sentences, self.units(sentences))):
            tags = [self.label2id[t] for t in sentence.tags]
            windows.extend(self._windows(index, units, tags))
        return windows

    def _windows(self, index: int, units: Units, tags: list[int]) -> list[Window]:
        budget = self.max_length - 2
        # A single unit longer than a whole window keeps only its first pieces (its label sits on
        # one of the first anyway).
        keep = budget - self.context
        pieces = [p if len(p) <= keep else p[:keep] for p in units.pieces]
        out, start = [], 0
        while start < len(pieces) or not out:
            context = self._context_units(pieces, start) if start else []
            used = sum(len(pieces[u]) for u in context)
            end = start
            while end < len(pieces) and used + len(pieces[end]) <= budget:
                used += len(pieces[end])
                end += 1
            ids, labels = [self._cls], [IGNORE]
            for u in context:
                ids += pieces[u]
                labels += [IGNORE] * len(pieces[u])
            for u in range(start, end):
                at = min(units.label_at[u], len(pieces[u]) - 1)
                ids += pieces[u]
                labels += [IGNORE] * at + [tags[units.firsts[u]]] + [IGNORE] * (len(pieces[u]) - at - 1)
            ids.append(self._sep)
            labels.append(IGNORE)
            out.append(Window(index, tuple(ids), tuple(labels), tuple(units.firsts[start:end]),
                              tuple(units.widths[start:end])))
            start = end
        return out

    def _context_units(self, pieces: list[list[int]], start: int) -> list[int]:
        out, used, u = [], 0, start - 1
        while u >= 0 and used + len(pieces[u]) <= self.context:
            used += len(pieces[u])
            out.insert(0, u)
            u -= 1
        return out

    def collate(self, windows: Sequence[Window], width: int | None = None) -> dict[str, torch.Tensor]:
        """Pad to the longest window of the batch (not to max_length), or to a fixed `width`."""
        lengths = np.fromiter((len(w) for w in windows), dtype=np.int64, count=len(windows))
        width = int(lengths.max()) if width is None else width
        # One flat copy of every window's ids and labels into place (numpy), rather than a small
        # tensor per row: collating is on the path of every step and every tagged sentence.
        inside, total = np.arange(width) < lengths[:, None], int(lengths.sum())
        ids = np.full((len(windows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(windows), width), IGNORE, dtype=np.int64)
        ids[inside] = np.fromiter((i for w in windows for i in w.input_ids), dtype=np.int64, count=total)
        labels[inside] = np.fromiter((i for w in windows for i in w.labels), dtype=np.int64, count=total)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(inside.astype(np.int64)),
                "labels": torch.from_numpy(labels)}

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
        """Tags per word from per-window predictions (one label id per labelled position); a label
        that stands for several words (a piece of an unspaced sentence) is expanded over them."""
        out: list[list[str | None]] = [[None] * len(s.words) for s in sentences]
        for window, predicted in zip(windows, predictions):
            if len(predicted) != len(window.words):
                raise ValueError(f"window of sentence {window.sentence} has {len(window.words)} labelled "
                                 f"positions but {len(predicted)} predictions")
            widths = window.widths or (1,) * len(window.words)
            for first, width, label in zip(window.words, widths, predicted):
                tag = self.tag(label)
                for word in range(first, first + width):
                    if out[window.sentence][word] is not None:
                        raise ValueError(f"word {word} of sentence {window.sentence} predicted twice")
                    out[window.sentence][word] = tag if word == first else _inside(tag)
        for i, tags in enumerate(out):
            if any(t is None for t in tags):
                raise ValueError(f"sentence {i}: some words were not predicted; were all its windows given?")
        return out  # type: ignore[return-value]


    def merge_soft(self, sentences: Sequence[Sentence], windows: Sequence[Window],
                   logits: Sequence[torch.Tensor]) -> list["Soft"]:
        """Soft labels per sentence from each window's logits (its rows, padded or not): the
        model's probabilities at every labelled unit, taken from the window that owns the unit,
        as `merge` takes its tag."""
        units: list[dict[int, torch.Tensor]] = [{} for _ in sentences]
        for window, rows in zip(windows, logits):
            labelled = torch.from_numpy(np.asarray(window.labels) != IGNORE)
            probs = torch.softmax(rows[: len(window)][labelled].float(), dim=-1)
            for first, p in zip(window.words, probs):
                if first in units[window.sentence]:
                    raise ValueError(f"word {first} of sentence {window.sentence} predicted twice")
                units[window.sentence][first] = p
        out = []
        for i, found in enumerate(units):
            if not found and sentences[i].words:
                raise ValueError(f"sentence {i}: no labelled unit was predicted; were all its windows given?")
            firsts = sorted(found)
            probs = torch.stack([found[f] for f in firsts]) if firsts else torch.zeros(0, len(self.labels))
            out.append(Soft(np.asarray(firsts, dtype=np.int32), probs.to(torch.float16).numpy()))
        return out


class Soft(NamedTuple):
    """A sentence's soft labels: for each labelled unit in word order, its first word and the
    model's probabilities over its label set, in float16 (what a student learns from, at half the
    bytes of float32; rows sum to 1 within about 1e-3)."""

    firsts: np.ndarray  # int32 [units]
    probs: np.ndarray  # float16 [units, labels]


def soft_targets(windows: Sequence[Window], teacher: Sequence[Soft]) -> list[torch.Tensor]:
    """Each window's rows of its sentence's soft labels (`teacher[window.sentence]`), one per
    labelled position in order (float16). The student must read a sentence in its teacher's
    units (the same tokenizer, max_length and window_context); a unit the teacher did not label
    is refused."""
    rows: dict[int, dict[int, int]] = {}
    out = []
    for w in windows:
        soft = teacher[w.sentence]
        at = rows.setdefault(w.sentence, {int(f): i for i, f in enumerate(soft.firsts)})
        missing = [f for f in w.words if f not in at]
        if missing:
            raise ValueError(f"sentence {w.sentence}: the teacher labelled no unit starting at word {missing[0]}; "
                             "train the student with the teacher's tokenizer, model.max_length and "
                             "model.window_context")
        out.append(torch.from_numpy(np.ascontiguousarray(soft.probs[[at[f] for f in w.words]], dtype=np.float16)))
    return out


def _inside(tag: str) -> str:
    """The tag of a later character of a piece labelled `tag`: inside the entity the piece opens."""
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def split_entities(featurizer: Featurizer, sentences: Sequence[Sentence]) -> dict[str, int]:
    """What the featuriser's units cost the gold entities of `sentences`.

    An entity with a boundary inside a unit (a piece spanning characters on both sides of it)
    cannot be labelled exactly: its characters come back cut at the piece's edges. Counted, with
    the words, units and pieces, so that the loss is reported rather than silently taken.
    """
    counts = dict.fromkeys(("sentences", "words", "units", "pieces", "entities", "entities_split",
                            "sentences_with_split"), 0)
    for sentence, units in zip(sentences, featurizer.units(sentences)):
        edges = set(units.firsts) | {len(sentence.words)}
        spans = entity_spans(sentence.tags)
        split = sum(a not in edges or b not in edges for _, a, b in spans)
        counts["sentences"] += 1
        counts["words"] += len(sentence.words)
        counts["units"] += len(units.pieces)
        counts["pieces"] += sum(len(p) for p in units.pieces)
        counts["entities"] += len(spans)
        counts["entities_split"] += split
        counts["sentences_with_split"] += split > 0
    return counts


def labelled_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Argmax label ids at the labelled positions of each row, in order."""
    best = logits.argmax(-1)
    return [best[row][labels[row] != IGNORE].tolist() for row in range(labels.shape[0])]


def group_windows(windows: Sequence[Window]) -> list[list[Window]]:
    """Windows of `Featurizer.encode` grouped per sentence, in sentence order."""
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.sentence, []).append(w)
    if sorted(groups) != list(range(len(groups))):
        raise ValueError("windows do not cover sentences 0..n-1; pass the whole output of Featurizer.encode")
    return [groups[i] for i in range(len(groups))]

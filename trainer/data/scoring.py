"""Phrase-level precision, recall and F1 as conlleval computes them, and conlleval's file format.

seqeval's default mode follows conlleval's chunking (an entity may start with I-), so its figures
agree with `conlleval.pl`; its strict IOB2 mode would not.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Sequence

import numpy as np

from trainer.data.corpus import ENTITY_TYPES, CorpusError, read_text, split_fields
from trainer.utils.paths import atomic_file


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Overall and per-type precision/recall/F1 in percent, with entity counts."""
    # seqeval pulls in scikit-learn (seconds): imported when a score is computed, so that reading
    # and checking a file (and every job that only imports this module) does not wait for it.
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    with warnings.catch_warnings():
        # All-O predictions are a legitimate (bad) result: F1 0, not a warning per call.
        warnings.simplefilter("ignore")
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        # float(): seqeval returns numpy scalars, which a checkpoint's trainer state (loaded with
        # weights_only=True) must not hold.
        overall = {
            "precision": 100.0 * float(precision_score(gold, pred, zero_division=0)),
            "recall": 100.0 * float(recall_score(gold, pred, zero_division=0)),
            "f1": 100.0 * float(f1_score(gold, pred, zero_division=0)),
        }
    per_type = {
        name: {"precision": 100.0 * float(row["precision"]), "recall": 100.0 * float(row["recall"]),
               "f1": 100.0 * float(row["f1-score"]), "support": int(row["support"])}
        for name, row in report.items() if not name.endswith(" avg")
    }
    return {**overall, "per_type": per_type}


def write_conll(path: str | os.PathLike, words: Iterable[Sequence[str]], gold: Iterable[Sequence[str]],
                pred: Iterable[Sequence[str]]) -> None:
    """`token gold pred` per line, a blank line after each sentence (conlleval's input)."""
    with atomic_file(path) as fh:
        for ws, gs, ps in zip(words, gold, pred):
            for w, g, p in zip(ws, gs, ps):
                # conlleval splits on whitespace: a token holding a space would shift the columns.
                fh.write(f"{''.join(w.split()) or '_'} {g} {p}\n")
            fh.write("\n")


# Labels of the official Meta-Cross code's output that are no entity tags: read as O only when
# asked (`special_to_o`), since elsewhere they mean the columns are not tags at all.
SPECIAL_LABELS = ("X", "[CLS]", "[SEP]")


def _tag_checker(path: str, types: Sequence[str], special_to_o: bool):
    """A function (tag, line, column name) -> the tag as scored, or a CorpusError naming the line."""
    valid = {"O": "O"}
    valid.update({f"{p}-{t}": f"{p}-{t}" for t in types for p in ("B", "I")})
    if special_to_o:
        valid.update({label: "O" for label in SPECIAL_LABELS})
    allowed = f"O or B-/I- with one of {', '.join(types)}"

    def check(tag: str, number: int, column: str, fields: list[str]) -> str:
        scored = valid.get(tag)
        if scored is not None:
            return scored
        if column == "gold" and fields[-1] in valid:
            raise CorpusError(path, number, f"the gold column (column {len(fields) - 1} of {len(fields)}) holds {tag!r}, "
                              "not an NER tag, while the last column holds one: the prediction column is missing (an "
                              "original CoNLL file ends with the gold tag) or the columns are swapped",
                              "Write `token ... gold pred`, the predicted tag last")
        hint = ""
        if tag in SPECIAL_LABELS:
            hint = f"; the official code's {'/'.join(SPECIAL_LABELS)} labels are read as O with --special-to-o"
        elif "-" in tag and tag.split("-", 1)[0] in ("B", "I"):
            hint = f"; other entity types need --types {','.join(types)},{tag.split('-', 1)[1]}"
        position = len(fields) - 1 if column == "gold" else len(fields)
        raise CorpusError(path, number, f"unknown {column} tag {tag!r} (column {position} of {len(fields)})", f"Tags must be {allowed}{hint}; the last two columns are the gold "
                          "and the predicted tag")
    return check


def read_conll(path: str | os.PathLike, types: Sequence[str] = ENTITY_TYPES, special_to_o: bool = False
               ) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Words, gold and predicted tags of a conlleval file (the last two columns are the tags).

    Checked as conlleval.pl reads it, and stricter: every token line has the same number of
    columns (at least 3), and both tags are O or B-/I- with one of `types`; a file without a
    prediction column, with swapped columns or with chunk tags is refused naming file:line.
    """
    path = os.fspath(path)
    text = read_text(path)
    check = _tag_checker(path, types, special_to_o)
    words, gold, pred, shared = [], [], [], {}
    cw, cg, cp = [], [], []
    columns, first = 0, 0
    for number, line in enumerate(text.lines(), 1):
        fields = split_fields(line, tabbed=False)
        if not fields or fields[0] == "-DOCSTART-":
            if cw:
                words.append(cw), gold.append(cg), pred.append(cp)
            cw, cg, cp = [], [], []
            continue
        if len(fields) < 3:
            raise CorpusError(path, number, f"expected `token ... gold pred`, got {line.strip()!r} ({len(fields)} "
                              "columns)", "Write one token per line with the gold and the predicted tag last")
        if not columns:
            columns, first = len(fields), number
        elif len(fields) != columns:
            # conlleval.pl stops here too ("unexpected number of features").
            raise CorpusError(path, number, f"{len(fields)} columns, but line {first} has {columns}",
                              "Give every token line the same columns, the gold and the predicted tag last")
        cg.append(check(fields[-2], number, "gold", fields))
        cp.append(check(fields[-1], number, "predicted", fields))
        cw.append(shared.setdefault(fields[0], fields[0]))
    if cw:
        words.append(cw), gold.append(cg), pred.append(cp)
    if not words:
        raise CorpusError(path, None, "no tokens found", "Give a file of `token gold pred` lines")
    return words, gold, pred


def _entity_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> np.ndarray:
    """[n, 3] per sentence: correct, predicted and gold entities (conlleval's exact-span match)."""
    from seqeval.metrics.sequence_labeling import get_entities  # deferred: see score

    rows = []
    for g, p in zip(gold, pred):
        gs, ps = set(get_entities(list(g))), set(get_entities(list(p)))
        rows.append((len(gs & ps), len(ps), len(gs)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def bootstrap_f1(gold: Sequence[Sequence[str]], preds: dict[str, Sequence[Sequence[str]]], n: int = 1000,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """F1 of each system on `n` resamples of the sentences (the same resamples for all: paired).

    Micro F1 = 2 correct / (predicted + gold) over a resample, conlleval's figure on it. Why by
    hand: seqeval scores one fixed set; resampling its per-sentence counts is what gives the
    variation of a test-set sample, and the paired difference between two systems.
    """
    counts = {name: _entity_counts(gold, pred) for name, pred in preds.items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gold), size=(n, len(gold)))
    out = {}
    for name, c in counts.items():
        s = c[idx].sum(axis=1)  # [n, 3]
        out[name] = 100.0 * 2 * s[:, 0] / np.maximum(s[:, 1] + s[:, 2], 1)
    return out

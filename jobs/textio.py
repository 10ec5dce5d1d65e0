"""Raw text in, tagged text out: what the tagging job reads and writes, as streams.

Inputs are files, folders or globs of plain text (one sentence per line, or paragraphs split into
sentences), CoNLL columns (the first column is the word; blank lines end sentences) or JSONL with
a text field. Files are read line by line, so memory does not grow with the input; a file is
checked in full (encoding, JSON, line length) by `InputSet.count` before any work starts.

Raw text is cut into words and punctuation as the corpora are, and text in a CJK script into one
word per character (the zh corpus's granularity), so that the model sees what it was trained and
adapted on.

Outputs are shards of consecutive sentences, `part-NNNNNN.jsonl` (and `.conll` when asked),
each written to a temporary file and renamed into place: a shard is either whole or absent, so a
run started again skips the shards that exist. With soft labels, `part-NNNNNN.soft.npy` beside
each holds the model's probabilities (float16, one row per labelled unit, the label set in the
folder's record), written before the `.jsonl`; each JSONL line names its rows (`soft_row`) and the
first word of each unit (`units`). `read_soft` reads them back memory-mapped.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from trainer.data.corpus import CorpusError, Sentence, entity_spans, os_error
from trainer.utils.digest import files_sha256
from trainer.utils.errors import InputError
from trainer.utils.paths import atomic_file, make_output_dir, write_atomic

logger = logging.getLogger(__name__)

FORMATS = ("auto", "text", "paragraphs", "conll", "jsonl")
SOFT_SUFFIX = ".soft.npy"
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CONLL_SUFFIXES = (".conll", ".conllu", ".bio", ".iob", ".tsv", ".testa", ".testb", ".train")
# A "line" longer than this is not text with one sentence or paragraph per line (a minified dump,
# a binary file): refused instead of read whole into memory.
MAX_LINE_CHARS = 1 << 20

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
# Words and punctuation apart, as the corpora are tokenised; each CJK character a word of its own.
# Apostrophes as in the corpora: an elision keeps it (French and Italian "L'", "qu'", "dell'"), an
# English clitic is a word of its own ("Germany 's").
_ELISION = r"\b(?:[cdjlmnst]|qu|\w+qu|dell|nell|sull|dall|all|un)['’](?=\s?\w)"
_CLITIC = r"['’](?:s|re|ve|ll|d|m)\b"
_TOKEN = re.compile(rf"[{_CJK}]|(?i:aujourd['’]hui)|(?i:{_ELISION})|(?i:{_CLITIC})|[^\W{_CJK}]+|[^\w\s]", re.UNICODE)
_ENDS = {".", "!", "?", "…", "。", "！", "？"}
_CLOSERS = {'"', "'", "”", "’", "»", ")", "]", "」", "』", "）"}
_CJK_ENDS = {"。", "！", "？"}
# Words after which a "." does not end a sentence (titles and the like, in the corpora's languages).
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "sra", "srta", "jr", "hr", "fr", "frau", "herr",
                  "nr", "no", "vs", "etc", "mme", "mlle", "m", "z", "bzw", "ca", "dhr", "mevr", "jan", "feb",
                  "aug", "sept", "oct", "nov", "dec", "gen", "col", "lt", "gov", "sen", "rep", "inc", "ltd", "co"}
_TAG = re.compile(r"^(O|[BIES]-\S+)$")


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks of `text`; a CJK character is a word of its own."""
    return _TOKEN.findall(text)


def split_sentences(words: Sequence[str]) -> list[list[str]]:
    """Words cut into sentences after ., !, ? (and closing quotes) followed by a capital, a digit or
    an opening mark, unless the word before the "." is an abbreviation or a single letter; after
    。！？ always."""
    out, start, n = [], 0, len(words)
    i = 0
    while i < n:
        if words[i] in _ENDS:
            end = i + 1
            while end < n and (words[end] in _ENDS or words[end] in _CLOSERS):
                end += 1
            if end < n and _ends_here(words, i, end):
                out.append(list(words[start:end]))
                start = end
            i = end
        else:
            i += 1
    if start < n:
        out.append(list(words[start:]))
    return out


def _ends_here(words: Sequence[str], i: int, end: int) -> bool:
    if words[i] in _CJK_ENDS:
        return True
    nxt = words[end]
    if not (nxt[:1].isupper() or nxt[:1].isdigit() or nxt[:1] in "¿¡\"'“‘«(" or re.match(rf"[{_CJK}]", nxt)):
        return False
    before = words[i - 1] if i > 0 else ""
    return not (words[i] == "." and (before.lower() in _ABBREVIATIONS or (len(before) == 1 and before.isalpha())))


# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class RawSentence:
    words: tuple[str, ...]
    where: str  # file:line of the sentence's first line


def expand(spec: str) -> list[str]:
    """The files named by a file, a folder (every regular file below it, hidden ones left out) or a
    glob, in sorted order; an InputError naming `spec` when there are none."""
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        files = [f for f in found if os.path.isfile(f)]
        if not files:
            raise InputError(f"--input {spec}: the folder holds no files; put the text to tag in it")
        return files
    if os.path.exists(spec):
        return [spec]
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(f"--input {spec}: the pattern matches no file")
        return files
    raise InputError(f"--input {spec}: no such file or folder; give a file, a folder or a glob such as 'news/*.txt'")


def _lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(number, line without its end) of a text file, read a buffer at a time; LF, CRLF and CR."""
    try:
        with open(path, "rb") as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8-sig" if encoding == "utf-8" else encoding,
                                      errors="strict", newline=None)
            number = 0
            while True:
                line = stream.readline(MAX_LINE_CHARS + 1)
                if not line:
                    return
                number += 1
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    raise CorpusError(path, number, f"a line of more than {MAX_LINE_CHARS:,} characters",
                                      "Give text with one sentence or paragraph per line (a binary or minified file "
                                      "is not text to tag)")
                if "\x00" in line:
                    raise CorpusError(path, number, "the file holds NUL bytes: it is UTF-16 or binary",
                                      "Re-save it as UTF-8 text")
                yield number, line.rstrip("\n")
    except UnicodeDecodeError as err:
        raise _NotUtf8(path, err) from None
    except OSError as err:
        raise os_error(path, err) from None


class _NotUtf8(Exception):
    def __init__(self, path: str, err: UnicodeDecodeError):
        super().__init__(f"{path}: not UTF-8 ({err.reason} at byte {err.start} of a block)")


def _sniff(path: str, encoding: str) -> str:
    """text, conll or jsonl, from the name and the first 200 non-blank lines."""
    lower = path.lower()
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(_CONLL_SUFFIXES):
        return "conll"
    seen, single, tagged, blank_between = 0, 0, 0, False
    for _, line in _lines(path, encoding):
        fields = line.split()
        if not fields:
            blank_between = seen > 0 or blank_between
            continue
        seen += 1
        single += len(fields) == 1
        tagged += len(fields) >= 2 and bool(_TAG.match(fields[-1]))
        if seen >= 200:
            break
    if seen and tagged >= 0.9 * seen:
        return "conll"
    if seen >= 2 and blank_between and single >= 0.9 * seen:
        return "conll"
    return "text"


@dataclass
class InputSet:
    """The files to tag and how to read them; iterate `sentences()` as often as needed."""

    files: list[str]
    format: str = "auto"
    unspaced: bool = False
    text_field: str = "text"
    max_words: int = 256
    encodings: dict = field(default_factory=dict)  # path -> encoding found by count()
    formats: dict = field(default_factory=dict)  # path -> format found by count()

    def count(self) -> int:
        """Sentences in all files, reading each in full once: encoding, format and content are
        checked here, before any work starts (CorpusError naming file:line)."""
        total = 0
        for path in self.files:
            self.encodings[path] = "utf-8"
            try:
                total += sum(1 for _ in self._read(path))
            except _NotUtf8 as err:
                logger.warning("%s; reading the file as latin-1", err)
                self.encodings[path] = "latin-1"
                total += sum(1 for _ in self._read(path))
        return total

    def digest(self) -> str:
        """sha256 of the files' names, order and content: what a finished shard was made from."""
        try:
            return files_sha256(self.files, label=os.path.abspath)[:16]
        except OSError as err:
            raise os_error(err.filename or self.files[0], err) from None

    def sentences(self) -> Iterator[RawSentence]:
        for path in self.files:
            yield from self._read(path)

    def _read(self, path: str) -> Iterator[RawSentence]:
        encoding = self.encodings.get(path, "utf-8")
        kind = self.format if self.format != "auto" else self.formats.get(path) or _sniff(path, encoding)
        self.formats[path] = kind
        reader = {"text": self._text, "paragraphs": self._paragraphs, "conll": self._conll, "jsonl": self._jsonl}[kind]
        for where, words in reader(path, encoding):
            # A sentence longer than this is a line without sentence ends (a list, a table): cut so
            # that one sentence cannot fill an adapter's memory.
            for start in range(0, len(words), self.max_words):
                yield RawSentence(tuple(words[start:start + self.max_words]), where)

    def _text(self, path: str, encoding: str):
        for number, line in _lines(path, encoding):
            for words in split_sentences(tokenize(line)):
                yield f"{path}:{number}", words

    def _paragraphs(self, path: str, encoding: str):
        words, first = [], None
        for number, line in _lines(path, encoding):
            tokens = tokenize(line)
            if tokens:
                first = first or number
                words += tokens
                continue
            if words:
                yield from ((f"{path}:{first}", s) for s in split_sentences(words))
            words, first = [], None
        if words:
            yield from ((f"{path}:{first}", s) for s in split_sentences(words))

    def _conll(self, path: str, encoding: str):
        words, first = [], None
        for number, line in _lines(path, encoding):
            fields = line.split("\t") if "\t" in line else line.split()
            word = fields[0].strip() if fields else ""
            if not word:
                if words:
                    yield f"{path}:{first}", words
                words, first = [], None
            elif word != "-DOCSTART-":
                first = first or number
                words.append(word)
        if words:
            yield f"{path}:{first}", words

    def _jsonl(self, path: str, encoding: str):
        for number, line in _lines(path, encoding):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise CorpusError(path, number, f"not a JSON object ({err})", "Give one JSON object per line") from None
            value = record.get(self.text_field) if isinstance(record, dict) else None
            if isinstance(value, list) and all(isinstance(w, str) for w in value):
                yield f"{path}:{number}", [w for w in value if w.strip()]  # already split into words
            elif isinstance(value, str):
                for words in split_sentences(tokenize(value)):
                    yield f"{path}:{number}", words
            else:
                raise CorpusError(path, number, f"no text field {self.text_field!r} (a string or a list of words)",
                                  "Name the field that holds the text with --text-field")


# ------------------------------------------------------------------------------------ outputs


def part_name(number: int) -> str:
    return f"part-{number:06d}"


class ShardWriter:
    """Tagged shards in a folder, each file renamed into place whole (see module doc)."""

    def __init__(self, folder: str | os.PathLike, conll: bool = False, soft: bool = False):
        self.folder, self.conll, self.soft = make_output_dir(folder, "--out"), conll, soft

    def path(self, number: int, suffix: str = ".jsonl") -> Path:
        return self.folder / f"{part_name(number)}{suffix}"

    def done(self) -> set[int]:
        """Shards already written whole (their .jsonl, renamed last, exists)."""
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.jsonl") if p.stem[5:].isdigit()}

    def write(self, number: int, first: int, sentences: Sequence[Sentence], wheres: Sequence[str],
              tags: Sequence[Sequence[str]], soft: Optional[Sequence] = None) -> Counter:
        """Write shard `number` (its first sentence is sentence `first` of the input), with its
        soft labels (`trainer.data.features.Soft` per sentence) when the writer keeps them;
        entities per type."""
        if self.soft != (soft is not None):
            raise ValueError(f"shard {number}: soft labels {'missing' if self.soft else 'given'} for a writer "
                             f"{'with' if self.soft else 'without'} them")
        counts: Counter = Counter()
        lines, conll, row = [], [], 0
        for i, (sentence, where, t) in enumerate(zip(sentences, wheres, tags)):
            if len(t) != len(sentence.words):
                raise RuntimeError(f"sentence {first + i} ({where}) has {len(sentence.words)} words but "
                                   f"{len(t)} tags came back")
            glue = "" if sentence.unspaced else " "
            spans = [{"type": kind, "start": a, "end": b, "text": glue.join(sentence.words[a:b])}
                     for kind, a, b in entity_spans(list(t))]
            counts.update(s["type"] for s in spans)
            line = {"sentence": first + i, "source": where, "words": list(sentence.words), "tags": list(t),
                    "entities": spans}
            if soft is not None:
                line.update(units=soft[i].firsts.tolist(), soft_row=row)
                row += len(soft[i].firsts)
            lines.append(json.dumps(line, ensure_ascii=False))
            if self.conll:
                conll.append("".join(f"{w}\t{tag}\n" for w, tag in zip(sentence.words, t)) + "\n")
        if self.conll:
            write_atomic(self.path(number, ".conll"), "".join(conll))
        if soft is not None:
            with atomic_file(self.path(number, SOFT_SUFFIX), "wb") as fh:
                np.save(fh, np.concatenate([s.probs for s in soft]).astype(np.float16, copy=False))
        write_atomic(self.path(number), "\n".join(lines) + "\n")
        return counts

    def counts(self, number: int) -> tuple[int, Counter]:
        """Sentences and entities per type of a shard already written (read back a line at a time)."""
        sentences, counts = 0, Counter()
        with open(self.path(number), encoding="utf-8") as fh:
            for line in fh:
                sentences += 1
                counts.update(e["type"] for e in json.loads(line)["entities"])
        return sentences, counts

    def paths(self) -> list[Path]:
        files = sorted(self.folder.glob("part-*.jsonl"))
        return (files + (sorted(self.folder.glob("part-*.conll")) if self.conll else [])
                + (sorted(self.folder.glob(f"part-*{SOFT_SUFFIX}")) if self.soft else []))


class SoftSentence(NamedTuple):
    """A sentence of a soft-labelled output: its words, the model's tags, the first word of each
    labelled unit and the probabilities there (float16 rows of the shard's memory map)."""

    words: list[str]
    tags: list[str]
    units: list[int]
    probs: np.ndarray
    where: str  # shard file:line


def read_soft(folder: str | os.PathLike) -> Iterator[SoftSentence]:
    """Every sentence of a soft-labelled output folder, shard by shard in input order; each
    shard's probabilities memory-mapped, not read into memory."""
    folder = Path(folder)
    for path in sorted(folder.glob("part-*.jsonl")):
        sidecar = path.with_suffix(SOFT_SUFFIX)
        if not sidecar.is_file():
            raise InputError(f"{path} has no soft labels beside it ({sidecar.name}): tag with --soft into "
                             "another folder")
        probs = np.load(sidecar, mmap_mode="r")
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                where = f"{path}:{number}"
                try:
                    item = json.loads(line)
                    units, row = item["units"], item["soft_row"]
                    if not 0 <= row <= row + len(units) <= len(probs):
                        raise ValueError(f"rows {row}..{row + len(units)} outside {sidecar.name}'s {len(probs)}")
                    yield SoftSentence(item["words"], item["tags"], units, probs[row:row + len(units)], where)
                except (ValueError, KeyError, TypeError) as err:
                    raise InputError(f"{where}: not a soft-labelled shard line ({err}); tag again with --soft "
                                     "into an empty folder") from None


def shards(items: Iterator, size: int, skip: set[int] = frozenset()) -> Iterator[tuple[int, int, list]]:
    """(shard number, index of its first item, items) of consecutive items; shards in `skip` are
    read past without being kept."""
    number, batch, first = 0, [], 0
    for i, item in enumerate(items):
        if number not in skip:
            batch.append(item)
        if (i + 1) % size == 0:
            if number not in skip:
                yield number, first, batch
            number, batch, first = number + 1, [], i + 1
    if batch:
        yield number, first, batch

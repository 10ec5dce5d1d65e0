"""Read NER corpora in every format the project meets into sentences of (words, BIO tags).

One entry point, `read_corpus`, accepts CoNLL-2002/2003 files (2 to 5 columns, IOB1 or IOB2,
latin-1 or UTF-8), the paper's processed files, Europeana's IO-tagged French without sentence
breaks, and WikiANN/PAN-X tab-separated files, and reports what it detected. The label set and
the BIO conversion belong here and nowhere else.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

logger = logging.getLogger(__name__)

ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
LABELS = ("O",) + tuple(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I"))
_TAG = re.compile(r"^(O|[BI]-(PER|LOC|ORG|MISC))$")
DOCSTART = "-DOCSTART-"
# A well-formed UTF-8 multi-byte character (lead byte, then continuation bytes).
_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")

# Europeana French: the paper splits the unsegmented file at each "." token and uses
# 9,527 segments for training and 2,375 for testing. We keep the file's order and take the first
# 9,527 complete segments as train and the next 2,375 as test, so that no newspaper page is cut
# across the two; the trailing 14 tokens after the last "." are not a complete segment and are
# left out of both splits.
EUROPEANA_SPLIT = (9527, 2375)
# A file with no blank line and at least this many token lines is a stream without sentence
# breaks (Europeana); it is segmented at "." tokens.
_UNSEGMENTED_MIN_LINES = 1000
# Lines whose column count differs from the file's are a known defect of legacy files
# (ned.testb has 112 lines where a mangled "ë" swallowed the separator before the POS column).
# They are read (word = first column, tag = last) while they stay this rare; more means the
# file is not one format.
_MAX_ODD_COLUMN_FRACTION = 0.01


class CorpusError(ValueError):
    """A corpus file cannot be read; the message names the file, the line and what to do."""

    def __init__(self, path: str, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}. {fix}")
        self.path, self.line, self.problem = path, line, problem


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    # The words are the characters of text written without spaces (Chinese, one character per
    # word): the featuriser may tokenise them joined, as the encoder read such text. Set where a
    # language's test set is read (data.unspaced_languages), so that it travels with the sentence
    # through retrieval, actors and caches.
    unspaced: bool = False

    def __post_init__(self) -> None:
        if len(self.words) != len(self.tags):
            raise ValueError(f"sentence has {len(self.words)} words but {len(self.tags)} tags")


def content_key(sentence: Sentence) -> tuple:
    """What a cache of anything computed from a sentence must key on: its words, and whether they
    are read unspaced. A spaced sentence keys on its words alone, as before the flag existed, so
    that entries already on disk stay valid."""
    return (sentence.words, "unspaced") if sentence.unspaced else sentence.words


@dataclass
class CorpusInfo:
    path: str
    encoding: str = "utf-8"
    bom: bool = False
    crlf: bool = False
    columns: int = 0
    tag_column: int = 0
    delimiter: str = "whitespace"
    scheme: str = "IOB2"  # as found in the file: IOB1, IOB2 or IO
    converted: bool = False  # tags rewritten to BIO (IOB2)
    segmented_at_period: bool = False
    split: str | None = None
    docstart_dropped: int = 0
    repaired_tags: int = 0
    odd_column_lines: int = 0
    misc_to_o: bool = False


@dataclass
class Corpus:
    sentences: list[Sentence]
    info: CorpusInfo
    dropped_tail: int = 0

    def stats(self) -> dict:
        """Counts and what was detected, as printed by `metaner inspect --json`."""
        by_type: Counter = Counter()
        for s in self.sentences:
            for tag in s.tags:
                if tag.startswith("B-"):
                    by_type[tag[2:]] += 1
        info = asdict(self.info)
        return {
            "path": self.info.path,
            "sentences": len(self.sentences),
            "tokens": sum(len(s.words) for s in self.sentences),
            "entities": sum(by_type.values()),
            "entities_by_type": dict(sorted(by_type.items())),
            "encoding": info.pop("encoding"),
            "scheme": info.pop("scheme"),
            **{k: v for k, v in info.items() if k != "path"},
        }


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _decode(path: str, raw: bytes) -> tuple[str, str, bool]:
    if not raw.strip():
        raise CorpusError(path, None, "the file is empty", "Point the setting at a corpus with one `word ... TAG` line per token")
    if b"\x00" in raw:
        # Text corpora hold no NUL bytes; UTF-16 text and compressed archives do.
        raise CorpusError(path, _line_of(raw, raw.index(b"\x00")), "the file holds NUL bytes: it is UTF-16 or binary "
                          "(compressed?), not a text corpus", "Decompress it or re-save it as UTF-8 text")
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8-sig"), "utf-8", bom
    except UnicodeDecodeError as err:
        _refuse_mixed_encoding(path, raw, err.start)
        # CoNLL-2002/2003 non-English files are latin-1; every byte sequence decodes as latin-1.
        return raw.decode("latin-1"), "latin-1", bom


def _refuse_mixed_encoding(path: str, raw: bytes, first_bad: int) -> None:
    """A UTF-8 file with a few stray bytes would read as latin-1 with every accented word mangled.

    Real latin-1 corpora (deu/esp/ned) hold no valid UTF-8 multi-byte sequence at all, so a file
    where such sequences are at least as common as stray high bytes is UTF-8 with damage.
    """
    utf8 = _UTF8_SEQUENCE.findall(raw)
    high = len(raw) - len(raw.translate(None, bytes(range(0x80, 0x100))))
    stray = high - sum(len(s) for s in utf8)
    if utf8 and len(utf8) >= stray:
        raise CorpusError(path, _line_of(raw, first_bad),
                          f"byte 0x{raw[first_bad]:02x} is not UTF-8, yet the file holds {len(utf8)} UTF-8 characters "
                          "(a mix of encodings)", "Re-save the whole file in one encoding, UTF-8")


def _split_fields(line: str, tabbed: bool) -> list[str]:
    return [f.strip() for f in line.split("\t")] if tabbed else line.split()


def _raw_blocks(path: str, text: str, info: CorpusInfo) -> list[list[tuple[int, str, str]]]:
    """Blank-line separated blocks of (line number, word, raw tag); -DOCSTART- lines removed."""
    lines = text.split("\n")
    info.crlf = any(line.endswith("\r") for line in lines)
    lines = [line.rstrip("\r") for line in lines]
    token_lines = [line for line in lines if line.strip()]
    tabbed = bool(token_lines) and all("\t" in line for line in token_lines)
    info.delimiter = "tab" if tabbed else "whitespace"
    blocks: list[list[tuple[int, str, str]]] = []
    current: list[tuple[int, str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            if current:
                blocks.append(current)
            current = []
            continue
        fields = _split_fields(line, tabbed)
        if fields[0] == DOCSTART:
            info.docstart_dropped += 1
            continue
        if len(fields) < 2 or not fields[-1]:
            raise CorpusError(path, number, f"the line {line.strip()!r} has no tag column",
                              "Write each token as `word TAG` (or the CoNLL columns with the tag last)")
        if not _TAG.match(fields[-1]):
            raise CorpusError(path, number, f"unknown tag {fields[-1]!r}",
                              f"Use O or B-/I- with one of {', '.join(ENTITY_TYPES)}")
        current.append((number, fields[0], fields[-1]))
    if current:
        blocks.append(current)
    _check_columns(path, lines, tabbed, info)
    return blocks


def _check_columns(path: str, lines: list[str], tabbed: bool, info: CorpusInfo) -> None:
    # The same test as _raw_blocks applies, so that a " -DOCSTART-" line is a marker in both.
    token_lines = [(i, len(fields)) for i, line in enumerate(lines, 1) if line.strip()
                   for fields in [_split_fields(line, tabbed)] if fields[0] != DOCSTART]
    counts = Counter(n for _, n in token_lines)
    if not counts:
        raise CorpusError(path, None, "the file holds no token lines, only -DOCSTART- markers",
                          "Give a corpus with at least one sentence")
    info.columns = counts.most_common(1)[0][0]
    info.tag_column = info.columns - 1
    odd = sum(n for c, n in counts.items() if c != info.columns)
    if odd > _MAX_ODD_COLUMN_FRACTION * sum(counts.values()):
        first = next(i for i, n in token_lines if n != info.columns)
        raise CorpusError(path, first, f"mixed column counts ({dict(counts)}; most lines have {info.columns})",
                          "Give every token line the same columns, the NER tag last")
    info.odd_column_lines = odd


def _segment_at_period(blocks):
    """Split one unbroken token stream into segments that end with a '.' token."""
    segments, current = [], []
    for block in blocks:
        for item in block:
            current.append(item)
            if item[1] == ".":
                segments.append(current)
                current = []
    return segments, current


def _detect_scheme(blocks) -> str:
    """IOB1 starts entities with I- (B- only between adjacent same-type entities), IOB2 with B-.

    Decided by the majority of entity starts, so that a few stray tags (deu.testb has B- after O;
    WikiANN zh has I- after O) do not flip a file's scheme.
    """
    b_starts = i_starts = 0
    for block in blocks:
        prev = "O"
        for _, _, tag in block:
            if tag != "O" and (prev == "O" or prev[2:] != tag[2:]):
                b_starts += tag.startswith("B-")
                i_starts += tag.startswith("I-")
            prev = tag
    if not any(tag.startswith("B-") for block in blocks for _, _, tag in block):
        return "IO"
    return "IOB1" if i_starts > b_starts else "IOB2"


def _to_bio(tags: list[str]) -> tuple[list[str], int]:
    """BIO (IOB2) tags from IOB1/IO/IOB2; returns the tags and how many I- were turned into B-."""
    out, changed, prev = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
            changed += 1
        out.append(tag)
        prev = tag
    return out, changed


def drop_misc(tags: Sequence[str]) -> list[str]:
    """MISC entities to O: for targets whose annotation has no MISC type (French, Chinese)."""
    return ["O" if t.endswith("-MISC") else t for t in tags]


FORMATS = ("auto", "sentences", "stream")


def read_corpus(path: str | os.PathLike, misc_to_o: bool = False, split: str | None = None,
                format: str = "auto") -> Corpus:
    """Read a corpus file; `path` may end in '#train'/'#test' to select a split of an unsegmented file.

    `format`: "sentences" (blank lines end sentences), "stream" (a token stream without sentence
    breaks, segmented at each "." token), or "auto" (a stream when the file has no blank line and
    at least 1,000 token lines). Raises CorpusError (a ValueError) naming the file and line of the
    first problem.
    """
    path = os.fspath(path)
    if format not in FORMATS:
        raise CorpusError(path, None, f"unknown format {format!r}", f"Use one of {', '.join(FORMATS)}")
    if "#" in path and split is None:
        path, _, split = path.partition("#")
    if split not in (None, "train", "test"):
        raise CorpusError(path, None, f"unknown split {split!r}", "Use '#train' or '#test'")
    info = CorpusInfo(path=path, split=split, misc_to_o=misc_to_o)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise CorpusError(path, None, "no such file", "Check the path, or set data.root / METANER_DATA") from None
    except IsADirectoryError:
        raise CorpusError(path, None, "is a folder, not a corpus file", "Name a file inside it") from None
    text, info.encoding, info.bom = _decode(path, raw)
    blocks = _raw_blocks(path, text, info)
    dropped_tail = 0
    stream = len(blocks) == 1 and (format == "stream" or (format == "auto" and len(blocks[0]) >= _UNSEGMENTED_MIN_LINES))
    segments, tail = _segment_at_period(blocks) if stream else ([], [])
    if segments and (len(segments) > 1 or format == "stream"):
        info.segmented_at_period = True
        blocks, dropped_tail = segments, len(tail)
        if split is not None:
            blocks = _select_split(blocks, split)
            if not blocks:
                raise CorpusError(path, None, f"the '#{split}' split is empty ({len(segments)} segments in all)",
                                  "Use the whole file (no '#split') or a longer stream")
    elif split is not None:
        raise CorpusError(path, None, f"a '#{split}' split was asked of a file that already has sentence breaks",
                          "Drop the '#split' suffix; splits apply to unsegmented files such as Europeana")
    info.scheme = _detect_scheme(blocks)
    sentences = []
    for block in blocks:
        tags, changed = _to_bio([t for _, _, t in block])
        if changed:
            info.converted = info.converted or info.scheme != "IOB2"
            if info.scheme == "IOB2":
                info.repaired_tags += changed
        if misc_to_o:
            tags = drop_misc(tags)
        sentences.append(Sentence(tuple(w for _, w, _ in block), tuple(tags)))
    _warn(info, dropped_tail)
    return Corpus(sentences, info, dropped_tail)


def _select_split(segments, split: str):
    n_train, n_test = EUROPEANA_SPLIT
    if len(segments) != n_train + n_test:
        # Another stream than the paper's: keep the paper's proportion.
        n_train = round(len(segments) * EUROPEANA_SPLIT[0] / sum(EUROPEANA_SPLIT))
    return segments[:n_train] if split == "train" else segments[n_train:]


def _warn(info: CorpusInfo, dropped_tail: int) -> None:
    if info.repaired_tags:
        logger.warning("%s: %d entities started with I- after O in BIO input; read as B-",
                       info.path, info.repaired_tags)
    if info.odd_column_lines:
        logger.warning("%s: %d lines have a column count other than %d; word taken from the first "
                       "column and tag from the last", info.path, info.odd_column_lines, info.columns)
    if dropped_tail:
        logger.info("%s: %d tokens after the last '.' form no segment and were left out",
                    info.path, dropped_tail)


def entity_spans(tags: tuple[str, ...] | list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) of each BIO entity, end exclusive."""
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.append((kind, start, i))
            start = None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return spans

"""Read NER corpora in every format the project meets into sentences of (words, BIO tags).

One entry point, `read_corpus`, accepts CoNLL-2002/2003 files (2 to 5 columns, IOB1 or IOB2,
latin-1 or UTF-8), the paper's processed files, Europeana's IO-tagged French without sentence
breaks, and WikiANN/PAN-X tab-separated files, and reports what it detected. The label set and
the BIO conversion belong here and nowhere else.

What is checked before a file is parsed: it must be a regular file (a FIFO, a device or a socket
is refused at once, without reading it), every OSError becomes one CorpusError naming the path
and what to do, and the text is UTF-8 or latin-1 with LF, CRLF or CR line ends. Every repair the
reader makes is logged as a warning naming the first lines it touched, and listed in
`CorpusInfo.warnings`.

Memory: the file's bytes are read once and decoded line by line, never held as a second whole
copy; words are shared between their occurrences. Peak memory is at most MEMORY_MULTIPLE times
the file size (plus a fixed 1 MiB), tested in tests/test_bad_inputs.py.
"""
from __future__ import annotations

import codecs
import errno
import io
import logging
import os
import re
import stat
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from trainer.utils.errors import CorpusError
from trainer.utils.paths import SPLIT_SUFFIX, SPLITS, split_selector

logger = logging.getLogger(__name__)

ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
LABELS = ("O",) + tuple(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I"))
# One shared object per tag: a corpus of a million tokens then holds nine tag strings, not a million.
_TAGS = {t: t for t in LABELS}
DOCSTART = "-DOCSTART-"
# Bound on read_corpus's peak memory over the file size. Worst measured: 16-17x, on files of short
# unique words (`1a2b O` lines: each word its own string object); real corpora 4-8x (the reader
# before this bound: 20-60x, e.g. 2.7 GB for a 50 MB stream).
MEMORY_MULTIPLE = 20
# A well-formed UTF-8 multi-byte character (lead byte, then continuation bytes).
_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_HIGH_BYTES = re.compile(rb"[\x80-\xff]+")
# C0 control characters other than tab (CR too, when not a line end) and DEL: invisible, and
# every tokenizer drops them; removed from the line, with a warning.
_CONTROL = re.compile(r"[\x01-\x08\x0b-\x1f\x7f]")
# C1 controls come from a byte of another code page read as latin-1 (ned.testb: 0x81 for "ë");
# they stand for a letter, so they are kept, with a warning.
_C1 = re.compile(r"[\x80-\x9f]")
# Only a trailing "#train"/"#test" selects a split; any other "#" is part of the file name.
_CHUNK = 1 << 20

# Europeana French: the paper splits the unsegmented file at each "." token and uses
# 9,527 segments for training and 2,375 for testing. We keep the file's order and take the first
# 9,527 complete segments as train and the next 2,375 as test, so that no newspaper page is cut
# across the two; the trailing 14 tokens after the last "." are not a complete segment and are
# left out of both splits (with a warning naming their lines).
EUROPEANA_SPLIT = (9527, 2375)
# A file with no blank line and at least this many token lines is a stream without sentence
# breaks (Europeana); it is segmented at "." tokens.
_UNSEGMENTED_MIN_LINES = 1000
# Lines whose column count differs from the file's are a known defect of legacy files
# (ned.testb has 112 lines where a mangled "ë" swallowed the separator before the POS column).
# They are read (word = first column, tag = last) while they stay this rare; more means the
# file is not one format.
_MAX_ODD_COLUMN_FRACTION = 0.01


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
    line_end: str = "LF"  # LF, CRLF, CR, or "LF and CRLF"
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
    control_lines: int = 0  # lines whose C0 control characters were removed
    c1_lines: int = 0  # lines holding C1 control characters (kept)
    misc_to_o: bool = False
    warnings: list[str] = field(default_factory=list)  # one line per repair, naming its first lines


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


class _Touched:
    """How many lines a repair touched and the first few of them, for its warning."""

    def __init__(self) -> None:
        self.count, self.first = 0, []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(line)

    def where(self) -> str:
        more = ", ..." if self.count > len(self.first) else ""
        return f"line{'s' if self.count > 1 else ''} {', '.join(map(str, self.first))}{more}"


# ------------------------------------------------------------------------- bytes and text

# errno of a failed open or read -> (problem, what to do).
_OS_ERRORS = {
    errno.ENOENT: ("no such file", "Check the path, or set data.root / METANER_DATA"),
    errno.EACCES: ("permission denied", "Make the file readable (chmod a+r) or copy it to a readable place"),
    errno.EPERM: ("permission denied", "Make the file readable (chmod a+r) or copy it to a readable place"),
    errno.ELOOP: ("the path is a loop of symbolic links", "Point it at the file itself"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Check each folder named in the path"),
    errno.ENAMETOOLONG: ("the path or a name in it is too long", "Shorten it, or link to the file from a shorter path"),
    errno.EISDIR: ("is a folder, not a corpus file", "Name a file inside it"),
    errno.ENXIO: ("is a socket or a device with nothing behind it, not a regular file", "Give a regular file"),
    errno.EIO: ("input/output error while reading", "Check the disk or the network share holding it"),
}
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def os_error(path: str, err: OSError) -> CorpusError:
    """One CorpusError naming the path for any OSError met while opening or reading it."""
    problem, fix = _OS_ERRORS.get(err.errno, (f"cannot be read ({err.strerror or err})",
                                              "Check the path and the file's permissions"))
    return CorpusError(path, None, problem, fix)


def read_bytes(path: str) -> bytes:
    """The whole content of a regular file; anything else is refused before a byte is read.

    Opened non-blocking so that a FIFO without a writer does not hang the open; a device file
    (/dev/zero) would otherwise be read until memory runs out.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise os_error(path, err) from None
    try:
        st = os.fstat(fd)
        for test, kind in _FILE_KINDS:
            if test(st.st_mode):
                if kind == "a folder":
                    raise CorpusError(path, None, "is a folder, not a corpus file", "Name a file inside it")
                raise CorpusError(path, None, f"is {kind}, not a regular file",
                                  "Give a regular file (save the output of a pipe or device to a file first)")
        if not stat.S_ISREG(st.st_mode):
            raise CorpusError(path, None, "is not a regular file", "Give a regular file")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            # At most the size seen now: a file that grows while read cannot grow memory with it.
            return fh.read(st.st_size)
    except OSError as err:
        raise os_error(path, err) from None
    finally:
        if fd >= 0:
            os.close(fd)


@dataclass
class TextFile:
    """A file's bytes with what is needed to iterate its lines without decoding it whole."""

    path: str
    raw: bytes
    encoding: str  # "utf-8" or "latin-1"
    bom: bool
    line_end: str  # LF, CRLF, CR, "LF and CRLF"

    def lines(self) -> Iterator[str]:
        """Each line without its line end, decoded lazily (a small buffer at a time)."""
        newline = "\r" if self.line_end == "CR" else "\n"
        codec = "utf-8-sig" if self.encoding == "utf-8" else "latin-1"
        # BytesIO shares the bytes object (copy-on-write): no second copy of the file.
        stream = io.TextIOWrapper(io.BytesIO(self.raw), encoding=codec, newline=newline)
        strip_cr = newline == "\n"
        for line in stream:
            if line.endswith(newline):
                line = line[:-1]
            if strip_cr and line.endswith("\r"):
                line = line[:-1]
            yield line

    def line_of(self, offset: int) -> int:
        return self.raw.count(b"\r" if self.line_end == "CR" else b"\n", 0, offset) + 1


def read_text(path: str) -> TextFile:
    """A regular, non-empty, UTF-8 or latin-1 text file; CorpusError naming file:line otherwise."""
    raw = read_bytes(path)
    if re.search(rb"\S", raw) is None:
        raise CorpusError(path, None, "the file is empty", "Point the setting at a corpus with one `word ... TAG` line per token")
    lf, crlf = raw.count(b"\n"), raw.count(b"\r\n")
    if lf:
        line_end = "LF" if not crlf else "CRLF" if crlf == lf else "LF and CRLF"
    else:
        line_end = "CR" if b"\r" in raw else "LF"
    text = TextFile(path, raw, "utf-8", raw.startswith(b"\xef\xbb\xbf"), line_end)
    if b"\x00" in raw:
        # Text corpora hold no NUL bytes; UTF-16 text and compressed archives do.
        raise CorpusError(path, text.line_of(raw.index(b"\x00")), "the file holds NUL bytes: it is UTF-16 or binary "
                          "(compressed?), not a text corpus", "Decompress it or re-save it as UTF-8 text")
    bad = _first_non_utf8(raw)
    if bad is not None:
        _refuse_mixed_encoding(text, bad)
        # CoNLL-2002/2003 non-English files are latin-1; every byte sequence decodes as latin-1.
        text.encoding = "latin-1"
    return text


def _first_non_utf8(raw: bytes) -> int | None:
    """Offset of the first byte that is not UTF-8, checked a chunk at a time (no whole copy)."""
    view, pos = memoryview(raw), 0
    while pos < len(raw):
        final = pos + _CHUNK >= len(raw)
        try:
            _, used = codecs.utf_8_decode(view[pos:pos + _CHUNK], "strict", final)
        except UnicodeDecodeError as err:
            return pos + err.start
        pos += used
        if used == 0:  # an incomplete character in a chunk of its own: cannot happen with 1 MiB chunks
            return pos
    return None


def _refuse_mixed_encoding(text: TextFile, first_bad: int) -> None:
    """A UTF-8 file with a few stray bytes would read as latin-1 with every accented word mangled.

    Real latin-1 corpora (deu/esp/ned) hold no valid UTF-8 multi-byte sequence at all, so a file
    where such sequences are at least as common as stray high bytes is UTF-8 with damage.
    """
    raw = text.raw
    utf8 = utf8_bytes = 0
    for match in _UTF8_SEQUENCE.finditer(raw):
        utf8, utf8_bytes = utf8 + 1, utf8_bytes + match.end() - match.start()
    high = sum(m.end() - m.start() for m in _HIGH_BYTES.finditer(raw))
    if utf8 and utf8 >= high - utf8_bytes:
        raise CorpusError(text.path, text.line_of(first_bad),
                          f"byte 0x{raw[first_bad]:02x} is not UTF-8, yet the file holds {utf8} UTF-8 characters "
                          "(a mix of encodings)", "Re-save the whole file in one encoding, UTF-8")


def split_fields(line: str, tabbed: bool) -> list[str]:
    """Columns separated by tabs (tabbed files) or by runs of spaces and tabs.

    Only ASCII spaces and tabs separate columns, as in conlleval: a non-breaking space is part of
    its word ("10\\u00a0000"), not a column break that would cut it.
    """
    if tabbed:
        return [f.strip(" ") for f in line.split("\t")]
    return [f for f in line.replace("\t", " ").split(" ") if f]


# --------------------------------------------------------------------------------- parsing


@dataclass
class _Block:
    """One sentence (or a whole stream) as read: words, raw tags and their line numbers."""

    words: list
    tags: list
    lines: array


@dataclass
class _Scan:
    """What one pass over the lines finds besides the blocks."""

    counts: Counter = field(default_factory=Counter)  # column count -> token lines
    by_count: dict = field(default_factory=dict)  # column count -> _Touched
    control: _Touched = field(default_factory=_Touched)
    c1: _Touched = field(default_factory=_Touched)


def _is_tabbed(text: TextFile) -> bool:
    """True when every non-blank line holds a tab (WikiANN): then only tabs separate columns."""
    seen = False
    for line in text.lines():
        if _CONTROL.search(line):
            line = _CONTROL.sub("", line)
        if line.strip(" \t"):
            if "\t" not in line:
                return False
            seen = True
    return seen


def _no_tag_column(path: str, number: int, line: str) -> CorpusError:
    hint = ""
    if any(ch.isspace() for ch in line.strip(" \t")):
        hint = " (only spaces and tabs separate columns, not a non-breaking or other Unicode space)"
    return CorpusError(path, number, f"the line {line.strip()!r} has no tag column{hint}",
                       "Write each token as `word TAG` (or the CoNLL columns with the tag last)")


def _token(path: str, number: int, line: str, fields: list[str]) -> tuple[str, str]:
    """(word, tag) of a token line, or a CorpusError naming the line."""
    if len(fields) < 2 or not fields[-1]:
        raise _no_tag_column(path, number, line)
    tag = _TAGS.get(fields[-1])
    if tag is None:
        raise CorpusError(path, number, f"unknown tag {fields[-1]!r}",
                          f"Use O or B-/I- with one of {', '.join(ENTITY_TYPES)}")
    word = fields[0]
    if not word or word.isspace():
        raise CorpusError(path, number, f"the word before the tag is empty or only white space ({word!r})",
                          "Give every token a visible word in the first column")
    return word, tag


def _scan(text: TextFile, tabbed: bool, info: CorpusInfo) -> tuple[list[_Block], _Scan]:
    """Blank-line separated blocks; -DOCSTART- lines removed, control characters handled."""
    path, scan, shared = text.path, _Scan(), {}
    blocks: list[_Block] = []
    current = _Block([], [], array("i"))
    for number, line in enumerate(text.lines(), 1):
        if _CONTROL.search(line):
            line = _CONTROL.sub("", line)
            scan.control.add(number)
        if _C1.search(line):
            scan.c1.add(number)
        if not line.strip(" \t"):
            if current.words:
                blocks.append(current)
                current = _Block([], [], array("i"))
            continue
        fields = split_fields(line, tabbed)
        if fields[0] == DOCSTART:
            info.docstart_dropped += 1
            continue
        word, tag = _token(path, number, line, fields)
        scan.counts[len(fields)] += 1
        scan.by_count.setdefault(len(fields), _Touched()).add(number)
        current.words.append(shared.setdefault(word, word))
        current.tags.append(tag)
        current.lines.append(number)
    if current.words:
        blocks.append(current)
    return blocks, scan


def _check_columns(path: str, scan: _Scan, info: CorpusInfo) -> None:
    if not scan.counts:
        problem = "only -DOCSTART- markers" if info.docstart_dropped else "only blank or control-character lines"
        raise CorpusError(path, None, f"the file holds no token lines, {problem}",
                          "Give a corpus with at least one sentence")
    info.columns = scan.counts.most_common(1)[0][0]
    info.tag_column = info.columns - 1
    odd = {n: t for n, t in scan.by_count.items() if n != info.columns}
    info.odd_column_lines = sum(t.count for t in odd.values())
    if info.odd_column_lines > _MAX_ODD_COLUMN_FRACTION * sum(scan.counts.values()):
        first = min(t.first[0] for t in odd.values())
        raise CorpusError(path, first, f"mixed column counts ({dict(scan.counts)}; most lines have {info.columns})",
                          "Give every token line the same columns, the NER tag last")
    if odd:
        lines = _Touched()
        lines.count = info.odd_column_lines
        lines.first = sorted(n for t in odd.values() for n in t.first)[:3]
        _warn(info, f"{info.odd_column_lines} lines have a column count other than {info.columns} "
                    f"({lines.where()}); word taken from the first column and tag from the last")


def _segment_at_period(block: _Block) -> tuple[list[_Block], _Block]:
    """Split one unbroken token stream into segments that end with a '.' token, and the tail."""
    segments, start = [], 0
    for i, word in enumerate(block.words):
        if word == ".":
            segments.append(_Block(block.words[start:i + 1], block.tags[start:i + 1], block.lines[start:i + 1]))
            start = i + 1
    return segments, _Block(block.words[start:], block.tags[start:], block.lines[start:])


def _detect_scheme(blocks: list[_Block]) -> str:
    """IOB1 starts entities with I- (B- only between adjacent same-type entities), IOB2 with B-.

    Decided by the majority of entity starts, so that a few stray tags (deu.testb has B- after O;
    WikiANN zh has I- after O) do not flip a file's scheme.
    """
    b_starts = i_starts = 0
    any_b = False
    for block in blocks:
        prev = "O"
        for tag in block.tags:
            if tag != "O" and (prev == "O" or prev[2:] != tag[2:]):
                b_starts += tag[0] == "B"
                i_starts += tag[0] == "I"
            any_b = any_b or tag[0] == "B"
            prev = tag
    if not any_b:
        return "IO"
    return "IOB1" if i_starts > b_starts else "IOB2"


def _to_bio(tags: Sequence[str]) -> tuple[list[str], list[int]]:
    """BIO (IOB2) tags from IOB1/IO/IOB2; returns the tags and the positions whose I- became B-."""
    out, changed, prev = [], [], "O"
    for i, tag in enumerate(tags):
        if tag[0] == "I" and (prev == "O" or prev[2:] != tag[2:]):
            tag = _TAGS["B" + tag[1:]]
            changed.append(i)
        out.append(tag)
        prev = tag
    return out, changed


def drop_misc(tags: Sequence[str]) -> list[str]:
    """MISC entities to O: for targets whose annotation has no MISC type (French, Chinese)."""
    return ["O" if t.endswith("-MISC") else t for t in tags]


FORMATS = ("auto", "sentences", "stream")


def _resolve_split(path: str, split: str | None) -> tuple[str, str | None]:
    """The file and split asked for; a '#name' suffix that is no split and no file is named."""
    file, suffix = split_selector(path)
    if suffix is not None and split is not None and suffix != split:
        raise CorpusError(file, None, f"the path selects '#{suffix}' but split={split!r} was asked",
                          "Give the split once, in the path or as the argument")
    split = split or suffix
    if split not in (None, *SPLITS):
        raise CorpusError(file, None, f"unknown split {split!r}", "Use '#train' or '#test'")
    match = SPLIT_SUFFIX.match(file)
    if suffix is None and match and not os.path.lexists(path) and os.path.isfile(match["path"]):
        # "file#dev": no such file, but "file" exists: a mistyped split, not a file name.
        raise CorpusError(match["path"], None, f"unknown split {match['split']!r} (and no file is named {path})",
                          "Use '#train' or '#test'")
    return file, split


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
    path, split = _resolve_split(path, split)
    info = CorpusInfo(path=path, split=split, misc_to_o=misc_to_o)
    text = read_text(path)
    info.encoding, info.bom, info.line_end = text.encoding, text.bom, text.line_end
    info.crlf = "CRLF" in text.line_end
    tabbed = _is_tabbed(text)
    info.delimiter = "tab" if tabbed else "whitespace"
    blocks, scan = _scan(text, tabbed, info)
    del text  # the bytes are no longer needed
    _check_columns(path, scan, info)
    _warn_controls(info, scan)
    blocks, dropped_tail = _segments(path, blocks, format, split, info)
    info.scheme = _detect_scheme(blocks)
    sentences, repaired = [], _Touched()
    for i, block in enumerate(blocks):
        blocks[i] = None  # each block's lists are freed as its sentence is made
        tags, changed = _to_bio(block.tags)
        if changed:
            info.converted = info.converted or info.scheme != "IOB2"
            if info.scheme == "IOB2":
                for j in changed:
                    repaired.add(block.lines[j])
        if misc_to_o:
            tags = drop_misc(tags)
        sentences.append(Sentence(tuple(block.words), tuple(tags)))
    info.repaired_tags = repaired.count
    if repaired.count:
        _warn(info, f"{repaired.count} entities started with I- after O in BIO input ({repaired.where()}); read as B-")
    return Corpus(sentences, info, dropped_tail)


def _segments(path: str, blocks: list[_Block], format: str, split: str | None,
              info: CorpusInfo) -> tuple[list[_Block], int]:
    """The blocks as sentences: a stream is cut at '.' tokens and its split selected."""
    stream = len(blocks) == 1 and (format == "stream" or (format == "auto" and len(blocks[0].words) >= _UNSEGMENTED_MIN_LINES))
    segments, tail = _segment_at_period(blocks[0]) if stream else ([], None)
    if segments and (len(segments) > 1 or format == "stream"):
        info.segmented_at_period = True
        if tail.words:
            _warn(info, f"the {len(tail.words)} tokens after the last '.' (lines {tail.lines[0]}-{tail.lines[-1]}) "
                        "form no segment and were left out")
        if split is not None:
            selected = _select_split(segments, split)
            if not selected:
                raise CorpusError(path, None, f"the '#{split}' split is empty ({len(segments)} segments in all)",
                                  "Use the whole file (no '#split') or a longer stream")
            segments = selected
        return segments, len(tail.words)
    if split is not None:
        raise CorpusError(path, None, f"a '#{split}' split was asked of a file that already has sentence breaks",
                          "Drop the '#split' suffix; splits apply to unsegmented files such as Europeana")
    return blocks, 0


def _select_split(segments, split: str):
    n_train, n_test = EUROPEANA_SPLIT
    if len(segments) != n_train + n_test:
        # Another stream than the paper's: keep the paper's proportion.
        n_train = round(len(segments) * EUROPEANA_SPLIT[0] / sum(EUROPEANA_SPLIT))
    return segments[:n_train] if split == "train" else segments[n_train:]


def _warn_controls(info: CorpusInfo, scan: _Scan) -> None:
    info.control_lines, info.c1_lines = scan.control.count, scan.c1.count
    if scan.control.count:
        _warn(info, f"control characters removed from {scan.control.count} lines ({scan.control.where()}); "
                    "they are invisible and no tokenizer keeps them")
    if scan.c1.count:
        _warn(info, f"{scan.c1.count} lines hold C1 control characters U+0080-U+009F ({scan.c1.where()}), kept: "
                    "bytes of another code page read as latin-1; re-save the file as UTF-8 to fix the words")


def _warn(info: CorpusInfo, message: str) -> None:
    info.warnings.append(message)
    logger.warning("%s: %s", info.path, message)


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

"""Markdown tables, the one format every results page, job summary and comparison prints."""
from __future__ import annotations

from typing import Iterable, Sequence


def markdown(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-style table: the header, its rule, one line per row (cells as given, str()'d)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

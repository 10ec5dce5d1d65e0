"""The errors a user can act on: a setting, a corpus, a checkpoint or another input that cannot
work, the message naming it and what to do.

A job shows one of these as a single `error:` line (jobs.common.main_guard); anything else is a
bug or a failure of the machine, shown with its traceback. They are ValueErrors, so that callers
written before these types existed (`except ValueError`) still catch them.
"""
from __future__ import annotations

from typing import Sequence


class MetanerError(ValueError):
    """A problem the user can fix, named in the message with what to do."""


class ConfigError(MetanerError):
    """Every problem found in one configuration, one line each, naming the key (and file:line)."""

    def __init__(self, problems: str | Sequence[str]):
        problems = [problems] if isinstance(problems, str) else problems
        self.problems = list(dict.fromkeys(problems))  # in order, each once
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(text)

    def __reduce__(self):
        # Ray sends a worker's exception to the driver by pickling; args hold the joined text.
        return type(self), (self.problems,)


class CorpusError(MetanerError):
    """A corpus file cannot be read; the message names the file, the line and what to do."""

    def __init__(self, path: str, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {problem}. {fix}")
        self.path, self.line, self.problem, self.fix = path, line, problem, fix

    def __reduce__(self):
        return type(self), (self.path, self.line, self.problem, self.fix)


class CheckpointError(MetanerError):
    """A checkpoint folder that is missing, damaged, or does not fit what it is used with."""


class InputError(MetanerError):
    """What a job was given besides settings (files to tag, --out folders, run ids, options)
    cannot be used."""

"""How a command ends on an error: a bad setting or input in one `error:` line (exit 2), anything
else with its traceback (exit 1); --debug and METANER_DEBUG=1 show every traceback. Jobs run
in-process, their console captured."""
import logging
import pickle

import pytest

from trainer.config import ConfigError as ConfigErrorOfConfig
from trainer.data.corpus import CorpusError as CorpusErrorOfCorpus
from trainer.utils.errors import CheckpointError, ConfigError, CorpusError, InputError, MetanerError

TRACEBACK = "Traceback (most recent call last):"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    for name in ("METANER_DEBUG", "METANER_VERBOSE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _logging_as_before():
    """A job run in-process leaves its console handler on the root logger, writing to this test's
    captured stderr, which is closed once the test ends: later tests must not log into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _demo(capsys, tmp_path, *argv):
    from jobs.demo import main

    status = main(["--out", str(tmp_path / "out"), *argv, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    return status, capsys.readouterr().err


def test_the_project_errors_are_value_errors_under_one_base():
    assert ConfigErrorOfConfig is ConfigError and CorpusErrorOfCorpus is CorpusError
    for kind in (ConfigError, CorpusError, CheckpointError, InputError):
        assert issubclass(kind, MetanerError) and issubclass(kind, ValueError)
    # A worker's error reaches the driver pickled, its message whole.
    for err in (ConfigError(["a: bad", "b: bad"]), CorpusError("x.txt", 3, "unknown tag", "Fix it")):
        assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_a_bad_setting_ends_in_one_error_line_with_exit_2(tmp_path, capsys):
    status, err = _demo(capsys, tmp_path, "train.meta_lr=-1")
    assert status == 2
    assert err.splitlines() == ["error: train.meta_lr: must be positive"], err


def test_a_bad_input_after_the_log_file_is_one_line_there_with_its_traceback(tmp_path, capsys):
    status, err = _demo(capsys, tmp_path, "--data", str(tmp_path / "none"))
    assert status == 2 and TRACEBACK not in err, err
    assert err.splitlines()[-1] == f"error: --data {tmp_path / 'none'}: no such folder; give the data root " \
                                   "(e.g. ../shared/data)", err
    log = (tmp_path / "out" / "logs" / "job.log").read_text(encoding="utf-8")
    assert TRACEBACK in log and "InputError: --data" in log


def _explode():
    raise RuntimeError("shape [3, 4] does not fit [4, 3]")


@pytest.mark.parametrize("error", [RuntimeError, ValueError, MemoryError])
def test_an_unexpected_error_keeps_its_traceback_with_exit_1(tmp_path, capsys, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error("shape [3, 4] does not fit [4, 3]")

    monkeypatch.setattr("jobs.demo.data_folder", broken)
    status, err = _demo(capsys, tmp_path)
    assert status == 1, err
    assert TRACEBACK in err and f"{error.__name__}: shape [3, 4] does not fit [4, 3]" in err, err
    assert "in broken" in err and "error: " not in err  # where it was raised, not one line
    log = (tmp_path / "out" / "logs" / "job.log").read_text(encoding="utf-8")
    assert TRACEBACK in log and "in broken" in log


def test_a_file_error_is_one_line(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        open(tmp_path / "no-such-file")

    monkeypatch.setattr("jobs.demo.data_folder", missing)
    status, err = _demo(capsys, tmp_path)
    assert status == 2 and TRACEBACK not in err, err
    assert err.splitlines()[-1].startswith("error: [Errno 2] No such file or directory:"), err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_of_a_bad_setting_too(tmp_path, capsys, monkeypatch, how):
    extra = ["--debug"] if how == "flag" else []
    if how == "environment":
        monkeypatch.setenv("METANER_DEBUG", "1")
    status, err = _demo(capsys, tmp_path, *extra, "train.meta_lr=-1")
    assert status == 2, err
    assert TRACEBACK in err and "ConfigError: train.meta_lr: must be positive" in err, err
    assert "in load_config" in err and "error: train.meta_lr" not in err


def test_the_read_only_commands_end_alike(tmp_path, capsys, monkeypatch):
    from jobs import compare

    assert compare.main([str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert compare.main([str(tmp_path / "none"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert TRACEBACK in err and "InputError:" in err

    monkeypatch.setattr(compare, "compare", lambda *a, **k: _explode())
    assert compare.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert TRACEBACK in err and "RuntimeError: shape [3, 4]" in err and "in _explode" in err


def test_metaner_inspect_and_score_end_alike(tmp_path, capsys, monkeypatch):
    from jobs import cli

    bad = tmp_path / "bad.txt"
    bad.write_text("John Q-PER\n", encoding="utf-8")
    assert cli.main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"metaner inspect: {bad}:1: unknown tag 'Q-PER'. Use O or B-/I- with one of PER, LOC, ORG, MISC\n"
    assert cli.main(["inspect", str(bad), "--debug"]) == 2
    err = capsys.readouterr().err
    assert TRACEBACK in err and "CorpusError:" in err
    assert cli.main(["score", str(bad), "--types", ",,"]) == 2
    assert capsys.readouterr().err.startswith("metaner score: --types ',,':")

    monkeypatch.setattr("jobs.cli.read_corpus", lambda *a, **k: _explode())
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert TRACEBACK in err and "in _explode" in err


def test_metaner_passes_debug_on_to_a_job(tmp_path, capsys):
    from jobs import cli

    argv = ["demo", "--out", str(tmp_path / "out")]
    tracking = f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"
    assert cli.main([*argv, tracking, "train.meta_lr=-1"]) == 2
    assert capsys.readouterr().err == "error: train.meta_lr: must be positive\n"
    assert cli.main([*argv, "--debug", tracking, "train.meta_lr=-1"]) == 2
    assert TRACEBACK in capsys.readouterr().err

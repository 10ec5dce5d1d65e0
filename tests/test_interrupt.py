"""Work already done survives a process killed mid-write: real writers run in a subprocess that is
interrupted (SIGINT) or killed (SIGKILL) while a file is being written, then the result is checked
and the work is run again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


# A shell's background job (nohup, `&`) starts with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: the writer takes Ctrl-C's handler back, as a terminal user has it.
_CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CTRL_C + script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _interrupt_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 30.0) -> None:
    """Send `sig` as soon as `ready()` holds (polled every millisecond); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the writer ended (rc {proc.returncode}) before it could be interrupted: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer never reached the point to interrupt")
        time.sleep(0.001)
    proc.send_signal(sig)
    proc.wait(timeout=30)


# ------------------------------------------------------------------------- retrieval cache

_CACHE_WRITER = """
import sys
import numpy as np
from retrieval.cache import RetrievalCache
cache = RetrievalCache(sys.argv[1])
rows = int(sys.argv[2])
out = cache.get_or_compute("embeddings", {"encoder": "e", "corpus": "c"}, rows, np.float32,
                           lambda: np.full((rows, 1024), 0.5, np.float32))
print("done", out.shape[0], float(out.sum()))
"""
_ROWS = 60_000  # 245 MB: long enough to write that the signal lands mid-write


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_cache_entry_cut_short_is_never_served_and_a_rerun_completes(tmp_path, sig):
    from retrieval.cache import RetrievalCache

    root = tmp_path / "cache"
    proc = _start(_CACHE_WRITER, str(root), str(_ROWS))
    _interrupt_when(proc, lambda: any(p.stat().st_size > 0 for p in root.glob("*.tmp")) if root.is_dir() else False,
                    sig)
    assert proc.returncode != 0
    cache = RetrievalCache(root)
    entry = cache.path("embeddings", {"encoder": "e", "corpus": "c"})
    assert not os.path.exists(entry) and cache.load(entry, _ROWS, np.float32) is None
    leftovers = list(root.glob("*.tmp"))
    if sig == signal.SIGINT:
        assert leftovers == []  # the writer removed its own temporary file on the way out
    rerun = _start(_CACHE_WRITER, str(root), str(_ROWS))
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert out.split() == ["done", str(_ROWS), str(0.5 * _ROWS * 1024)]
    array = cache.load(entry, _ROWS, np.float32)
    assert array is not None and array.shape == (_ROWS, 1024) and float(array[-1, -1]) == 0.5


def test_an_entry_cut_short_by_another_writer_is_recomputed(tmp_path):
    from retrieval.cache import RetrievalCache

    cache = RetrievalCache(tmp_path)
    parts = {"encoder": "e", "corpus": "c"}
    full = tmp_path / "full.npy"
    np.save(full, np.ones((100, 16), np.float32))
    Path(cache.path("embeddings", parts)).write_bytes(full.read_bytes()[:2000])
    calls = []
    array = cache.get_or_compute("embeddings", parts, 100, np.float32,
                                 lambda: calls.append(1) or np.ones((100, 16), np.float32))
    assert calls == [1] and array.shape == (100, 16)
    assert cache.load(cache.path("embeddings", parts), 100, np.float32) is not None


# -------------------------------------------------------------------- adapter pool results

_UNIT_WRITER = """
import sys
from cluster.adapt_pool import UnitStore
store = UnitStore(sys.argv[1])
tags = {i: ["B-PER", "I-PER"] + ["O"] * 40 for i in range(20000)}
for n in range(10000):
    store.save(f"es-{n:06d}", tags)
"""


def test_unit_store_keeps_finished_units_valid_after_a_kill(tmp_path):
    from cluster.adapt_pool import UnitStore

    folder = tmp_path / "units"
    proc = _start(_UNIT_WRITER, str(folder))
    # Killed while a unit is half written (trainer.utils.paths.atomic_file: a hidden .<name>.<random>.tmp).
    _interrupt_when(proc, lambda: len(list(folder.glob("*.json"))) >= 3 and any(folder.glob(".*.json.*.tmp")),
                    signal.SIGKILL)
    store = UnitStore(folder)
    done = store.done()
    assert len(done) >= 3
    # A file still being written is never taken for a finished unit.
    (folder / ".es-999999.json.k2x9.tmp").write_text('{"0": ["O"')
    assert store.done() == done and not any(d.endswith(".tmp") or ".json" in d for d in done)
    for unit_id in done:
        tags = store.load(unit_id)
        assert len(tags) == 20000 and tags[19999][:2] == ["B-PER", "I-PER"]
    # Work goes on from where it stopped: the next unit is saved beside the finished ones.
    store.save("es-999999", {0: ["O"]})
    assert store.done() == done | {"es-999999"} and store.load("es-999999") == {0: ["O"]}


# -------------------------------------------------------------------------------- checkpoints

_CHECKPOINT_WRITER = """
import sys
import torch
from transformers import BertConfig, BertModel
from trainer.training.checkpoint import save_checkpoint
from trainer.modules.model import NerModel
encoder = BertModel(BertConfig(vocab_size=20000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=256, max_position_embeddings=64))
model = NerModel(encoder)
for step in range(1, 10000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    save_checkpoint(sys.argv[1], model, config={"step": step}, meta={"step": step},
                    trainer_state={"step": step, "moments": torch.full((200000,), float(step))})
    print(step, flush=True)
"""


def test_checkpoint_overwritten_when_killed_is_whole_old_or_whole_new(tmp_path):
    import torch

    from trainer.training.checkpoint import load_model, load_trainer_state

    folder = tmp_path / "ckpt"
    proc = _start(_CHECKPOINT_WRITER, str(folder))
    # Killed while a later save is writing its files, with an earlier save already in place.
    _interrupt_when(proc, lambda: folder.is_dir() and any(tmp_path.glob(".ckpt.partial-*/model.safetensors")),
                    signal.SIGKILL, timeout=60)
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
    if not folder.is_dir():  # killed between the two renames: the previous checkpoint is kept aside
        folder, = tmp_path.glob(".ckpt.old-*")
    model, _, info = load_model(folder, load_tokenizer=False)
    step = info["meta"]["step"]
    assert step >= 1 and info["config"] == {"step": step}
    assert all(torch.all(p == step) for p in model.parameters())
    state = load_trainer_state(folder)
    assert state["step"] == step and torch.all(state["moments"] == step)
    assert json.loads((folder / "labels.json").read_text()) == list(model.labels)

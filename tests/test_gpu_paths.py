"""What GPU meta-training depends on, checked where this machine can: the DeepSpeed accelerator
follows cluster.use_gpu, every collective goes through the helpers that put its tensor on the
process group's device, the ranks agree on one chunk size and every task of a meta-batch is summed
exactly once, and a checkpoint's RNG state restores where fewer GPUs are visible."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from trainer.config import load_config
from trainer.utils.errors import ConfigError

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "scatter_object_list", "barrier", "all_to_all", "send", "recv",
               "isend", "irecv"}


def test_the_deepspeed_accelerator_follows_use_gpu_not_the_shell(monkeypatch):
    from cluster.meta_train import worker_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as CI and this README's CPU set-up export it
    assert worker_env(True)["DS_ACCELERATOR"] == "cuda"
    assert worker_env(False)["DS_ACCELERATOR"] == "cpu"


def _collective_calls(path: Path) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls of a collective in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed", "distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_every_collective_goes_through_the_group_device_helpers():
    files = [p for room in ("trainer", "cluster") for p in sorted((REPO / room).rglob("*.py"))]
    helpers = REPO / "trainer" / "utils" / "distributed.py"
    outside = [c for p in files if p != helpers for c in _collective_calls(p)]
    assert outside == [], "collectives called outside trainer/utils/distributed.py (NCCL needs CUDA tensors)"
    # Inside the helpers, a tensor collective takes what group_device() says, never the caller's device.
    source = helpers.read_text()
    assert "def group_device" in source and "tensor.to(device)" in source


def _one_rank(_rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.utils.distributed import agree_min, all_reduce_sum, group_device

    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    stats = all_reduce_sum(torch.tensor([1.5, 2.0], dtype=torch.float64))
    with open(out, "w") as f:
        json.dump({"device": str(group_device()), "stats": stats.tolist(), "dtype": str(stats.dtype),
                   "min": agree_min(7)}, f)
    dist.destroy_process_group()


def test_collectives_on_a_gloo_group_keep_the_callers_tensor(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_one_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "out")), nprocs=1)
    got = json.loads((tmp_path / "out").read_text())
    assert got == {"device": "cpu", "stats": [1.5, 2.0], "dtype": "torch.float64", "min": 7}


# ------------------------------------------------------------------------------ chunks and tasks

def _cfg(model_path: str):
    return load_config(None, [f"model.name_or_path={model_path}", "model.dropout=0.0", "model.num_frozen_layers=1",
                              "model.max_length=32", "model.window_context=4", "train.meta_batch_size=8",
                              "train.num_meta_steps=2", "train.inner_lr=1e-3", "train.meta_lr=1e-3",
                              "train.mask_ratio=0.3"])


def _trainer(model_path: str, rank: int = 0, world: int = 1):
    from jobs.synthetic import make_sentences
    from trainer.data.features import Featurizer
    from trainer.modules.model import build_model, load_tokenizer
    from trainer.training.meta_trainer import MetaTrainer

    cfg = _cfg(model_path)
    torch.manual_seed(95)
    model = build_model(cfg, seed=95)
    featurizer = Featurizer(load_tokenizer(model_path), cfg.model.max_length, cfg.model.window_context, model.labels)
    source = make_sentences("en", 30, seed=1)
    support = np.array([[(i + 1) % 30, (i + 7) % 30] for i in range(30)])
    return MetaTrainer(model, featurizer, cfg, source, support, seed=95, rank=rank, world_size=world)


def _one_copy_bytes(trainer) -> int:
    engine = trainer.engine
    return sum(p.numel() * p.element_size() for n, p in zip(engine.names, engine.params) if n in engine._used)


def _rank(rank: int, world: int, init: str, model_path: str, out: str, agree: bool) -> None:
    import torch.distributed as dist

    from trainer.utils.distributed import all_reduce_sum, chunk_claims

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    trainer = _trainer(model_path, rank, world)
    trainer.claims = chunk_claims()
    one = _one_copy_bytes(trainer)
    # Different memory budgets: rank 0 holds one task's weight copies, rank 1 eight.
    trainer.engine.budget_bytes = one * (1 if rank == 0 else 8)
    result = {}
    if not agree:  # each rank's own size, as when it was read from each GPU every step
        trainer.engine.capacity = trainer.engine.machine_capacity()
    try:
        buffer, totals = trainer.meta_gradient(0)
        result["capacity"] = trainer.engine.capacity
        result["grads"] = [all_reduce_sum(b).tolist() for b in buffer]
        trainer.step = 1  # step 0's claims are spent: the checked step is the next one
        trainer.train_step()
    except RuntimeError as err:
        result["error"] = str(err)
    if rank == 0 or "error" in result:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("agree", [True, False])
def test_ranks_with_different_memory_agree_on_chunks_and_sum_each_task_once(tiny_bert_no_dropout, tmp_path, agree):
    """Two gloo ranks claiming one batch's chunks: with the agreed (smallest) chunk size, their
    summed meta-gradient is the single process's; with each rank's own size, a task is summed
    twice or skipped, and the step stops with an error naming it."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "got")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", tiny_bert_no_dropout, out, agree), nprocs=2)
    got = {r: json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1) if Path(f"{out}.{r}").is_file()}
    if not agree:
        errors = [g["error"] for g in got.values() if "error" in g]
        assert errors and "more than once" in errors[0] and "every rank must cut the batch" in errors[0]
        return
    assert "error" not in got[0] and got[0]["capacity"] == 1
    single = _trainer(tiny_bert_no_dropout)
    expected, totals = single.meta_gradient(0)
    assert sorted(totals["summed"]) == list(range(8))
    for name, g, e in zip(single.names, got[0]["grads"], expected):
        torch.testing.assert_close(torch.tensor(g, dtype=e.dtype), e, rtol=1e-5, atol=1e-7, msg=name)


def test_the_chunk_size_is_read_once_not_every_step(tiny_bert_no_dropout):
    trainer = _trainer(tiny_bert_no_dropout)
    trainer.engine.budget_bytes = _one_copy_bytes(trainer) * 3
    trainer.train_step()
    trainer.engine.budget_bytes = _one_copy_bytes(trainer)  # less memory free after the first step
    trainer.train_step()
    assert trainer.engine.capacity == 3 and trainer.engine.chunk_size(8) == 3


# ------------------------------------------------------------------------------ RNG state and GPU counts

class _Gpus:
    """torch.cuda's RNG calls over `count` visible devices (this machine has none): what a
    checkpoint written on a node with more GPUs meets on one with fewer."""

    def __init__(self, count: int):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]

    def install(self, monkeypatch) -> None:
        def device(i=None):
            i = 0 if i is None or i == "cuda" else int(str(i).split(":")[-1])
            if i >= len(self.states):
                raise IndexError(f"invalid device {i}: {len(self.states)} visible")
            return i

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d="cuda": self.states[device(d)].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])

        def set_state(state, d="cuda"):
            self.states[device(d)] = state.clone()

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [set_state(s, i) for i, s in enumerate(states)])


def test_a_checkpoint_from_more_gpus_restores_where_fewer_are_visible(monkeypatch):
    from trainer.training.checkpoint import rng_state, set_rng_state

    _Gpus(4).install(monkeypatch)
    saved = rng_state()
    assert isinstance(saved["cuda"], torch.Tensor), "only the current device's state is saved"
    fewer = _Gpus(1)
    fewer.install(monkeypatch)
    fewer.states[0] = torch.full((16,), 9, dtype=torch.uint8)
    set_rng_state(saved)
    assert torch.equal(fewer.states[0], torch.zeros(16, dtype=torch.uint8))  # device 0's state, back
    # A state written by the earlier format (every visible GPU's) restores the current device's.
    set_rng_state({"torch": saved["torch"], "cuda": [torch.full((16,), 5, dtype=torch.uint8)] * 3})
    assert torch.equal(fewer.states[0], torch.full((16,), 5, dtype=torch.uint8))


# ------------------------------------------------------------------------------ GPUs asked of a CPU torch

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a torch that sees no GPU")
def test_a_gpu_job_on_a_torch_without_cuda_is_refused_before_ray_starts():
    import subprocess
    import sys

    script = ("import ray\nfrom jobs.common import start_cluster\nfrom trainer.config import load_config\n"
              "try:\n    start_cluster(load_config(None, ['cluster.use_gpu=true']), ('train',))\n"
              "except ValueError as err:\n    print('refused:', err, '| ray started:', ray.is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"})
    assert "refused: cluster.use_gpu=true" in done.stdout and "install a CUDA build of torch" in done.stdout
    assert done.stdout.strip().endswith("ray started: False"), done.stdout + done.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a worker that sees no GPU")
def test_a_gpu_worker_that_sees_no_gpu_stops_instead_of_running_on_the_cpu():
    from cluster.meta_train import gpu_device

    with pytest.raises(ConfigError, match="cluster.use_gpu=true, but this worker .* sees no GPU"):
        gpu_device()

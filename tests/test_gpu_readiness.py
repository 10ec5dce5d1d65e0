"""What a GPU run refuses before any work, and, marked `gpu`, what only a CUDA device can show.

Without CUDA the `gpu` tests are skipped, saying so; they are part of the default run, and
`python -m pytest -q -m gpu` (or benchmarks/gpu_check.py) runs them alone. The refusals of a torch
without CUDA are checked for real here, where torch is a CPU build.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, load_config

GIB = 1 << 30
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"no CUDA device (torch {torch.__version__} sees no GPU)")
needs_cpu_torch = pytest.mark.skipif(torch.version.cuda is not None,
                                     reason="torch is a CUDA build here: the refusal of a CPU build cannot be seen")


# ------------------------------------------------------------------------------ refusals, anywhere


@needs_cpu_torch
def test_gpus_asked_of_a_torch_without_cuda_are_refused_naming_a_cuda_install():
    from cluster.runtime import cuda_problems

    install = f"install a CUDA build of torch, e.g. `pip install torch=={torch.__version__.split('+')[0]} " \
              "--index-url https://download.pytorch.org/whl/cu128`"
    train = cuda_problems(load_config(None, ["cluster.use_gpu=true"]), ("train",))
    assert len(train) == 1 and train[0].startswith("cluster.use_gpu=true, but this torch") and install in train[0]
    assert "or set cluster.use_gpu=false to run on the CPU" in train[0]
    actors = cuda_problems(load_config(None, ["cluster.gpus_per_actor=0.5"]), ("adapt",), local=False)
    assert len(actors) == 1 and "cluster.gpus_per_actor=0.5" in actors[0] and install in actors[0]
    # Only the phases that take GPUs; nothing asked, nothing to refuse.
    assert cuda_problems(load_config(None, ["cluster.use_gpu=true"]), ("retrieval", "adapt")) == []
    assert cuda_problems(load_config(None, ["cluster.gpus_per_actor=0.5"]), ("train",)) == []
    assert cuda_problems(load_config(None, []), ("train", "retrieval", "adapt", "tag")) == []


@needs_cpu_torch
def test_the_job_start_up_check_refuses_gpu_training_with_a_cpu_torch(ray_local):
    from cluster.runtime import check_resources

    cfg = load_config(None, ["cluster.use_gpu=true", "cluster.num_workers=1", "cluster.cpus_per_worker=1"])
    with pytest.raises(ValueError) as err:
        check_resources(cfg, ("train",))
    lines = str(err.value).splitlines()
    # Both: the GPU this 0-GPU cluster lacks, and the torch that could not use it anyway.
    assert any("cluster.use_gpu asks for 1 GPUs" in line for line in lines)
    assert any("built without CUDA" in line and "download.pytorch.org/whl/cu128" in line for line in lines)
    check_resources(load_config(None, ["cluster.num_workers=1", "cluster.cpus_per_worker=1"]), ("train",))


def test_a_plan_of_actors_sharing_a_gpu_is_refused_only_where_it_cannot_fit():
    from cluster.runtime import gpu_plan_problem

    assert gpu_plan_problem(3 * GIB, 3, 10 * GIB) is None
    assert gpu_plan_problem(3 * GIB, 4, None) is None  # memory unknown: not checked
    four = gpu_plan_problem(3 * GIB, 4, 10 * GIB)
    assert four == ("cluster.gpus_per_actor: 4 actors of about 3.0 GiB each would share a GPU of 10.0 GiB (12.0 GiB "
                    "needed); let at most 3 share a GPU: raise cluster.gpus_per_actor to 0.3333")
    alone = gpu_plan_problem(11 * GIB, 1, 10 * GIB)
    assert "an actor of about 11.0 GiB needs more than a GPU of 10.0 GiB" in alone and "gpus_per_actor=0" in alone


def test_fractional_gpu_actors_are_estimated_and_checked_against_the_nodes_gpus(tiny_bert, caplog):
    from cluster.runtime import CUDA_CONTEXT_BYTES, FAISS_SCRATCH_BYTES, gpu_memory_problems, model_weight_bytes

    weights = model_weight_bytes(tiny_bert)
    assert weights and weights < 2 * 2 ** 20  # the tiny BERT's safetensors
    t4 = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:T4": 1.0}}]
    settings = [f"model.name_or_path={tiny_bert}", "model.num_frozen_layers=1", "cluster.num_embed_actors=6",
                "cluster.num_index_shards=6", "cluster.num_adapter_actors=2"]
    with caplog.at_level(logging.INFO, logger="cluster.runtime"):
        # 10 actors on a 16 GiB GPU: the index shards (context + FAISS scratch: 2 GiB) do not fit ten at once.
        problems = gpu_memory_problems(load_config(None, settings + ["cluster.gpus_per_actor=0.1"]),
                                       ("retrieval", "adapt"), t4, local=False)
    assert len(problems) == 1 and "10 actors of about 2.0 GiB" in problems[0] and "retrieval phase" in problems[0]
    assert "raise cluster.gpus_per_actor to 0.125" in problems[0] and "accelerator types ['T4']" in problems[0]
    assert (CUDA_CONTEXT_BYTES + FAISS_SCRATCH_BYTES) == 2 * GIB
    assert any("GPU plan, adapt phase: up to 2 actors share a GPU" in r.getMessage() for r in caplog.records)
    fits = load_config(None, settings + ["cluster.gpus_per_actor=0.125"])
    assert gpu_memory_problems(fits, ("retrieval", "adapt", "tag"), t4, local=False) == []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cluster.runtime"):
        unknown = [{"Alive": True, "Resources": {"GPU": 1.0, "accelerator_type:XYZ9": 1.0}}]
        assert gpu_memory_problems(load_config(None, settings + ["cluster.gpus_per_actor=0.1"]), ("retrieval",),
                                   unknown, local=False) == []
    assert any("GPU memory unknown" in r.getMessage() and "not checked" in r.getMessage() for r in caplog.records)
    # Whole GPUs per actor, or none: nothing is shared, nothing estimated.
    assert gpu_memory_problems(load_config(None, settings), ("retrieval",), t4, local=False) == []


def test_faiss_limits_on_a_gpu_are_refused_at_load_naming_each_key():
    big = ["retrieval.k=2100", "retrieval.index=ivf", "retrieval.ivf_nlist=4096", "retrieval.ivf_nprobe=3000"]
    with pytest.raises(ConfigError) as err:
        load_config(None, big + ["cluster.gpus_per_actor=0.5"])
    assert [p.split(":")[0] for p in err.value.problems] == ["retrieval.k", "retrieval.ivf_nprobe"]
    assert all("at most 2048" in p and "cluster.gpus_per_actor=0" in p for p in err.value.problems)
    load_config(None, big)  # index shards on the CPU: no such limit
    # A flat index probes nothing, so its nprobe is not refused.
    load_config(None, ["retrieval.ivf_nlist=4096", "retrieval.ivf_nprobe=3000", "cluster.gpus_per_actor=0.5"])


def test_the_benchmarks_accelerator_follows_the_device(monkeypatch):
    from benchmarks._setup import set_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as a CPU shell exports it
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)  # not imported yet, as in a fresh script
    set_accelerator("cuda")
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    set_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"


# ------------------------------------------------------------------------------ on a GPU


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def nccl_group():
    """A one-rank NCCL process group in this process, destroyed after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@gpu
@needs_cuda
def test_nccl_sums_a_stats_tensor_built_on_the_cpu_and_hands_it_back_there(nccl_group):
    from trainer.utils.distributed import agree_min, all_reduce_sum, barrier, group_device

    assert group_device() == torch.device("cuda", 0)
    stats = torch.tensor([1.5, 2.0, 8.0], dtype=torch.float64)  # losses and counts, as the trainer builds them
    out = all_reduce_sum(stats)
    assert out is stats and out.device.type == "cpu" and out.tolist() == [1.5, 2.0, 8.0]
    on_gpu = torch.ones(3, device="cuda")
    assert all_reduce_sum(on_gpu).device.type == "cuda"
    assert agree_min(7) == 7
    barrier()


def _tiny_engine(path, device: str, compile_updates: str = "never"):
    from torch import nn

    from jobs.synthetic import make_sentences
    from trainer.data.features import Featurizer, group_windows, labels_for
    from trainer.data.sampling import Task
    from trainer.modules.bottom import FrozenBottom
    from trainer.modules.model import NerModel, freeze, load_tokenizer
    from trainer.training.engine import TaskEngine

    cfg = load_config(None, ["train.schedule_inner_lr=false", "train.warmup_proportion=0.0", "train.mask_ratio=0.5",
                             "train.inner_lr=0.001", f"train.compile_updates={compile_updates}"])
    labels = labels_for(cfg.train.loss_positions)
    model = NerModel.from_pretrained(path, labels, dropout=0.0, seed=0)
    freeze(model, 1)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model = model.double().to(device)
    featurizer = Featurizer(load_tokenizer(path), max_length=16, context=4, labels=labels)
    source = group_windows(featurizer.encode(make_sentences("en", 12, seed=1)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    tasks = [Task((i, (i + 3) % 12), (i + 6) % 12) for i in range(6)]
    return engine, tasks, source, cfg


@gpu
@needs_cuda
def test_ranks_on_gpus_agree_on_one_chunk_size(tiny_bert_no_dropout, nccl_group):
    from trainer.utils.distributed import agree_min

    engine, tasks, source, _ = _tiny_engine(tiny_bert_no_dropout, "cuda")
    own = engine.machine_capacity()  # from the GPU's free memory
    assert own >= 1
    engine.capacity = agree_min(own)  # what MetaTrainer does before its first step
    assert engine.capacity == own and engine.chunk_size(len(tasks)) == min(own, len(tasks))
    # The size is read once: a smaller budget later changes nothing.
    engine.budget_bytes = 1
    assert engine.chunk_size(len(tasks)) == min(own, len(tasks))


@gpu
@needs_cuda
def test_a_meta_gradient_on_cuda_equals_the_cpu_one(tiny_bert_no_dropout):
    results = {}
    for device in ("cuda", "cpu"):
        engine, tasks, source, cfg = _tiny_engine(tiny_bert_no_dropout, device)
        grads, totals = engine.meta_gradient(tasks, source, epoch=2, inner_lr=cfg.train.inner_lr)
        results[device] = (engine.names, [g.cpu() for g in grads], totals)
    names, on_gpu, totals = results["cuda"]
    for name, a, b in zip(names, on_gpu, results["cpu"][1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=name)  # float64: rounding only
    assert totals["tasks"] == 6 and totals["meta_loss"] == pytest.approx(results["cpu"][2]["meta_loss"], rel=1e-9)


@gpu
@needs_cuda
def test_faiss_on_the_gpu_answers_beyond_2048_neighbours_through_its_cpu_copy():
    import faiss

    from retrieval.index import IndexShard, brute_force

    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU (a CPU-only faiss build beside a CUDA torch)")
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(3000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:20]
    shard = IndexShard(xb, device="cuda")
    assert shard.on_gpu
    for k, fallback in ((2, False), (2100, True)):
        before = shard.cpu_searches
        D, I = shard.search(xq, k)
        D_ref, I_ref = brute_force(xq, xb, k)
        np.testing.assert_allclose(D, D_ref, atol=1e-5, rtol=0)
        assert (I[:, :10] == I_ref[:, :10]).all()
        assert (shard.cpu_searches > before) == fallback, k


@gpu
@needs_cuda
def test_gpus_asked_of_a_cuda_torch_are_not_refused():
    from cluster.runtime import cuda_problems, gpu_total_bytes

    assert cuda_problems(load_config(None, ["cluster.use_gpu=true", "cluster.gpus_per_actor=0.5"])) == []
    memory, source = gpu_total_bytes([], local=True)
    assert memory == min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


@gpu
@needs_cuda
def test_benchmark_processes_each_use_a_gpu_they_can_see(monkeypatch):
    for key in ("OMP_NUM_THREADS", "DS_ACCELERATOR"):  # set by the benchmark's import: restored after
        monkeypatch.setenv(key, os.environ.get(key, ""))
    from benchmarks.meta_train import plain_group, ray_train_counts
    from benchmarks.retrieval import shard_gpus

    count = torch.cuda.device_count()
    assert [plain_group(r, count, True) for r in range(count)] == [("nccl", r) for r in range(count)]
    # More ranks than GPUs: they share round-robin, on gloo (NCCL refuses two ranks on one GPU).
    assert [plain_group(r, count + 1, True) for r in range(count + 1)] == \
        [("gloo", r % count) for r in range(count + 1)]
    assert ray_train_counts([1, count + 1], "cuda") == [1]
    assert shard_gpus("cuda", 3) == pytest.approx(1 / 3) and shard_gpus("cpu", 3) == 0.0

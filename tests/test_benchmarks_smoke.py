"""The adaptation and meta-training benchmarks: their baseline computes what the trainer core
computes, and each script runs end to end on a few real sentences and prints its ratios.

These are not timing tests: the figures of a smoke run mean nothing, only that they are there.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MODELS, REPO, needs_data, needs_tiny_6l

from trainer.config import with_overrides


def _load_official():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import _official

    return _official


def _setup(tiny_bert_no_dropout, **train):
    from transformers import AutoTokenizer

    from trainer.config import Config
    from trainer.data.features import Featurizer
    from trainer.modules.model import build_model

    cfg = with_overrides(Config(), [("model.name_or_path", tiny_bert_no_dropout), ("model.num_frozen_layers", 1),
                                    ("model.dropout", 0.0), *((f"train.{key}", value) for key, value in train.items())])
    featurizer = Featurizer(AutoTokenizer.from_pretrained(tiny_bert_no_dropout), 64, 8)
    return cfg, featurizer, lambda: build_model(cfg, seed=7)


def test_official_adaptation_tags_like_the_sequential_path_and_restores(tiny_bert_no_dropout, toy_corpus):
    from trainer.training.adapt import adapt_many

    official_mod = _load_official()
    cfg, featurizer, make = _setup(tiny_bert_no_dropout)
    cfg = with_overrides(cfg, [("adapt.adapt_lr", 1e-2)])  # large enough that adaptation changes some predictions
    english, spanish = toy_corpus["en"], toy_corpus["es"][:8]
    supports = [[english[i], english[i + 9]] for i in range(len(spanish))]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    official = official_mod.OfficialLearner(model, featurizer, cfg)
    tags = official.adapt_and_predict(spanish, supports, cfg.adapt.adapt_lr, 1, cfg.adapt.lambda_max)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reference = make().eval()
    assert tags == adapt_many(reference, featurizer, spanish, supports, cfg, batched=False)
    unadapted = official.adapt_and_predict(spanish, supports, cfg.adapt.adapt_lr, 0)
    assert unadapted != tags, "adaptation had no effect, so the comparison above proves little"


def test_official_meta_gradient_equals_the_trainer_core(tiny_bert_no_dropout, toy_corpus):
    from trainer.data.features import group_windows
    from trainer.data.sampling import Task
    from trainer.training.reference import MetaLearner

    official_mod = _load_official()
    cfg, featurizer, make = _setup(tiny_bert_no_dropout, inner_lr=1e-3, schedule_inner_lr=False)
    source = group_windows(featurizer.encode(toy_corpus["en"][:12]))
    tasks = [Task((q + 1, q + 5), q) for q in range(3)]
    official = official_mod.OfficialLearner(make(), featurizer, cfg, seed=3)
    names, per_task, _ = official.meta_gradients(tasks, source)
    learner = MetaLearner(make(), featurizer, cfg, seed=3)
    learner.meta_gradient(tasks, source)
    by_name = dict(zip(learner.names, learner.params))
    assert len(per_task) == len(tasks) and sorted(names) == sorted(learner.names)
    for i, name in enumerate(names):
        summed = sum(g[i] for g in per_task)
        torch.testing.assert_close(summed, by_name[name].grad, rtol=1e-4, atol=1e-6)
    # The fixed 128 width is what the baseline pays for: its rows are wider than any window here.
    query, support = official.task_batches(tasks[0], source, 0)
    assert query["input_ids"].shape[1] == support["input_ids"].shape[1] == 128


def test_official_keeps_one_gradient_copy_per_task(tiny_bert_no_dropout, toy_corpus):
    from trainer.data.features import group_windows
    from trainer.data.sampling import Task

    official_mod = _load_official()
    cfg, featurizer, make = _setup(tiny_bert_no_dropout)
    source = group_windows(featurizer.encode(toy_corpus["en"][:12]))
    model = make()
    official = official_mod.OfficialLearner(model, featurizer, cfg)
    official.meta_step([Task((q + 1, q + 2), q) for q in range(4)], source)
    one_copy = official_mod.trainable_bytes(model)
    assert official.last_grad_copies == 5 and official.last_grad_bytes == 5 * one_copy


def _run(script: str, *args: str) -> list[tuple[str, float]]:
    env = dict(os.environ, METANER_DATA=str(MODELS.parent / "data"))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *args,
                           "--model", str(MODELS / "bert-tiny-6l")],
                          # A guard against a hang, not a speed check: the meta-training smoke run takes
                          # about 200 s on 2 idle cores and over 300 s beside other work.
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = [line.split() for line in done.stdout.splitlines() if line.startswith("ratio ")]
    assert ratios, done.stdout
    assert all(len(r) == 3 for r in ratios), ratios
    return [(name, float(value)) for _, name, value in ratios]


def test_worker_counts_compare_run_beside_run_not_best_against_best():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.meta_train import paired_ratio

    # Repeat 1 ran in a fast hour for both counts, repeat 3 in a slow one: best against best
    # (28/15 = 1.87) would pair runs of different hours; each repeat's own ratio does not.
    ratio, each = paired_ratio([28.0, 20.0, 16.0], [15.0, 13.0, 10.0])
    assert each == pytest.approx([28 / 15, 20 / 13, 1.6])
    assert ratio == pytest.approx(1.6)
    with pytest.raises(ValueError, match="paired runs"):
        paired_ratio([20.0, 21.0], [12.0])


@needs_data
@needs_tiny_6l
@pytest.mark.slow
def test_adaptation_benchmark_prints_positive_ratios():
    # The Ray pool is left out to stay fast (its start-up alone is ~25 s here); test_adapt_pool covers it.
    ratios = dict(_run("adaptation.py", "--limit", "4", "--no-mid", "--no-pool"))
    assert {"adaptation_batched_vs_official", "adaptation_sequential_vs_official",
            "adaptation_batched_vs_sequential"} <= set(ratios)
    assert all(v > 0 for v in ratios.values())


@needs_data
@needs_tiny_6l
@pytest.mark.slow
def test_meta_train_benchmark_prints_positive_ratios():
    # Two DeepSpeed workers under Ray Train too: the full run's path, which --quick leaves out; the
    # same workers as plain processes (--without-ray); and the replication setting (e5-small) where
    # its encoder is present.
    ratios = dict(_run("meta_train.py", "--limit", "40", "--workers", "2", "--steps", "1", "--repeats", "1",
                        "--ds-steps", "1", "--without-ray"))
    assert {"meta_train_engine_vs_official", "meta_train_engine_vs_sequential",
            "meta_grad_bytes_official_over_engine"} <= set(ratios)
    if (MODELS / "me5-small-ner").is_dir():
        assert {"meta_train_engine_vs_sequential_e5", "meta_train_ds2_vs_engine_e5",
                "meta_train_ds2_without_ray_vs_engine_e5"} <= set(ratios)
    else:
        assert {"meta_train_ds2_vs_engine", "meta_train_ds2_without_ray_vs_engine"} <= set(ratios)
    assert all(v > 0 for v in ratios.values())
    # 32 task copies plus `.grad` against one summed buffer: counted on the tensors each holds.
    assert ratios["meta_grad_bytes_official_over_engine"] == pytest.approx(33.0)


@pytest.mark.slow
def test_tag_benchmark_prints_the_actor_and_memory_ratios(trained_checkpoint):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tag.py"), "--quick", "--limit", "40",
                           "--checkpoint", str(trained_checkpoint / "best"), "--memory", "40", "80",
                           "--repeats", "1", "--student-steps", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = dict((name, float(value)) for _, name, value in
                  (line.split() for line in done.stdout.splitlines() if line.startswith("ratio ")))
    assert set(ratios) == {"tag_actors2_vs_1", "tag_soft_vs_hard", "distill_student_vs_finetune",
                           "tag_peak_rss_80_over_40", "tag_driver_peak_rss_80_over_40"}
    assert all(v > 0 for v in ratios.values())


@needs_data
@needs_tiny_6l
@pytest.mark.slow
@pytest.mark.skipif(not (MODELS / "me5-small-ner").is_dir(),
                    reason=f"benchmarks/depth.py times e5-small, absent from {MODELS / 'me5-small-ner'}")
def test_depth_benchmark_prints_the_engine_and_precision_ratios():
    ratios = dict(_run("depth.py", "--e5-frozen", "11", "--limit", "24", "--steps", "1", "--no-distributed",
                        "--precision-tasks", "1", "--precision-sentences", "1"))
    assert set(ratios) == {"meta_train_engine_vs_sequential_e5_f11", "meta_train_bf16_vs_fp32_e5_f11",
                           "adaptation_bf16_vs_fp32_e5_f11"}
    assert all(v > 0 for v in ratios.values())

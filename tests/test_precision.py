"""train.precision=bf16: autocast over fp32 weights, the frozen bottom kept in bf16, everywhere a
forward pass runs; fp32 unchanged."""
from __future__ import annotations

import pytest
import torch

from cluster.meta_train import deepspeed_config
from trainer.config import load_config
from trainer.data.features import Featurizer, group_windows, labels_for
from trainer.data.sampling import Task
from trainer.modules.bottom import BottomStore, FrozenBottom
from trainer.modules.model import NerModel, freeze
from trainer.training.engine import TaskEngine

TASKS = [Task([1, 2], 0), Task([3, 0], 4), Task([5, 6], 2), Task([7, 1], 3), Task([2, 4], 6)]
# Measured on the tiny model (bert-tiny-6l-like, 2 trainable layers, 5 tasks): 0.4-0.6 % relative
# error of the whole meta-gradient against fp32; bf16 keeps 8 bits of mantissa (0.4 % per rounding).
META_GRADIENT_RTOL = 0.03


def _engine(tiny_bert, tiny_tokenizer, toy_corpus, precision: str):
    cfg = load_config(None, ["train.mask_ratio=0.5", "train.lambda_max=2.0", "train.inner_lr=0.001",
                             "train.schedule_inner_lr=false", "train.pack_support=always",
                             f"train.precision={precision}"])
    labels = labels_for(cfg.train.loss_positions)
    model = NerModel.from_pretrained(tiny_bert, labels, dropout=0.0, seed=0).set_precision(precision)
    freeze(model, 1)
    featurizer = Featurizer(tiny_tokenizer, max_length=16, context=4, labels=labels)
    source = group_windows(featurizer.encode(toy_corpus["en"][:8]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    return TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names), source


def _meta_gradient(engine, source):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        grads, totals = engine.meta_gradient(TASKS, source, epoch=3, inner_lr=engine.cfg.train.inner_lr)
    return torch.cat([g.flatten() for g in grads]), totals


def test_bf16_meta_gradient_is_fp32_and_close_to_the_fp32_one(tiny_bert, tiny_tokenizer, toy_corpus):
    fp32, source = _engine(tiny_bert, tiny_tokenizer, toy_corpus, "fp32")
    bf16, _ = _engine(tiny_bert, tiny_tokenizer, toy_corpus, "bf16")
    expected, _ = _meta_gradient(fp32, source)
    got, totals = _meta_gradient(bf16, source)
    # The kept bottom is bf16 (half the bytes), the weights and the summed gradient fp32.
    assert all(s.dtype == torch.bfloat16 for s in bf16.bottom.states.values()) and len(bf16.bottom) > 0
    assert all(s.dtype == torch.float32 for s in fp32.bottom.states.values())
    assert bf16.bottom.nbytes() * 2 == fp32.bottom.nbytes()
    assert got.dtype == torch.float32 and all(p.dtype == torch.float32 for p in bf16.params)
    error = float((got - expected).norm() / expected.norm())
    print(f"bf16 meta-gradient relative error {error:.4f}")
    assert 0 < error < META_GRADIENT_RTOL, error
    assert totals["tasks"] == len(TASKS)


def test_logits_are_fp32_and_fp32_runs_no_autocast(tiny_bert, tiny_tokenizer):
    model = NerModel.from_pretrained(tiny_bert, dropout=0.0, seed=0).eval()
    batch = tiny_tokenizer(["Peter lives in Berlin ."], return_tensors="pt")
    fp32 = model(batch["input_ids"], batch["attention_mask"])
    model.set_precision("bf16")
    bf16 = model(batch["input_ids"], batch["attention_mask"])
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)
    assert model.compute_dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert NerModel.from_pretrained(tiny_bert).double().compute_dtype == torch.float64  # fp32: the weights' own
    with pytest.raises(ValueError, match="train.precision"):
        model.set_precision("fp16")


def test_bf16_states_are_stored_apart_from_fp32_ones(tiny_bert, tiny_tokenizer, tmp_path):
    model = NerModel.from_pretrained(tiny_bert, seed=0)
    freeze(model, 2)
    featurizer = Featurizer(tiny_tokenizer, 16, 4, model.labels)
    fp32 = BottomStore(tmp_path, model, featurizer).folder
    assert BottomStore(tmp_path, model.set_precision("bf16"), featurizer).folder != fp32


def test_deepspeed_config_follows_the_precision():
    fp32 = deepspeed_config(load_config(), 2)
    bf16 = deepspeed_config(load_config(None, ["train.precision=bf16"]), 2)
    assert not fp32["torch_autocast"]["enabled"] and bf16["torch_autocast"]["enabled"]
    # Autocast over fp32 weights, no gradient communicated in bf16, DeepSpeed's weight casts off.
    assert bf16["torch_autocast"]["lower_precision_safe_modules"] == []
    assert not bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]

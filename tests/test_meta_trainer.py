"""The meta-training loop in one process: it learns, resumes exactly, refuses a foreign
checkpoint, keeps its cadences, and imports nothing of the distributed stack."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.data.features import Featurizer
from trainer.modules.model import build_model
from trainer.training.meta_trainer import MetaTrainer

REPO = Path(__file__).resolve().parents[1]


def _cfg(model_path, *extra):
    return load_config(None, [f"model.name_or_path={model_path}", "model.dropout=0.0", "model.num_frozen_layers=1",
                              "model.max_length=32", "model.window_context=4", "train.meta_batch_size=6",
                              "train.num_meta_steps=8", "train.eval_every=4", "train.checkpoint_every=3",
                              "train.inner_lr=1e-3", "train.meta_lr=1e-3", "train.mask_ratio=0.3", *extra])


def _trainer(cfg, toy_corpus, tiny_tokenizer, log=None, seed=95):
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed)
    featurizer = Featurizer(tiny_tokenizer, cfg.model.max_length, cfg.model.window_context, model.labels)
    source = toy_corpus["en"][:30]
    support = np.array([[(i + 1) % 30, (i + 7) % 30] for i in range(30)])
    dev = toy_corpus["en"][40:44]
    return MetaTrainer(model, featurizer, cfg, source, support, seed=seed, dev=dev,
                       dev_support=[[source[0], source[1]]] * len(dev), metrics_logger=log)


class Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


class Stop(Exception):
    pass


def test_fit_runs_the_cadences_and_moves_the_weights(tiny_bert_no_dropout, tiny_tokenizer, toy_corpus):
    cfg = _cfg(tiny_bert_no_dropout)
    log = Recorder()
    trainer = _trainer(cfg, toy_corpus, tiny_tokenizer, log)
    before = {n: p.detach().clone() for n, p in zip(trainer.names, trainer.params)}
    checkpoints, best = [], []
    trainer.fit(on_best=lambda t: best.append(t.step), on_checkpoint=lambda t, m: checkpoints.append(t.step))
    assert [s for s, _ in log.rows] == list(range(1, 9))
    assert [s for s, m in log.rows if "dev_f1" in m] == [4, 8]
    assert checkpoints == [3, 6, 8] and best and best[0] == 4
    assert all(np.isfinite(m["meta_loss"]) and m["tasks_per_s"] > 0 for _, m in log.rows)
    # Where a step's time went; one process waits for no other rank.
    assert all(m["time_tasks_s"] > 0 and m["time_update_s"] > 0 and 0 <= m["time_wait_s"] < m["time_tasks_s"]
               for _, m in log.rows)
    assert any(not torch.equal(before[n], p) for n, p in zip(trainer.names, trainer.params))


def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_ends(tiny_bert_no_dropout, tiny_tokenizer,
                                                                           toy_corpus, tmp_path):
    cfg = _cfg(tiny_bert_no_dropout)
    whole = _trainer(cfg, toy_corpus, tiny_tokenizer)
    whole.fit()

    def stop_after_first(t, metrics):
        t.save(tmp_path / "last", t.featurizer.tokenizer)
        raise Stop

    first = _trainer(cfg, toy_corpus, tiny_tokenizer)
    with pytest.raises(Stop):
        first.fit(on_checkpoint=stop_after_first)
    torch.manual_seed(12345)  # a resumed process starts with another RNG state: the checkpoint restores it
    resumed = _trainer(cfg, toy_corpus, tiny_tokenizer)
    resumed.load(tmp_path / "last")
    assert resumed.step == 3 and resumed.best_f1 == first.best_f1
    resumed.fit()
    for n, a, b in zip(whole.names, whole.params, resumed.params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    assert resumed.best_f1 == whole.best_f1 and resumed.best_step == whole.best_step


@pytest.mark.parametrize("change,key", [(["train.meta_lr=2e-3"], "train.meta_lr"),
                                        (["train.loss_positions=all"], "train.loss_positions")])
def test_resume_refuses_a_checkpoint_of_other_settings_or_seed(tiny_bert_no_dropout, tiny_tokenizer, toy_corpus,
                                                                tmp_path, change, key):
    cfg = _cfg(tiny_bert_no_dropout)
    trainer = _trainer(cfg, toy_corpus, tiny_tokenizer)
    trainer.train_step()
    trainer.save(tmp_path / "c", tiny_tokenizer)
    other = _trainer(_cfg(tiny_bert_no_dropout, *change), toy_corpus, tiny_tokenizer)
    with pytest.raises(ValueError, match=key):
        other.load(tmp_path / "c")
    with pytest.raises(ValueError, match="seed 95"):
        _trainer(cfg, toy_corpus, tiny_tokenizer, seed=96).load(tmp_path / "c")
    # Where and how often it saves or logs are not what it computes.
    same = _trainer(_cfg(tiny_bert_no_dropout, "train.checkpoint_every=5", "train.log_every=2",
                         "cluster.num_workers=0", "tag.shard_size=10", "mlflow.experiment=other"),
                    toy_corpus, tiny_tokenizer)
    same.load(tmp_path / "c")
    assert same.step == 1
    if key == "train.meta_lr":
        forced = _trainer(_cfg(tiny_bert_no_dropout, *change), toy_corpus, tiny_tokenizer)
        forced.load(tmp_path / "c", force=True)
        assert forced.step == 1


def test_a_single_process_run_imports_no_distributed_stack(tiny_bert_no_dropout):
    code = f"""
import sys
import numpy as np
from trainer.config import load_config
from trainer.data.features import Featurizer
from trainer.training.meta_trainer import MetaTrainer
from trainer.modules.model import build_model, load_tokenizer
from jobs.synthetic import make_sentences
cfg = load_config(None, ["model.name_or_path={tiny_bert_no_dropout}", "model.num_frozen_layers=1",
                         "train.meta_batch_size=4", "train.num_meta_steps=2", "train.eval_every=2"])
model = build_model(cfg, seed=1)
featurizer = Featurizer(load_tokenizer(cfg.model.name_or_path), 32, 4, model.labels)
source = make_sentences("en", 12, seed=1)
trainer = MetaTrainer(model, featurizer, cfg, source, np.array([[(i + 1) % 12, (i + 2) % 12] for i in range(12)]),
                      seed=1, dev=source[:2], dev_support=[source[2:4]] * 2)
trainer.fit()
print(trainer.step, ",".join(n for n in ("ray", "deepspeed", "mlflow") if n in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2"], out.stdout

"""The Ray adapter pool: same predictions as a sequential loop, survives a killed actor, resumes."""
import os
import signal
import threading
import time

import pytest

from cluster.adapt_pool import AdapterPool, UnitStore, adapt_targets, collect, inputs_key, make_units
from trainer.config import load_config


@pytest.fixture(scope="module")
def checkpoint(tiny_bert_no_dropout, tmp_path_factory):
    from transformers import AutoTokenizer

    from trainer.modules.model import build_model
    from trainer.training.checkpoint import save_checkpoint

    cfg = _cfg(tiny_bert_no_dropout)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, build_model(cfg, seed=3), tokenizer=AutoTokenizer.from_pretrained(tiny_bert_no_dropout),
                    config=cfg)
    return str(folder)


def _cfg(model, **extra):
    base = [f"model.name_or_path={model}", "model.dropout=0.0", "model.num_frozen_layers=1", "model.max_length=32", "model.window_context=4",
            "adapt.batch_size=4", "adapt.adapt_lr=1e-3", "cluster.num_adapter_actors=2", "cluster.cpus_per_actor=0.5",
            "cluster.adapt_unit_size=6"]
    return load_config(overrides=base + [f"{k}={v}" for k, v in extra.items()])


def _targets(toy_corpus):
    targets = {lang: toy_corpus[lang][:15] for lang in ("es", "nl", "de", "fr", "zh")}
    en = toy_corpus["en"]
    supports = {lang: [[en[(i * 3) % len(en)], en[(i * 3 + 1) % len(en)]] for i in range(len(s))]
                for lang, s in targets.items()}
    return targets, supports


def test_units_interleave_languages_and_cover_each_sentence_once(toy_corpus):
    targets, supports = _targets(toy_corpus)
    units = make_units(targets, supports, 6)
    assert [u.lang for u in units[:5]] == ["es", "nl", "de", "fr", "zh"]
    for lang, sentences in targets.items():
        covered = sorted(i for u in units if u.lang == lang for i in u.indices)
        assert covered == list(range(len(sentences)))


def test_inputs_key_tells_unspaced_sentences_apart(toy_corpus, tmp_path):
    from dataclasses import replace

    targets, supports = _targets(toy_corpus)
    cfg = load_config()
    spaced = make_units({"zh": targets["zh"]}, {"zh": supports["zh"]}, 6)
    unspaced = make_units({"zh": [replace(s, unspaced=True) for s in targets["zh"]]}, {"zh": supports["zh"]}, 6)
    assert inputs_key(str(tmp_path), cfg, spaced) != inputs_key(str(tmp_path), cfg, unspaced)


def test_collect_refuses_lost_or_duplicated_sentences(toy_corpus, tmp_path):
    targets, supports = _targets(toy_corpus)
    units = make_units({"es": targets["es"]}, {"es": supports["es"]}, 6)
    store = UnitStore(tmp_path)
    for u in units[:-1]:
        store.save(u.id, {i: ["O"] * len(targets["es"][i].words) for i in u.indices})
    with pytest.raises((RuntimeError, FileNotFoundError)):
        collect(units, store, {"es": len(targets["es"])})


@pytest.mark.slow
def test_pool_equals_sequential_and_survives_a_killed_actor(ray_local, checkpoint, tiny_bert_no_dropout,
                                                            toy_corpus, tmp_path):
    from trainer.training.adapt import Adapter, AdaptItem

    cfg = _cfg(tiny_bert_no_dropout)
    targets, supports = _targets(toy_corpus)
    sequential = {}
    adapter = Adapter(checkpoint, cfg=cfg)
    for lang, sentences in targets.items():
        tags = adapter.run([AdaptItem(i, s, tuple(supports[lang][i])) for i, s in enumerate(sentences)])
        sequential[lang] = [tags[i] for i in range(len(sentences))]

    pool = AdapterPool(checkpoint, cfg)
    units = make_units(targets, supports, cfg.cluster.adapt_unit_size)
    store = UnitStore(tmp_path / "work" / inputs_key(checkpoint, cfg, units))
    victim = pool.pids()[0]
    killed = []

    def kill_after_first_unit():
        deadline = time.time() + 120
        while time.time() < deadline and not store.done():
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    watcher = threading.Thread(target=kill_after_first_unit, daemon=True)
    watcher.start()
    try:
        result = adapt_targets(checkpoint, cfg, targets, supports, tmp_path / "work", progress=False, pool=pool)
        watcher.join(timeout=5)
        assert killed and victim not in pool.pids(), "the actor was not killed and replaced"
    finally:
        pool.shutdown()
    assert result == sequential

    # Started again with the same inputs, the evaluation finds every unit done and runs none.
    before = {p.name: p.stat().st_mtime_ns for p in store.folder.glob("*.json")}
    again = adapt_targets(checkpoint, cfg, targets, supports, tmp_path / "work", progress=False)
    assert again == sequential
    assert {p.name: p.stat().st_mtime_ns for p in store.folder.glob("*.json")} == before


@pytest.mark.slow
def test_a_reused_pool_moves_its_actors_to_the_next_checkpoint_and_settings(ray_local, checkpoint,
                                                                             tiny_bert_no_dropout, toy_corpus,
                                                                             tmp_path):
    import ray
    from transformers import AutoTokenizer

    from cluster.adapt_pool import ReusedPool
    from trainer.modules.model import build_model
    from trainer.training.adapt import Adapter, AdaptItem
    from trainer.training.checkpoint import save_checkpoint

    cfg = _cfg(tiny_bert_no_dropout)
    other = tmp_path / "other"  # other weights, and labelled without adaptation
    save_checkpoint(other, build_model(cfg, seed=4), tokenizer=AutoTokenizer.from_pretrained(tiny_bert_no_dropout),
                    config=cfg)
    other_cfg = _cfg(tiny_bert_no_dropout, **{"adapt.enabled": False})
    targets, supports = _targets(toy_corpus)
    targets, supports = {"es": targets["es"]}, {"es": supports["es"]}

    def sequential(folder, settings):
        tags = Adapter(folder, cfg=settings).run([AdaptItem(i, s, tuple(supports["es"][i]))
                                                  for i, s in enumerate(targets["es"])])
        return {"es": [tags[i] for i in range(len(targets["es"]))]}

    with ReusedPool() as pool:
        first = adapt_targets(checkpoint, cfg, targets, supports, tmp_path / "a", progress=False, pool=pool)
        pids = pool.pool.pids()
        second = adapt_targets(str(other), other_cfg, targets, supports, tmp_path / "b", progress=False, pool=pool)
        assert pool.pool.pids() == pids, "the pool started new actors instead of moving its own"
        held = pool.pool
    assert pool.pool is None  # closed, its actors killed
    assert first == sequential(checkpoint, cfg) and second == sequential(str(other), other_cfg)
    assert first != second, "the two checkpoints label alike, so the comparison above proves little"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(held.actors[0].__ray_ready__.remote(), timeout=30)

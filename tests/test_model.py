"""The NER model, layer freezing for BERT and XLM-R encoders, and checkpoints."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from trainer.config import Config
from trainer.data.corpus import LABELS
from trainer.data.features import Featurizer
from trainer.modules.model import NerModel, freeze, trainable_parameters
from trainer.training.checkpoint import load_model, load_trainer_state, read_info, rng_state, save_checkpoint
from trainer.training.optim import BertAdam


@pytest.fixture()
def model(tiny_bert):
    return NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=3)


def test_forward_gives_logits_per_token_and_label(model, tiny_tokenizer, toy_corpus):
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    batch = featurizer.collate(featurizer.encode(toy_corpus["en"][:3]))
    logits = model(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (*batch["input_ids"].shape, len(LABELS))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("start", [0, 1])
def test_the_last_layer_at_kept_positions_equals_the_whole_forward_there(model, tiny_tokenizer, toy_corpus, start):
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    batch = featurizer.collate(featurizer.encode(toy_corpus["en"][:4]))
    model = model.double().eval()
    assert model.can_keep()
    mask4d = model.attention_mask_4d(batch["attention_mask"])
    full = model(batch["input_ids"], mask4d)
    keep = torch.stack([torch.randperm(int(n))[:3] for n in batch["attention_mask"].sum(1)])
    hidden = None if start == 0 else model.prefix(batch["input_ids"], mask4d, start)
    kept = model(batch["input_ids"], mask4d, hidden, start_layer=start, keep=keep)
    assert kept.shape == (len(keep), 3, len(LABELS))
    torch.testing.assert_close(kept, full.gather(1, keep[..., None].expand(-1, -1, len(LABELS))), rtol=1e-10, atol=1e-12)
    # an encoder whose positions enter every layer is not pruned
    model.encoder.config.position_embedding_type = "relative_key"
    assert not model.can_keep()


def test_from_pretrained_loads_the_real_encoder_weights(model, tiny_bert):
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(tiny_bert)
    for (name, a), (_, b) in zip(model.encoder.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.encoder.pooler is not None
    other = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=3)
    assert torch.equal(model.classifier.weight, other.classifier.weight)


def test_a_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model.name_or_path"):
        NerModel.from_pretrained(str(tmp_path / "nothing-here"))


def _frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_embeddings_pooler_and_bottom_layers(model):
    freeze(model, 1)
    frozen = _frozen_names(model)
    assert all(n.startswith(("encoder.embeddings.", "encoder.pooler.", "encoder.encoder.layer.0.")) for n in frozen)
    assert any(n.startswith("encoder.encoder.layer.0.") for n in frozen)
    assert any(n.startswith("encoder.pooler.") for n in frozen)
    trainable = {n for n, _ in trainable_parameters(model)}
    assert "classifier.weight" in trainable
    assert any(n.startswith("encoder.encoder.layer.1.") for n in trainable)
    # freezing again with other settings starts from a fully trainable model
    freeze(model, 0, freeze_embeddings=True, freeze_pooler=False)
    assert all(n.startswith("encoder.embeddings.") for n in _frozen_names(model))
    freeze(model, 2)
    assert not any(n.startswith("encoder.encoder.layer.") for n, _ in trainable_parameters(model))
    with pytest.raises(ValueError, match="num_frozen_layers"):
        freeze(model, 3)


def test_freeze_works_for_an_xlm_r_encoder():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64)
    model = NerModel(XLMRobertaModel(config), LABELS, dropout=0.0)
    freeze(model, 2)
    trainable = {n for n, _ in trainable_parameters(model)}
    assert any(n.startswith("encoder.encoder.layer.2.") for n in trainable)
    assert not any(n.startswith(("encoder.encoder.layer.0.", "encoder.encoder.layer.1.", "encoder.embeddings."))
                   for n in trainable)
    ids = torch.randint(5, 100, (2, 6))
    assert model(ids, torch.ones_like(ids)).shape == (2, 6, len(LABELS))


def test_checkpoint_round_trip_is_exact(model, tiny_tokenizer, tmp_path):
    cfg = Config()
    freeze(model, 1)
    folder = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tiny_tokenizer, config=cfg, meta={"step": 7})
    for name in ("model.safetensors", "config.json", "labels.json", "metaner.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    info = read_info(folder)
    assert info["meta"] == {"step": 7} and info["config"]["train"]["inner_lr"] == cfg.train.inner_lr
    loaded, tokenizer, _ = load_model(folder, labels=LABELS)
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    assert tokenizer is not None and tokenizer.mask_token_id == tiny_tokenizer.mask_token_id
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(5, 100, (2, 9))
    model.eval(), loaded.eval()
    assert torch.equal(model(ids, torch.ones_like(ids)), loaded(ids, torch.ones_like(ids)))


def test_training_can_start_from_a_trained_checkpoint(model, tiny_bert, tmp_path):
    """model.init_checkpoint: every weight is the checkpoint's, the frozen layers follow the config,
    and a checkpoint of another label set or encoder is refused, naming the key."""
    from trainer.modules import model as pretrained
    from trainer.config import load_config
    from trainer.training.checkpoint import build_model

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    folder = save_checkpoint(tmp_path / "trained", model)
    cfg = load_config(None, [f"model.name_or_path={tiny_bert}", "model.num_frozen_layers=1",
                             f"model.init_checkpoint={folder}"])
    started = build_model(cfg, seed=9)
    for (name, a), (_, b) in zip(model.state_dict().items(), started.state_dict().items()):
        assert torch.equal(a, b), name
    assert not started.encoder.encoder.layer[0].attention.self.query.weight.requires_grad
    assert started.encoder.encoder.layer[1].attention.self.query.weight.requires_grad
    other = save_checkpoint(tmp_path / "other", NerModel.from_pretrained(tiny_bert, ["O", "B-PER", "I-PER"], seed=3))
    with pytest.raises(ValueError, match=r"model.init_checkpoint=.*other: its labels"):
        build_model(load_config(None, [f"model.name_or_path={tiny_bert}", "model.num_frozen_layers=1",
                                        f"model.init_checkpoint={other}"]))
    with pytest.raises(ValueError, match=r"model.init_checkpoint=.*none: no such checkpoint folder"):
        build_model(load_config(None, [f"model.name_or_path={tiny_bert}", "model.num_frozen_layers=1",
                                        f"model.init_checkpoint={tmp_path / 'none'}"]))
    with pytest.raises(ValueError, match="trainer.training.checkpoint.build_model"):  # the pretrained builder reads none
        pretrained.build_model(cfg)


def test_a_different_label_set_is_refused_naming_both(model, tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", model)
    other = ["O", "B-PER", "I-PER"]
    with pytest.raises(ValueError) as err:
        load_model(folder, labels=other)
    assert str(other) in str(err.value) and str(list(LABELS)) in str(err.value)


def test_trainer_state_round_trips_and_pickled_objects_are_refused(model, tmp_path):
    params = [p for _, p in trainable_parameters(model)]
    opt = BertAdam(params, lr=1e-3, warmup=0.1, t_total=10)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 1, "rng": rng_state()}
    folder = save_checkpoint(tmp_path / "ckpt", model, trainer_state=state)
    loaded = load_trainer_state(folder)
    fresh = BertAdam(params, lr=1e-3, warmup=0.1, t_total=10)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state[params[0]]["step"] == 1
    assert torch.equal(fresh.state[params[0]]["next_m"], opt.state[params[0]]["next_m"])
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])

    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(str(marker))}, folder / "trainer_state.pt")
    with pytest.raises(ValueError, match="refusing"):
        load_trainer_state(folder)
    assert not marker.exists()
    assert json.loads((folder / "labels.json").read_text()) == list(LABELS)


def test_dev_scores_are_python_floats_and_a_state_with_numpy_scalars_still_resumes(model, tmp_path):
    """seqeval scores nonzero F1 as numpy.float64; a trainer state holding one was refused by
    torch.load(weights_only=True), so a run saved with a dev score above 0 could not resume."""
    import numpy as np

    from trainer.data.scoring import score

    result = score([["B-PER", "O"], ["B-LOC"]], [["B-PER", "O"], ["O"]])
    assert result["f1"] > 0 and type(result["f1"]) is float and type(result["per_type"]["PER"]["f1"]) is float
    state = {"step": 350, "best_f1": np.float64(88.7), "curve": [[50, np.float64(66.7)], [100, np.int64(1)]]}
    folder = save_checkpoint(tmp_path / "ckpt", model, trainer_state=state)
    loaded = load_trainer_state(folder)
    assert loaded["best_f1"] == 88.7 and loaded["curve"][0][1] == 66.7


class _Payload:
    """An object whose unpickling would run code (it creates a file)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_really_runs_code_when_unpickled(tmp_path):
    # Guards the test above: the payload is dangerous for a plain unpickler.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()

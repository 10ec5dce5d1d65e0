"""Checkpoints as plain folders: safetensors weights, the encoder's config, tokenizer, labels, job config.

Weights are read with safetensors only and trainer state with `torch.load(weights_only=True)`, so a
checkpoint can never run code when loaded. The encoder is rebuilt from its saved config, with no
hub access.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .model import NerModel

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
LABELS_FILE = "labels.json"
META_FILE = "metaner.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT = 1


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(path: str | os.PathLike, model: NerModel, *, tokenizer=None, config=None,
                    meta: Optional[dict] = None, trainer_state: Optional[dict] = None) -> Path:
    """Write the folder `path`; `config` is a Config or its dict, `trainer_state` plain tensors/dicts."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # Clones: safetensors refuses tensors that share storage.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / (WEIGHTS + ".tmp")), metadata={"format": "pt"})
    os.replace(folder / (WEIGHTS + ".tmp"), folder / WEIGHTS)
    model.encoder.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _write_json(folder / LABELS_FILE, list(model.labels))
    config_dict = config.to_dict() if hasattr(config, "to_dict") else (config or {})
    # Which parameters were trained decides what adaptation steps; it is restored on load.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    _write_json(folder / META_FILE, {"format": FORMAT, "config": config_dict, "dropout": model.dropout.p,
                                     "frozen": frozen, "meta": meta or {}})
    if trainer_state is not None:
        tmp = folder / (TRAINER_STATE + ".tmp")
        torch.save(trainer_state, tmp)
        os.replace(tmp, folder / TRAINER_STATE)
    logger.info("checkpoint written to %s", folder)
    return folder


def read_info(path: str | os.PathLike) -> dict:
    """labels, config dict and meta info of a checkpoint."""
    folder = Path(path)
    for name in (WEIGHTS, LABELS_FILE, META_FILE, "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a metaner checkpoint: {name} is missing")
    info = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    info["labels"] = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    return info


def load_model(path: str | os.PathLike, labels: Optional[Sequence[str]] = None,
               load_tokenizer: bool = True):
    """(model, tokenizer or None, info) from a checkpoint folder, frozen as it was saved.

    If `labels` is given it must equal the checkpoint's label set, in order.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(path)
    info = read_info(folder)
    if labels is not None and list(labels) != list(info["labels"]):
        raise ValueError(f"label set {list(labels)} differs from the checkpoint's {info['labels']} in {folder}; "
                         "load with the checkpoint's labels or train a new model")
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    model = NerModel(encoder, info["labels"], info.get("dropout", 0.1))
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    frozen = set(info.get("frozen", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    tokenizer = None
    if load_tokenizer and (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, info


def load_trainer_state(path: str | os.PathLike) -> Optional[dict]:
    """Optimizer/scheduler/step/RNG state, or None if the checkpoint has none. Only tensors and
    plain containers load; anything else is refused by torch.load(weights_only=True)."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for forbidden payloads
        raise ValueError(f"{file} holds something other than tensors and plain values; refusing to load it "
                         f"({type(err).__name__})") from None


def rng_state() -> dict:
    """Torch's CPU RNG state (and CUDA's where present), as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

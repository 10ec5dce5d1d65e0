"""Checkpoints as plain folders: safetensors weights, the encoder's config, tokenizer, labels, job config.

Weights are read with safetensors only and trainer state with `torch.load(weights_only=True)`, so a
checkpoint can never run code when loaded. The encoder is rebuilt from its saved config, with no
hub access.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import NerModel
from .paths import make_output_dir

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
LABELS_FILE = "labels.json"
META_FILE = "metaner.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT = 1


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str), encoding="utf-8")


def save_checkpoint(path: str | os.PathLike, model: NerModel, *, tokenizer=None, config=None,
                    meta: Optional[dict] = None, trainer_state: Optional[dict] = None) -> Path:
    """Write the folder `path` (replacing one there); `config` is a Config or its dict,
    `trainer_state` plain tensors/dicts.

    Every file is written into a staging folder beside `path` that is then renamed into place, so
    a process killed at any moment leaves at `path` the previous checkpoint or the new one, never
    a mix or a cut-short weights file.
    """
    folder = Path(path)
    make_output_dir(folder.parent, f"checkpoint folder {folder}")
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_files(staging, model, tokenizer, config, meta, trainer_state)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("checkpoint written to %s", folder)
    return folder


def _write_files(folder: Path, model: NerModel, tokenizer, config, meta, trainer_state) -> None:
    # Clones: safetensors refuses tensors that share storage.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
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
        torch.save(trainer_state, folder / TRAINER_STATE)


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename `staging` to `folder`; a folder already there is moved aside first and then removed
    (a kill between the two renames leaves the previous checkpoint under `.<name>.old-<pid>`)."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_info(path: str | os.PathLike) -> dict:
    """labels, config dict and meta info of a checkpoint."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint {folder}: no such folder; give the folder a training job wrote "
                         "(e.g. <out>/seed95/best)")
    for name in (WEIGHTS, LABELS_FILE, META_FILE, "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a metaner checkpoint: {name} is missing")
    try:
        info = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        info["labels"] = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {folder}: {META_FILE} or {LABELS_FILE} is not valid JSON ({err}); "
                         "the checkpoint is damaged, save it again") from None
    return info


def load_model(path: str | os.PathLike, labels: Optional[Sequence[str]] = None,
               load_tokenizer: bool = True):
    """(model, tokenizer or None, info) from a checkpoint folder, frozen as it was saved.

    If `labels` is given it must equal the checkpoint's label set, in order.
    """
    from transformers import AutoConfig, AutoModel

    from .model import TOKENIZER_FILES, load_tokenizer as tokenizer_of

    folder = Path(path)
    info = read_info(folder)
    if labels is not None and list(labels) != list(info["labels"]):
        raise ValueError(f"label set {list(labels)} differs from the checkpoint's {info['labels']} in {folder}; "
                         "load with the checkpoint's labels or train a new model")
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    model = NerModel(encoder, info["labels"], info.get("dropout", 0.1))
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {folder}: {WEIGHTS} cannot be read ({err}); it is damaged or cut short, "
                         "save the checkpoint again") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. labels.json edited to another label count
        raise ValueError(f"checkpoint {folder}: the weights do not fit {LABELS_FILE} ({len(info['labels'])} labels) "
                         f"or config.json: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    frozen = set(info.get("frozen", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    tokenizer = None
    if load_tokenizer and any((folder / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = tokenizer_of(folder)
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

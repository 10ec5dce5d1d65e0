"""Checkpoints as plain folders: safetensors weights, the encoder's config, tokenizer, labels, job config.

Everything read from a checkpoint loads here: its model, its encoder where one is named as an
encoder, and the weights training starts from (model.init_checkpoint). trainer.modules.model builds models
from pretrained encoders only.

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

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import Config, affects, config_from_dict, default, with_overrides
from trainer.modules.model import (
    TOKENIZER_FILES,
    NerModel,
    build_model as pretrained_model,
    load_encoder as pretrained_encoder,
    load_tokenizer as tokenizer_of,
)
from trainer.utils.digest import file_sha256, files_sha256
from trainer.utils.errors import CheckpointError, ConfigError
from trainer.utils.paths import make_output_dir, split_selector

logger = logging.getLogger(__name__)

# The files of a checkpoint folder, named here only.
WEIGHTS = "model.safetensors"
LABELS_FILE = "labels.json"
META_FILE = "metaner.json"
ENCODER_CONFIG = "config.json"  # the encoder's transformers config
TRAINER_STATE = "trainer_state.pt"
FORMAT = 1
# Key of metaner.json naming what adapting with the checkpoint needs besides its own files.
PROVENANCE = "provenance"


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
                                     "frozen": frozen, "meta": meta or {}, PROVENANCE: provenance(config)})
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
        raise CheckpointError(f"checkpoint {folder}: no such folder; give the folder a training job wrote "
                              "(e.g. <out>/seed95/best)")
    for name in (WEIGHTS, LABELS_FILE, META_FILE, ENCODER_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a metaner checkpoint: {name} is missing")
    try:
        info = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        info["labels"] = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} or {LABELS_FILE} is not valid JSON ({err}); "
                              "the checkpoint is damaged, save it again") from None
    return info


def dev_curve(path: str | os.PathLike) -> list[list[float]]:
    """[[step, English-dev F1], ...] of the training that wrote a checkpoint: from its `final`
    sibling when there is one (a `best` checkpoint knows only the curve up to itself)."""
    folder = Path(path)
    final = folder.with_name("final")
    info = read_info(final if final.is_dir() else folder)
    return [list(point) for point in info.get("meta", {}).get("dev_curve", [])]


def weights_file(path: str | os.PathLike) -> dict:
    """The tensors of a checkpoint's weights file, or a clear error when it cannot be read."""
    folder = Path(path)
    try:
        return load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder}: {WEIGHTS} cannot be read ({err}); it is damaged or cut short, "
                              "save the checkpoint again") from None


def load_model(path: str | os.PathLike, labels: Optional[Sequence[str]] = None,
               load_tokenizer: bool = True):
    """(model, tokenizer or None, info) from a checkpoint folder, frozen as it was saved.

    If `labels` is given it must equal the checkpoint's label set, in order.
    """
    # transformers deferred: see trainer.modules.model.load_encoder.
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    info = read_info(folder)
    if labels is not None and list(labels) != list(info["labels"]):
        raise CheckpointError(f"label set {list(labels)} differs from the checkpoint's {info['labels']} in {folder}; "
                              "load with the checkpoint's labels or train a new model")
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    model = NerModel(encoder, info["labels"], info.get("dropout", default("model.dropout")))
    state = weights_file(folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. labels.json edited to another label count
        raise CheckpointError(f"checkpoint {folder}: the weights do not fit {LABELS_FILE} "
                              f"({len(info['labels'])} labels) or {ENCODER_CONFIG}: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    frozen = set(info.get("frozen", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    tokenizer = None
    if load_tokenizer and any((folder / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = tokenizer_of(folder)
    return model, tokenizer, info


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """A metaner checkpoint folder, not a plain pretrained model's."""
    return all(os.path.isfile(os.path.join(folder, f)) for f in (META_FILE, LABELS_FILE, WEIGHTS))


def load_encoder(name_or_path: str | os.PathLike):
    """The encoder of a checkpoint folder, else trainer.modules.model.load_encoder's (a hub id or a
    pretrained model's folder)."""
    if os.path.isdir(name_or_path) and is_checkpoint(name_or_path):
        # A checkpoint's weights are the NerModel's (encoder.*, classifier.*): AutoModel would find
        # none of its keys and start from random weights.
        return load_model(name_or_path, load_tokenizer=False)[0].encoder
    return pretrained_encoder(name_or_path)


def build_model(cfg, labels: Optional[Sequence[str]] = None, seed: Optional[int] = None) -> NerModel:
    """The model as `cfg.model` describes it (trainer.modules.model.build_model), its encoder a
    checkpoint's where model.name_or_path names one, and every weight model.init_checkpoint's
    where that is set."""
    model = pretrained_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_checkpoint": None})}),
                             labels, seed, encoder=load_encoder(cfg.model.name_or_path))
    if cfg.model.init_checkpoint:
        start_from(model, cfg.model.init_checkpoint)
    return model


def start_from(model: NerModel, folder: str | os.PathLike) -> None:
    """Replace every weight of `model` by a trained checkpoint's (model.init_checkpoint).

    The model is built from the pretrained encoder first, so that its architecture, dropout and
    frozen layers follow the config; the checkpoint must hold the same encoder and label set.
    """
    where = f"model.init_checkpoint={folder}"
    if not os.path.isdir(folder):
        raise CheckpointError(f"{where}: no such checkpoint folder; train it first or give another folder")
    info = read_info(folder)
    if list(info["labels"]) != list(model.labels):
        raise CheckpointError(f"{where}: its labels {info['labels']} differ from the ones training uses "
                              f"{list(model.labels)} (train.loss_positions); start from a checkpoint trained alike")
    state = weights_file(folder)
    mine = model.state_dict()
    wrong = sorted(set(mine) ^ set(state)) or sorted(k for k in mine if mine[k].shape != state[k].shape)
    if wrong:
        raise CheckpointError(f"{where}: its weights do not fit model.name_or_path's encoder ({wrong[:3]} differ); "
                              "start from a checkpoint of the same encoder")
    model.load_state_dict(state)
    logger.info("weights from %s", folder)


NUMPY_SCALARS = [np.float64(0).__reduce__()[0], np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64))]


def load_trainer_state(path: str | os.PathLike) -> Optional[dict]:
    """Optimizer/scheduler/step/RNG state, or None if the checkpoint has none. Only tensors and
    plain containers load; anything else is refused by torch.load(weights_only=True)."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        return None
    try:
        # numpy scalars are plain values too: states written before dev scores were made Python
        # floats hold numpy.float64, and must still resume.
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError) for forbidden payloads
        raise CheckpointError(f"{file} holds something other than tensors and plain values; refusing to load it "
                              f"({type(err).__name__})") from None


def rng_state() -> dict:
    """Torch's CPU RNG state, and the current CUDA device's where there is one, as tensors.

    Only the current device's: a process drives one GPU, and a state of every visible GPU could
    not be restored where fewer are visible (a re-placed worker, a smaller node)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # written by earlier versions: one state per visible GPU
        if not cuda:
            return
        cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
    torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------------------ provenance
#
# Test-time adaptation needs more than the weights: each sentence's support set is retrieved from
# the English source with the retrieval encoder. A checkpoint records both, by location and by
# content, so that `--checkpoint` alone is enough to tag, and a changed or missing piece is named
# before any work instead of silently giving other neighbours.

def weights_sha256(folder: str | os.PathLike) -> Optional[str]:
    """Hash of a model folder's weights as transformers loads them: its .safetensors files, else its
    .bin files (names and content); None when it holds neither."""
    names = sorted(os.listdir(folder))
    files = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
    return files_sha256([os.path.join(folder, n) for n in files]) if files else None


def hub_snapshot(name: str) -> Optional[str]:
    """The local folder of a hub id in this machine's Hugging Face cache, without asking the hub."""
    try:
        # Inside the try: a missing huggingface_hub means nothing local to name.
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name, local_files_only=True)
    except Exception:  # not cached, not a valid id, or no huggingface_hub: nothing local to name
        return None


def provenance(config) -> dict:
    """{"retrieval_encoder": {...}, "source": {...}} for a Config (or its dict): the encoder that
    retrieves support sets (a folder or hub id, and its weights' hash) and the English source file
    (absolute path and sha256). Anything that cannot be read is recorded as None: saving a
    checkpoint never fails for it."""
    try:
        cfg = config if isinstance(config, Config) else config_from_dict(config) if config else None
    except ValueError:
        cfg = None
    if cfg is None:
        return {}
    if cfg.retrieval.encoder == "finetuned":
        encoder = {"kind": "checkpoint"}  # the checkpoint's own encoder retrieves
    else:
        name = cfg.model.name_or_path
        local = os.path.isdir(name)
        folder = name if local else hub_snapshot(name)
        try:
            digest = weights_sha256(folder) if folder else None
        except OSError:
            digest = None
        encoder = {"kind": "folder" if local else "hub", "name_or_path": os.path.abspath(name) if local else name,
                   "weights_sha256": digest}
    path, split = split_selector(cfg.data.resolve(cfg.data.source_train))
    try:
        digest = file_sha256(path)
    except OSError:
        digest = None
    return {"retrieval_encoder": encoder,
            "source": {"path": os.path.abspath(path), "split": split, "sha256": digest}}


# ------------------------------------------------------------------------ settings at use time
#
# A checkpoint is used (evaluated, tagged with, adapted) with the settings it was trained with,
# except those that say how it is used: where and how the work runs, which data it labels, how
# support sentences are searched for, how each sentence is adapted, the arithmetic. Any other key
# (the encoder, how it reads text into windows, its frozen layers, the label set, how sentences
# are embedded for retrieval, training's own settings) is part of what the checkpoint means.

def recorded_config(folder: Path, info: dict):
    try:
        return config_from_dict(info.get("config") or {})
    except ValueError as err:
        raise CheckpointError(f"checkpoint {folder}: the settings in {META_FILE} do not load with this version "
                              f"({err}); train it again with this version") from None


def use_config(path: str | os.PathLike, overrides: Sequence = ()):
    """The settings to use the checkpoint at `path` with: the config it recorded (metaner.json),
    `overrides` applied on top (`a.b=value` texts or (dotted key, value) pairs, in order, as
    trainer.config.with_overrides takes them). An override may change only settings a checkpoint may be used under (trainer.config: use=True); one that
    would change any other key is refused, a ConfigError naming each such key."""
    folder = Path(path)
    recorded = recorded_config(folder, read_info(folder))
    cfg = with_overrides(recorded, overrides)
    before, after = recorded.flat(), cfg.flat()
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k) and not affects(k, "use")]
    if changed:
        raise ConfigError([f"{key}={after.get(key)!r}: checkpoint {folder} was trained with {before.get(key)!r}, and "
                           f"{key} is part of what a checkpoint means: leave it out, or train a checkpoint with it"
                           for key in changed])
    return cfg

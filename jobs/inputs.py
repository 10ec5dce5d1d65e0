"""What tagging with a checkpoint reads besides its own files: the retrieval encoder and the English
source it was trained on, found on this machine and matched against the hashes it recorded."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.training.checkpoint import PROVENANCE, hub_snapshot, read_info, recorded_config, weights_sha256
from trainer.utils.digest import file_sha256
from trainer.utils.errors import CheckpointError, InputError
from trainer.utils.paths import split_selector

logger = logging.getLogger(__name__)


@dataclass
class AdaptationInputs:
    """What tagging with a checkpoint reads besides its own files, found and checked."""

    checkpoint: str
    config: Any  # the checkpoint's Config: the settings it was trained and is adapted with
    labels: list
    encoder: str  # folder holding the retrieval encoder (the checkpoint itself when it retrieves)
    source: str  # the English source corpus, with a '#split' selector if it had one
    checked: bool  # both were matched against hashes the checkpoint recorded


def _matches(want: Optional[str], digest, mismatch) -> bool:
    """Whether a recorded digest was checked (False: none recorded); CheckpointError(mismatch(have))
    when the content's `digest()` differs from it."""
    if want is None:
        return False
    have = digest()
    if have != want:
        raise CheckpointError(mismatch(have))
    return True


def _encoder_of(folder: Path, cfg, recorded: dict, given: Optional[str]) -> tuple[str, bool]:
    """(folder to load the retrieval encoder from, whether its weights matched the recorded hash)."""
    if recorded.get("kind") == "checkpoint" or (not recorded and cfg.retrieval.encoder == "finetuned"):
        return str(folder), True
    name = recorded.get("name_or_path") or cfg.model.name_or_path
    want = recorded.get("weights_sha256")
    hint = f"(weights sha256 {want[:12]}...)" if want else ""
    if given:
        if not os.path.isdir(given):
            raise InputError(f"--encoder {given}: no such folder; give the folder of the retrieval encoder "
                             f"{name} {hint}")
        path = given
    elif os.path.isdir(name):
        path = name
    elif recorded.get("kind") == "folder" or os.path.isabs(name):
        raise CheckpointError(f"checkpoint {folder} retrieves with the encoder in {name}, which is not on this "
                              f"machine; pass --encoder FOLDER holding it {hint}")
    else:
        path = hub_snapshot(name)
        if path is None:
            raise CheckpointError(f"checkpoint {folder} retrieves with the hub model {name}, which is not in this "
                                  f"machine's Hugging Face cache (the hub is not asked); pass --encoder FOLDER "
                                  f"holding it {hint}")
    return path, _matches(want, lambda: weights_sha256(path), lambda have: (
        f"checkpoint {folder} was trained with the retrieval encoder {name} {hint}, but the weights in {path} differ "
        f"(sha256 {str(have)[:12]}...); pass --encoder FOLDER with the original weights"))


def _source_of(folder: Path, cfg, recorded: dict, given: Optional[str]) -> tuple[str, bool]:
    """(English source path with its split selector, whether its content matched the recorded hash)."""
    want, split = recorded.get("sha256"), recorded.get("split")
    if given:
        path, given_split = split_selector(given)
        split = given_split or split
    elif recorded.get("path"):
        path = recorded["path"]
    else:
        path, split = split_selector(cfg.data.resolve(cfg.data.source_train))
    hint = f"(sha256 {want[:12]}...)" if want else ""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder} adapts from the English source {path}, which is not on this "
                              f"machine; pass --source FILE with that corpus {hint}")
    selected = f"{path}#{split}" if split else path
    return selected, _matches(want, lambda: file_sha256(path), lambda have: (
        f"checkpoint {folder} was trained on the English source {recorded.get('path') or path} {hint}, but {path} "
        f"differs (sha256 {have[:12]}...); pass --source FILE with the original corpus"))


def adaptation_inputs(path: str | os.PathLike, encoder: Optional[str] = None,
                      source: Optional[str] = None) -> AdaptationInputs:
    """The checkpoint's settings, labels, retrieval encoder and English source, each found on this
    machine and matched against the hashes it recorded (CheckpointError naming what to pass otherwise).
    `encoder` and `source` replace the recorded locations, not the recorded content."""
    folder = Path(path).resolve()
    info = read_info(folder)
    cfg = recorded_config(folder, info)
    recorded = info.get(PROVENANCE) or {}
    enc, enc_ok = _encoder_of(folder, cfg, recorded.get("retrieval_encoder") or {}, encoder)
    src, src_ok = _source_of(folder, cfg, recorded.get("source") or {}, source)
    unchecked = [what for what, ok in ((f"retrieval encoder {enc}", enc_ok), (f"English source {src}", src_ok)) if not ok]
    if unchecked:
        logger.warning("checkpoint %s records no hash of its %s (saved before checkpoints recorded them): used "
                       "unchecked", folder, " and ".join(unchecked))
    return AdaptationInputs(str(folder), cfg, list(info["labels"]), enc, src, enc_ok and src_ok)

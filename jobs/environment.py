"""What a job's settings point at, asked where the job starts: the model folder (or hub id), the
tracking store. trainer.config checks values alone, offline and instantly; these checks read
files, the environment and, for a hub id not in the local cache, the network."""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from trainer.config import Config, Override, load_config, tracking_uri_problems, uri_scheme
from trainer.utils.errors import ConfigError

# A Hugging Face hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), at most 96 characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_job_config(path: str | os.PathLike | None = None, overrides: Sequence[Override] = ()) -> Config:
    """trainer.config.load_config, then check_environment: every problem raised at once, values
    first (what they point at is asked only when the values are right)."""
    cfg = load_config(path, overrides)
    problems = check_environment(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def tracking_store_problems(uri: str) -> list[str]:
    """What is wrong with a tracking URI (empty: nothing): as written (trainer.config), then its
    store: a sqlite store's folder exists, a file store is one MLflow allows."""
    problems = tracking_uri_problems(uri)
    if problems:
        return problems
    scheme = uri_scheme(uri)
    if scheme == "sqlite":
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder):
            return [f"{uri!r}: the folder {os.path.abspath(folder)} of the sqlite store does not exist; create it "
                    "or choose another path (sqlite:////abs/path.db is absolute, sqlite:///path.db relative)"]
    if scheme in ("file", "") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        return [f"{uri!r} is a file store, which MLflow 3 refuses ('in maintenance mode'); use "
                "sqlite:///mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true"]
    return []


def _encoder_config(folder: str) -> tuple[dict | None, str | None]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None, f"the folder {folder} holds no config.json; give a folder written by save_pretrained"
    except (OSError, ValueError) as err:
        return None, f"{path} cannot be read as JSON ({err}); save the model again"
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object; save the model again"
    return data, None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with a dot, or existing here."""
    return os.path.isabs(name) or name.startswith(".") or os.path.exists(name)


def hub_problems(name_or_path: str) -> list[str]:
    """Whether a hub id in model.name_or_path resolves, asked only where a job is about to use it
    (building a Config stays offline and instant): the local Hugging Face cache first, where its
    config.json must be readable; if it is not there, the hub itself unless HF_HUB_OFFLINE is set,
    within 10 seconds. Local paths are checked by check_environment; they give []."""
    # Imported when asked: huggingface_hub reads HF_HUB_OFFLINE and its other settings from the
    # environment when first imported, and a job sets some (jobs.console.setup) after it has
    # imported this module.
    import huggingface_hub
    from huggingface_hub import constants

    name = os.path.expanduser(name_or_path)
    if _looks_local(name):
        return []
    key = "model.name_or_path"
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        problem = _encoder_config(os.path.dirname(cached))[1]
        return [f"{key}: {problem}"] if problem else []
    if constants.HF_HUB_OFFLINE:
        return [f"{key}: {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set; download it where the hub can be reached, or give a model folder"]
    try:
        huggingface_hub.model_info(name, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        return [f"{key}: no model {name!r} on the Hugging Face hub (or it is private); check the id or give a folder"]
    except Exception as err:  # no network, a proxy, a rate limit: loading would fail the same way later
        return [f"{key}: {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                f"({type(err).__name__}); give a model folder, or run where the hub can be reached"]
    return []


def check_environment(cfg: Config) -> list[str]:
    """Problems with what the configuration points at (read-only: nothing is started or written).

    The tracking URI's store, and the model: a local folder must hold config.json, whose layer
    count and position limit bound model.num_frozen_layers and model.max_length; anything else
    must be a well-formed hub id (whether it resolves is asked by `hub_problems`, where a job is
    about to start its cluster).
    """
    problems = []
    if cfg.mlflow.tracking_uri is not None:
        problems += [f"mlflow.tracking_uri: {p}" for p in tracking_store_problems(cfg.mlflow.tracking_uri)]
    m = cfg.model
    name = os.path.expanduser(m.name_or_path)
    if not _looks_local(name):
        if not (_HUB_ID.match(name) and len(name) <= 96 and "--" not in name and ".." not in name):
            problems.append(f"model.name_or_path: {m.name_or_path!r} is neither a folder nor a hub id (owner/name); "
                            "give the folder of a saved model or a hub id")
        return problems
    if not os.path.isdir(name):
        return problems + [f"model.name_or_path: {m.name_or_path!r} is not a folder; give the folder of a saved "
                           "model (config.json, weights, tokenizer) or a hub id"]
    encoder, problem = _encoder_config(name)
    if problem:
        return problems + [f"model.name_or_path: {problem}"]
    layers = next((encoder[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if isinstance(encoder.get(k), int)), None)
    if layers is not None and m.num_frozen_layers > layers:
        problems.append(f"model.num_frozen_layers: {m.num_frozen_layers}, but the encoder in {name} has {layers} layers "
                        f"(config.json); use 0 to {layers}")
    positions = encoder.get("max_position_embeddings")
    if isinstance(positions, int) and m.max_length > positions:
        problems.append(f"model.max_length: {m.max_length}, but the encoder in {name} takes at most {positions} "
                        f"positions (config.json max_position_embeddings); use {positions} or less")
    return problems

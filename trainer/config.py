"""Typed job configuration: one YAML file per job plus dotted overrides.

Every hyper-parameter default of the project lives here and nowhere else. The defaults are the
paper's (Wu et al., AAAI 2020) and the official Meta-Cross code's where the paper is silent.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

LANGUAGES = ("en", "es", "nl", "de", "fr", "zh")


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-multilingual-cased"
    max_length: int = 128
    # Subwords of one window kept as left context of the next when a sentence is split.
    window_context: int = 32
    # The paper freezes "the bottom three layers"; the official code freezes layers 0..3 (four).
    # Embeddings, pooler and layers 0..num_frozen_layers-1 are frozen.
    num_frozen_layers: int = 4
    freeze_embeddings: bool = True
    freeze_pooler: bool = True
    dropout: float = 0.1


@dataclass
class DataConfig:
    # Root that every relative corpus path below is resolved against. METANER_DATA overrides
    # the default so that a checkout can point at a shared corpus folder.
    root: str = "../shared/data"
    source_train: str = "meta-cross/en/train.txt"
    source_dev: str = "meta-cross/en/valid.txt"
    targets: list[str] = field(default_factory=lambda: ["es", "nl", "de", "fr", "zh"])
    # A path may end in "#train" / "#test" to select a split of a corpus without sentence breaks.
    target_files: dict[str, str] = field(default_factory=lambda: {
        "es": "meta-cross/es/test.txt",
        "nl": "meta-cross/nl/test.txt",
        "de": "meta-cross/de/test.txt",
        "fr": "raw/europeana/enp_FR.bnf.bio#test",
        "zh": "raw/panx/dev-zh.tsv",
    })
    # Target-language training data, used only by the low-resource job (Table 6).
    target_train_files: dict[str, str] = field(default_factory=lambda: {
        "es": "meta-cross/es/train.txt",
        "nl": "meta-cross/nl/train.txt",
        "de": "meta-cross/de/train.txt",
        "fr": "raw/europeana/enp_FR.bnf.bio#train",
    })
    low_resource_fractions: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05])
    # The paper maps MISC to O where the target corpus has no MISC type.
    misc_to_o: list[str] = field(default_factory=lambda: ["fr", "zh"])
    # Sample this many sentences of each target test set (0 = all), reproducibly from the seed.
    target_sample: int = 0
    # Sample of English dev used for model selection during meta-training (0 = all).
    dev_sample: int = 500

    def resolve(self, relative: str) -> str:
        """Absolute path of a corpus path, keeping a trailing '#train'/'#test' split selector."""
        from .corpus import split_selector

        path, split = split_selector(relative)
        if not os.path.isabs(path):
            path = os.path.join(os.environ.get("METANER_DATA", self.root), path)
        return f"{path}#{split}" if split else path


@dataclass
class RetrievalConfig:
    k: int = 2
    pooling: Literal["cls", "mean"] = "cls"
    # The official code embeds with the pretrained encoder, not the fine-tuned one.
    encoder: Literal["pretrained", "finetuned"] = "pretrained"
    index: Literal["flat", "ivf"] = "flat"
    ivf_nlist: int = 256
    ivf_nprobe: int = 16
    # The official code drops the single most similar source sentence even for target sentences.
    drop_top1_for_targets: bool = False
    batch_size: int = 64
    cache_dir: str = ".metaner/cache"


@dataclass
class TrainConfig:
    mode: Literal["meta", "base"] = "meta"
    num_inner_steps: int = 2
    meta_batch_size: int = 32
    num_meta_steps: int = 3001
    eval_every: int = 300
    checkpoint_every: int = 300
    inner_lr: float = 3e-5
    meta_lr: float = 3e-5
    # The official code scales inner_lr by the meta learning rate's warmup-linear schedule over
    # meta-training progress (its warmup_prop_inner = 0.1); false keeps inner_lr constant.
    schedule_inner_lr: bool = True
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    # Multiplies every learning rate (meta, inner, base, adaptation) for the fresh classifier only;
    # 1 is the paper's single rate. For an encoder whose hidden states are small, a new linear head
    # moves too slowly at a BERT-style rate when training is short.
    classifier_lr_scale: float = 1.0
    # BertAdam clips each parameter tensor's gradient norm to this value.
    max_grad_norm: float = 1.0
    optimizer: Literal["bertadam", "adamw"] = "bertadam"
    mask_ratio: float = 0.2
    mask_on: Literal["query", "support", "both"] = "query"
    lambda_max: float = 2.0
    # Batch size of plain fine-tuning (the "Base Model" row).
    base_batch_size: int = 32
    # Fine-tuning steps on a target-language sample in the low-resource job.
    low_resource_steps: int = 100
    seeds: list[int] = field(default_factory=lambda: [95, 495, 539, 667, 806])
    output_dir: str = "outputs"


@dataclass
class AdaptConfig:
    enabled: bool = True
    adapt_lr: float = 1e-5
    num_adapt_steps: int = 1
    # Sentences adapted together by the batched path (each from the same meta weights).
    batch_size: int = 8
    lambda_max: float = 0.0
    # Frozen-bottom hidden states of each evaluation unit's windows, kept on disk and shared by
    # every checkpoint with the same frozen layers (e.g. all variants of one job); "" keeps none.
    prefix_cache_dir: str = ".metaner/prefix"


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 0
    num_embed_actors: int = 2
    num_index_shards: int = 2
    num_adapter_actors: int = 2
    # Sentences per unit of work sent to an adapter actor (and per resumable file).
    adapt_unit_size: int = 32
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None
    experiment: str = "metaner"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, for logging as parameters."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# ---------------------------------------------------------------- loading and checking values


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-5" (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported type {hint}")  # a programming error, not user input


def _apply(obj: Any, updates: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"unknown key {key!r}; allowed keys here: {', '.join(prefix + n for n in names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _apply(current, value, key + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            # A mapping setting (e.g. data.target_files) is updated key by key, so that
            # `data.target_files.fr=PATH` changes one language and keeps the others.
            setattr(obj, name, {**current, **_coerce(key, value, hints[name])})
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: write it as section.key=value, e.g. train.meta_batch_size=16")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict[str, Any]) -> Config:
    """A checked Config from the nested dict that `Config.to_dict` wrote (checkpoints, workers)."""
    cfg = Config()
    _apply(cfg, data, "")
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A checked copy of `cfg` with each `a.b=value` applied in order."""
    out = Config()
    _apply(out, cfg.to_dict(), "")
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(out, nested, "")
    validate(out)
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then each `a.b=value` override, then checks."""
    cfg = Config()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
        try:
            _apply(cfg, data, "")
        except ValueError as err:
            raise ValueError(f"config file {path}: {err}") from None
    return with_overrides(cfg, overrides)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Raise ValueError naming the first key whose value cannot work."""
    m, d, r, t, a, c = cfg.model, cfg.data, cfg.retrieval, cfg.train, cfg.adapt, cfg.cluster
    _check(m.max_length >= 8, "model.max_length", "must be at least 8")
    _check(0 <= m.window_context <= m.max_length // 2, "model.window_context",
           f"must be between 0 and half of model.max_length ({m.max_length // 2})")
    _check(m.num_frozen_layers >= 0, "model.num_frozen_layers", "must be 0 or more")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _check(len(d.targets) > 0, "data.targets", f"name at least one target language of {', '.join(LANGUAGES[1:])}")
    for lang in d.targets:
        _check(lang in d.target_files, "data.targets",
               f"{lang!r} has no entry in data.target_files; add data.target_files.{lang}=PATH")
    for lang in d.misc_to_o:
        _check(lang in LANGUAGES, "data.misc_to_o", f"{lang!r} is not one of {', '.join(LANGUAGES)}")
    _check(d.target_sample >= 0, "data.target_sample", "must be 0 (all) or a positive count")
    _check(d.dev_sample >= 0, "data.dev_sample", "must be 0 (all) or a positive count")
    _check(all(0 < f <= 1 for f in d.low_resource_fractions), "data.low_resource_fractions",
           "each fraction must be in (0, 1]")
    _check(r.k >= 1, "retrieval.k", "must be at least 1")
    _check(r.batch_size >= 1, "retrieval.batch_size", "must be at least 1")
    for key in ("inner_lr", "meta_lr", "classifier_lr_scale"):
        _check(getattr(t, key) > 0, f"train.{key}", "must be positive")
    _check(a.adapt_lr > 0, "adapt.adapt_lr", "must be positive")
    _check(a.num_adapt_steps >= 0, "adapt.num_adapt_steps", "must be 0 or more")
    _check(a.batch_size >= 1, "adapt.batch_size", "must be at least 1")
    _check(t.num_inner_steps >= 1, "train.num_inner_steps", "must be at least 1")
    _check(t.meta_batch_size >= 1, "train.meta_batch_size", "must be at least 1")
    _check(t.num_meta_steps >= 1, "train.num_meta_steps", "must be at least 1")
    _check(t.eval_every >= 1, "train.eval_every", "must be at least 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be at least 1")
    _check(0.0 <= t.warmup_proportion < 1.0, "train.warmup_proportion", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (no clipping) or more")
    _check(0.0 <= t.mask_ratio <= 1.0, "train.mask_ratio", "must be in [0, 1]")
    _check(t.lambda_max >= 0, "train.lambda_max", "must be 0 or more")
    _check(t.base_batch_size >= 1, "train.base_batch_size", "must be at least 1")
    _check(len(t.seeds) > 0, "train.seeds", "give at least one seed")
    _check(c.num_workers >= 1, "cluster.num_workers", "must be at least 1")
    _check(c.zero_stage in (0, 1, 2), "cluster.zero_stage", "must be 0, 1 or 2")
    for key in ("num_embed_actors", "num_index_shards", "num_adapter_actors", "adapt_unit_size"):
        _check(getattr(c, key) >= 1, f"cluster.{key}", "must be at least 1")
    _check(c.cpus_per_actor >= 0 and c.gpus_per_actor >= 0, "cluster.cpus_per_actor",
           "actor resources must be 0 or more")

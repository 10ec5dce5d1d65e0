"""Typed job configuration: one YAML file per job plus dotted overrides.

Every hyper-parameter default of the project lives here and nowhere else. The defaults are the
paper's (Wu et al., AAAI 2020) and the official Meta-Cross code's where the paper is silent.
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from .corpus import split_selector
from .errors import ConfigError

LANGUAGES = ("en", "es", "nl", "de", "fr", "zh")

# Settings of the machinery rather than of the method: not in the YAML files, and not part of any
# record or checkpoint fingerprint (they change how work is carried, never what it computes).
EVAL_BATCH_SIZE = 32  # windows per forward pass when labelling without adaptation, or filling the frozen bottom
ACTOR_MAX_RESTARTS = 3  # an adapter actor that dies is restarted this many times, its unit retried
TRAIN_MAX_FAILURES = 2  # a Ray Train worker group that fails is restarted from its last checkpoint this often
CHECKPOINTS_KEPT = 2  # Ray Train checkpoints kept per training run


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
    # Hidden states of the frozen bottom (embeddings and frozen layers), kept on disk and shared by
    # every checkpoint with the same frozen weights: English train for meta-training, each
    # evaluation unit for adaptation; "" keeps them in memory only.
    prefix_cache_dir: str = ".metaner/prefix"
    # A trained checkpoint folder whose weights (encoder and classifier) replace the pretrained
    # encoder and the fresh head before training starts: meta-training on top of a fine-tuned
    # English model. Its label set must be the one training uses.
    init_checkpoint: Optional[str] = None


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
    # Targets written without spaces, one character per word in their corpora. With a sentencepiece
    # or byte-level vocabulary (XLM-R, e5) each sentence is tokenised as one unspaced string, as
    # the encoder read such text in pretraining, and labels reach characters through the pieces'
    # offsets; WordPiece vocabularies (mBERT) split every CJK character anyway and are unaffected.
    # [] tokenises every character as a word of its own.
    unspaced_languages: list[str] = field(default_factory=lambda: ["zh"])
    # Sample this many sentences of each target test set (0 = all), reproducibly from the seed.
    target_sample: int = 0
    # Sample of English dev used for model selection during meta-training (0 = all).
    dev_sample: int = 500

    def resolve(self, relative: str) -> str:
        """Absolute path of a corpus path, keeping a trailing '#train'/'#test' split selector."""
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
    log_every: int = 10
    # Tasks whose inner loops run together (torch.func over per-task copies of the trainable
    # top); 0 sizes the chunks to the free memory.
    task_chunk_size: int = 0
    # BertAdam's inner steps as torch.compile'd kernels: "auto" from a million trainable weights
    # (there a step is bound by passes over every task's weight copy; below, compiling costs more
    # than it saves).
    compile_updates: Literal["auto", "always", "never"] = "auto"
    # A task's support windows end to end in one row (block-diagonal attention) rather than a row
    # per window padded to the chunk's longest, and a fine-tuning batch's windows end to end in
    # rows of 128 positions rather than padded to its longest: fewer padded positions, longer
    # attention rows. "auto" from a hidden size of 256, where the per-position layers outweigh the
    # attention (on one CPU thread: 6 % faster at hidden 384, 10 % slower at 64). Needs a frozen
    # bottom and an encoder with absolute positions (else never).
    pack_support: Literal["auto", "always", "never"] = "auto"
    # The arithmetic of every forward and backward pass (meta-training, fine-tuning, adaptation,
    # tagging): "bf16" under torch.autocast, the frozen bottom computed and kept in bf16 (half its
    # memory), with fp32 weights, BertAdam moments and meta-gradient sums; "fp32" everywhere, which
    # keeps the equality with the official code exact. bf16 is what GPUs run fast; a CPU without
    # AVX512-BF16 or AMX runs it many times slower (benchmarks/README.md).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Which positions the loss covers: a word's first subword (this project), or every position
    # of a window with continuation subwords as X and [CLS]/[SEP] as classes (the official code).
    loss_positions: Literal["first_subword", "all"] = "first_subword"
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


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    # Ray Train workers, each with a DeepSpeed engine; 0 meta-trains in the job's own process
    # (no Ray Train, no DeepSpeed), as a laptop or a debugger wants.
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 0
    # How the workers share a meta-batch: "dynamic", each claims the next chunk of tasks as it comes
    # free (a worker the machine slows down takes fewer; the sum's order then varies from run to
    # run, in the last bits); "static", shares placed by cost up front (reproducible to the bit).
    task_balance: Literal["static", "dynamic"] = "dynamic"
    num_embed_actors: int = 2
    num_index_shards: int = 2
    num_adapter_actors: int = 2
    # Sentences per unit of work sent to an adapter actor (and per resumable file).
    adapt_unit_size: int = 32
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    # Where Ray Train keeps a job's checkpoints and the training workers put the models the driver
    # collects (each job under a folder of its own): a folder every node mounts, or a pyarrow
    # filesystem URI (s3://bucket/path, gs://bucket/path), as Ray Train's own storage_path. Unset:
    # <out>/.../ray on the driver's disk, which a cluster of several nodes accepts only where every
    # node sees it (checked before any work).
    storage_path: Optional[str] = None


@dataclass
class TagConfig:
    # Sentences per output shard: the unit written whole (atomically) and skipped when a run is
    # started again with the same --out.
    shard_size: int = 1000
    # Shards read, retrieved and adapted at once: what bounds memory, whatever the input's size.
    shards_in_flight: int = 2
    # A longer sentence (a line without sentence ends) is cut into pieces of this many words, so
    # that one line cannot fill an adapter's memory.
    max_words: int = 256
    # Seconds to wait for the actors to be placed and loaded before naming the resources missing.
    start_timeout_s: float = 300.0


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
    tag: TagConfig = field(default_factory=TagConfig)
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
#
# Coercion is written by hand (no pydantic): the dataclasses above stay plain, and every message
# names the dotted key the user wrote.


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
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-5" (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # .inf, .nan and 1e999 parse as floats; no setting of this project works with them.
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported type {hint}")  # a programming error, not user input


# (dotted key, message) pairs: the key lets a file's line be looked up and repeats be skipped.
Problems = list[tuple[str, str]]


def _apply(obj: Any, updates: dict[str, Any], prefix: str, problems: Problems) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            problems.append((key, f"unknown key {key!r}; allowed keys here: {', '.join(prefix + n for n in names)}"))
            continue
        current = getattr(obj, name)
        try:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    names = ", ".join(f.name for f in dataclasses.fields(current))
                    raise ConfigError(f"{key}: expected a mapping of {names}")
                _apply(current, value, key + ".", problems)
            elif isinstance(current, dict) and isinstance(value, dict):
                # A mapping setting (e.g. data.target_files) is updated key by key, so that
                # `data.target_files.fr=PATH` changes one language and keeps the others.
                setattr(obj, name, {**current, **_coerce(key, value, hints[name])})
            else:
                setattr(obj, name, _coerce(key, value, hints[name]))
        except ValueError as err:
            problems.append((key, str(err)))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key repeated in one mapping is an error, not a silent
    "the last one wins"; it also records the line of every dotted key, for the messages."""

    def construct_document(self, node):
        self.duplicates: list[str] = []
        self.key_lines: dict[str, int] = {}
        self._walk(node, "")
        return super().construct_document(node)

    def _walk(self, node, prefix: str) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._walk(item, prefix)
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
            if key_node.value in seen:
                self.duplicates.append(f"{line}: duplicate key {key!r} (first at line {seen[key_node.value]}); "
                                       "the last one would silently win: keep one")
            else:
                seen[key_node.value] = line
                self.key_lines.setdefault(key, line)
            self._walk(value_node, key + ".")


def _load_yaml(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """The document and the line of each dotted key; ConfigError for bad YAML or repeated keys."""
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError([f"{name} is not valid YAML: {' '.join(str(err).split())}"]) from None
    finally:
        loader.dispose()
    duplicates = getattr(loader, "duplicates", [])
    if duplicates:
        raise ConfigError([f"{name}:{d}" for d in duplicates])
    return data, getattr(loader, "key_lines", {})


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. train.meta_batch_size=16")
    key, _, raw = text.partition("=")
    value = _load_yaml(raw, f"override {text!r}")[0] if raw.strip() else ""
    return key.strip().split("."), value


# An override: `a.b=value` as written on a command line, or (dotted key, value) as a program has it.
Override = typing.Union[str, tuple[str, Any]]


def _override(cfg: Config, overrides: Sequence[Override], problems: Problems) -> None:
    for item in overrides:
        if isinstance(item, str):
            try:
                keys, value = _parse_override(item)
            except ValueError as err:
                problems.append((item, str(err)))
                continue
        else:
            keys, value = item[0].split("."), item[1]
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "", problems)


def _finish(cfg: Config, problems: Problems, environment: bool = False) -> Config:
    """Raise every problem at once: those of loading, then the checks of keys that loaded."""
    bad = {key for key, _ in problems}
    messages = [message for _, message in problems]
    messages += [message for key, message in _validation(cfg) if key not in bad]
    if environment and not messages:
        messages += check_environment(cfg)
    if messages:
        raise ConfigError(messages)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """A checked Config from the nested dict that `Config.to_dict` wrote (checkpoints, workers)."""
    cfg, problems = Config(), []
    _apply(cfg, data, "", problems)
    return _finish(cfg, problems)


def with_overrides(cfg: Config, overrides: Sequence[Override]) -> Config:
    """A checked copy of `cfg` with each `a.b=value` (or ("a.b", value)) applied in order; a key
    naming a section (`cluster`) takes a mapping of its keys."""
    out, problems = Config(), []
    _apply(out, cfg.to_dict(), "", problems)
    _override(out, overrides, problems)
    return _finish(out, problems)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (after the files it names under `include:`, relative
    to it, in order), then each `a.b=value` override, then checks.

    Raises ConfigError (a ValueError) listing every problem, one line each: values (types,
    ranges, finite numbers, choices, repeats), then, when those are fine, what they point at
    (tracking URI, model folder). Nothing is started or written before.
    """
    cfg, problems = Config(), []
    if path is not None:
        _apply_file(cfg, Path(path), problems)
    _override(cfg, overrides, problems)
    return _finish(cfg, problems, environment=True)


def _apply_file(cfg: Config, path: Path, problems: Problems, chain: tuple[Path, ...] = ()) -> None:
    """Apply one YAML file onto `cfg`, the files it includes first: a block shared by several job
    files (the GPU cluster) is written once, and a key set again here overrides it."""
    name = f"config file {path}" + (f" (included by {chain[-1]})" if chain else "")
    if path.resolve() in chain:
        raise ConfigError([f"{name} includes itself ({' -> '.join(map(str, chain + (path,)))}); remove the loop"])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{name} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError([f"{name} cannot be read ({reason}); give a readable UTF-8 YAML file"]) from None
    data, lines = _load_yaml(text, name)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{name}: expected a mapping of sections at the top level"])
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError([f"{name}:{lines.get('include', 1)}: include: give a file name or a list of file names, "
                          "relative to this file"])
    for included in includes:
        _apply_file(cfg, path.parent / included, problems, chain + (path.resolve(),))
    found: Problems = []
    _apply(cfg, data, "", found)
    for key, message in found:
        where = f"{name}:{lines[key]}" if key in lines else name
        problems.append((key, f"{where}: {message}"))


_PROBLEMS: contextvars.ContextVar[Optional[Problems]] = contextvars.ContextVar("config_problems", default=None)


def _check(ok: bool, key: str, message: str) -> None:
    if ok:
        return
    found = _PROBLEMS.get()
    if found is None:  # called outside validate(): fail at once
        raise ConfigError([f"{key}: {message}"])
    found.append((key, f"{key}: {message}"))


def _validation(cfg: Config) -> Problems:
    """Every (key, message) of validate(cfg), without raising."""
    try:
        validate(cfg)
    except ConfigError as err:
        return [(p.partition(":")[0], p) for p in err.problems]
    return []


def _collecting(check: typing.Callable[[Config], None]) -> typing.Callable[[Config], None]:
    """Run `check` with _check collecting its problems instead of raising at the first."""
    def run(cfg: Config) -> None:
        token = _PROBLEMS.set([])
        try:
            check(cfg)
            found = _PROBLEMS.get()
        finally:
            _PROBLEMS.reset(token)
        if found:
            raise ConfigError([message for _, message in found])
    run.__doc__, run.__name__ = check.__doc__, check.__name__
    return run


@_collecting
def validate(cfg: Config) -> None:
    """Raise ConfigError naming every key whose value cannot work (one line each)."""
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
    for lang in d.unspaced_languages:
        _check(lang in d.target_files, "data.unspaced_languages",
               f"{lang!r} is not a target language (no entry in data.target_files)")
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
    _check(t.log_every >= 1, "train.log_every", "must be at least 1")
    _check(t.task_chunk_size >= 0, "train.task_chunk_size", "must be 0 (sized to memory) or a positive count")
    _check(0.0 <= t.warmup_proportion < 1.0, "train.warmup_proportion", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be 0 or more")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (no clipping) or more")
    _check(0.0 <= t.mask_ratio <= 1.0, "train.mask_ratio", "must be in [0, 1]")
    _check(t.lambda_max >= 0, "train.lambda_max", "must be 0 or more")
    _check(t.base_batch_size >= 1, "train.base_batch_size", "must be at least 1")
    _check(len(t.seeds) > 0, "train.seeds", "give at least one seed")
    _check(c.num_workers >= 0, "cluster.num_workers", "must be 0 (one process, no Ray Train) or more")
    _check(c.zero_stage in (0, 1, 2), "cluster.zero_stage", "must be 0, 1 or 2")
    for key in ("num_embed_actors", "num_index_shards", "num_adapter_actors", "adapt_unit_size"):
        _check(getattr(c, key) >= 1, f"cluster.{key}", "must be at least 1")
    for key in ("shard_size", "shards_in_flight", "max_words"):
        _check(getattr(cfg.tag, key) >= 1, f"tag.{key}", "must be at least 1")
    _check(cfg.tag.start_timeout_s > 0, "tag.start_timeout_s", "must be more than 0 seconds")
    _check_more(cfg)


def _whole_if_above_one(value: float) -> bool:
    # Ray refuses fractional resource amounts above 1 ("must be whole numbers").
    return value <= 1 or float(value).is_integer()


def _repeated(items: Sequence) -> list:
    seen: set = set()
    return [x for x in items if x in seen or seen.add(x)]


def _check_more(cfg: Config) -> None:
    """The checks beyond single ranges: repeats, cross-key limits, resources, URIs and names."""
    m, d, r, t, a, c = cfg.model, cfg.data, cfg.retrieval, cfg.train, cfg.adapt, cfg.cluster
    _check(bool(m.name_or_path.strip()), "model.name_or_path", "give a hub id or a model folder")
    for lang in _repeated(d.targets):
        _check(False, "data.targets", f"{lang!r} is named more than once; name each target language once")
    for lang in _repeated(d.misc_to_o):
        _check(False, "data.misc_to_o", f"{lang!r} is named more than once")
    for key in ("target_files", "target_train_files"):
        for lang, path in getattr(d, key).items():
            _check(bool(path.strip()), f"data.{key}.{lang}", "give a corpus path")
    for key in ("source_train", "source_dev"):
        _check(bool(getattr(d, key).strip()), f"data.{key}", "give a corpus path")
    for lang in _repeated(t.seeds):
        _check(False, "train.seeds", f"seed {lang} is given more than once")
    for seed in t.seeds:
        # numpy's generators take seeds in [0, 2**32).
        _check(0 <= seed < 2 ** 32, "train.seeds", f"seed {seed} must be in [0, 2**32)")
    _check(t.low_resource_steps >= 1, "train.low_resource_steps", "must be at least 1")
    _check(bool(t.output_dir.strip()), "train.output_dir", "give a folder")
    _check(r.ivf_nlist >= 1, "retrieval.ivf_nlist", "must be at least 1 (IVF lists)")
    if r.ivf_nlist >= 1:
        _check(1 <= r.ivf_nprobe <= r.ivf_nlist, "retrieval.ivf_nprobe",
               f"must be between 1 and retrieval.ivf_nlist ({r.ivf_nlist})")
    if c.gpus_per_actor > 0:
        # Index shards then go to the GPU (cluster.retrieval.ShardedIndexSpec), where FAISS answers
        # at most 2048 neighbours and probes at most 2048 lists (retrieval.index._GPU_MAX_K).
        gpu_max = 2048
        _check(r.k <= gpu_max, "retrieval.k", f"{r.k}: FAISS on a GPU (cluster.gpus_per_actor > 0) finds at most "
               f"{gpu_max} neighbours; lower it, or set cluster.gpus_per_actor=0 for index shards on the CPU")
        _check(r.index != "ivf" or r.ivf_nprobe <= gpu_max, "retrieval.ivf_nprobe",
               f"{r.ivf_nprobe}: FAISS on a GPU (cluster.gpus_per_actor > 0) probes at most {gpu_max} lists; lower "
               "it, or set cluster.gpus_per_actor=0 for index shards on the CPU")
    _check(a.lambda_max >= 0, "adapt.lambda_max", "must be 0 or more")
    for key in ("cpus_per_worker", "cpus_per_actor", "gpus_per_actor"):
        value = getattr(c, key)
        _check(value >= 0, f"cluster.{key}", "must be 0 or more")
        _check(_whole_if_above_one(value), f"cluster.{key}", f"{value:g}: amounts above 1 must be whole numbers (Ray)")
    _check(c.cpus_per_worker > 0 or c.num_workers == 0, "cluster.cpus_per_worker",
           "must be more than 0: each training worker computes")
    if c.address is not None:
        _check(_RAY_ADDRESS.match(c.address) is not None, "cluster.address",
               f"{c.address!r} is not a Ray address; give host:port, ray://host:port, 'auto' or null for a local "
               "cluster (the http:// job server address is for `ray job submit`, not for this key)")
    if c.storage_path is not None:
        _check(_STORAGE_URI.match(c.storage_path) is not None or os.path.isabs(os.path.expanduser(c.storage_path)),
               "cluster.storage_path", f"{c.storage_path!r}: give an absolute folder that every node mounts, or a "
               "URI such as s3://bucket/path or gs://bucket/path")
    _check(bool(cfg.mlflow.experiment.strip()), "mlflow.experiment", "give an experiment name")
    if cfg.mlflow.tracking_uri is not None:
        for problem in tracking_uri_problems(cfg.mlflow.tracking_uri, check_files=False):
            _check(False, "mlflow.tracking_uri", problem)


# pyarrow's filesystems, as Ray Train reads its storage_path.
_STORAGE_URI = re.compile(r"^(s3|gs|gcs|hdfs|viewfs|abfs|abfss|file)://\S+$")
_RAY_ADDRESS = re.compile(r"^(auto|local|(ray://)?([\w.-]+|\[[0-9a-fA-F:]+\]):\d{1,5})$")
# Schemes MLflow's tracking stores understand ("+driver" allowed on the database ones).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
# A Hugging Face hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), at most 96 characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def tracking_uri_problems(uri: str, check_files: bool = True) -> list[str]:
    """What is wrong with a tracking URI (empty: nothing): scheme known; with `check_files`, a
    sqlite store's folder exists and a file store is allowed by MLflow."""
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", uri) else ""
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
        return [f"{uri!r}: unknown scheme {scheme!r}; use one of {', '.join(s + ':' for s in TRACKING_SCHEMES)} "
                "(e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)"]
    if not uri.strip():
        return ["give a tracking URI, e.g. sqlite:///mlflow.db, or null for ./mlflow.db"]
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri in ("sqlite:///", "sqlite:///:memory:"):
            return [f"{uri!r}: name a database file, sqlite:///relative/path.db or sqlite:////absolute/path.db"]
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if check_files and not os.path.isdir(folder):
            return [f"{uri!r}: the folder {os.path.abspath(folder)} of the sqlite store does not exist; create it "
                    "or choose another path (sqlite:////abs/path.db is absolute, sqlite:///path.db relative)"]
    if (scheme in ("file", "") and check_files
            and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1")):
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
        problems += [f"mlflow.tracking_uri: {p}" for p in tracking_uri_problems(cfg.mlflow.tracking_uri)]
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

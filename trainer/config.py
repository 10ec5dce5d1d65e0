"""Typed job configuration: one YAML file per job plus dotted overrides, on pydantic v2.

Every hyper-parameter default of the project lives here and nowhere else. The defaults are the
paper's (Wu et al., AAAI 2020) and the official Meta-Cross code's where the paper is silent.

Each setting says, on its field, what changing it changes (`setting(..., results=, resume=, use=)`):
what a seed computes (the inputs record a job compares before reusing its work), the weights of a
meta-training run (a checkpoint made under another value is not resumed), and what a trained
checkpoint means (it is not used, evaluated or tagged with, under another value).

Models are frozen (a changed configuration is a new one: `with_overrides`), unknown keys are
refused, types are strict (a YAML 1.1 number written `3e-5`, which PyYAML reads as a string, is
read as the number), NaN and infinities are refused, and every problem is reported at once, one
line each, naming its dotted key and the file and line it came from. Whether what a setting
points at exists (a model folder, the hub, a tracking store) is asked where a job starts
(jobs.environment), not here.
"""
from __future__ import annotations

import contextvars
import copy
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from trainer.utils.errors import ConfigError
from trainer.utils.paths import split_selector

LANGUAGES = ("en", "es", "nl", "de", "fr", "zh")
ROLES = ("results", "resume", "use")

# Windows per forward pass when labelling without adaptation, or filling the frozen bottom: the
# default of the functions that take a batch size, not a setting (it changes memory, not results).
EVAL_BATCH_SIZE = 32


def setting(default: Any, *, results: bool = True, resume: bool = True, use: bool = False, **constraints) -> Any:
    """A field of the configuration, and what changing it changes.

    `results`: what a seed computes (false: where files go, how work is spread, or a path whose
    content the inputs record counts by digest instead). `resume`: the weights meta-training
    produces, so that a checkpoint made under another value is not resumed. `use`: true where a
    trained checkpoint may be used under another value than it was trained with (how and where it
    runs, what it labels); false where the value is part of what the checkpoint means."""
    extra = {"roles": {"results": results, "resume": resume, "use": use}}
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: copy.deepcopy(default), json_schema_extra=extra, **constraints)
    return Field(default, json_schema_extra=extra, **constraints)


def _yaml_number(value: Any) -> Any:
    # YAML 1.1 reads "3e-5" (no dot) as a string; every number of this configuration is meant.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Number = Annotated[float, BeforeValidator(_yaml_number)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = setting("bert-base-multilingual-cased", results=False)
    max_length: int = setting(128)
    # Subwords of one window kept as left context of the next when a sentence is split.
    window_context: int = setting(32)
    # The paper freezes "the bottom three layers"; the official code freezes layers 0..3 (four).
    # Embeddings, pooler and layers 0..num_frozen_layers-1 are frozen.
    num_frozen_layers: int = setting(4)
    freeze_embeddings: bool = setting(True)
    freeze_pooler: bool = setting(True)
    dropout: Number = setting(0.1)
    # Hidden states of the frozen bottom (embeddings and frozen layers), kept on disk and shared by
    # every checkpoint with the same frozen weights: English train for meta-training, each
    # evaluation unit for adaptation; "" keeps them in memory only.
    prefix_cache_dir: str = setting(".metaner/prefix", results=False, resume=False, use=True)
    # A trained checkpoint folder whose weights (encoder and classifier) replace the pretrained
    # encoder and the fresh head before training starts: meta-training on top of a fine-tuned
    # English model. Its label set must be the one training uses.
    init_checkpoint: Optional[str] = setting(None, results=False)


class DataConfig(Section):
    # Root that every relative corpus path below is resolved against. METANER_DATA overrides
    # the default so that a checkout can point at a shared corpus folder.
    root: str = setting("../shared/data", results=False, resume=False, use=True)
    source_train: str = setting("meta-cross/en/train.txt", results=False, use=True)
    source_dev: str = setting("meta-cross/en/valid.txt", results=False, use=True)
    targets: list[str] = setting(["es", "nl", "de", "fr", "zh"], resume=False, use=True)
    # A path may end in "#train" / "#test" to select a split of a corpus without sentence breaks.
    target_files: dict[str, str] = setting({
        "es": "meta-cross/es/test.txt",
        "nl": "meta-cross/nl/test.txt",
        "de": "meta-cross/de/test.txt",
        "fr": "raw/europeana/enp_FR.bnf.bio#test",
        "zh": "raw/panx/dev-zh.tsv",
    }, results=False, resume=False, use=True)
    # Target-language training data, used only by the low-resource job (Table 6).
    target_train_files: dict[str, str] = setting({
        "es": "meta-cross/es/train.txt",
        "nl": "meta-cross/nl/train.txt",
        "de": "meta-cross/de/train.txt",
        "fr": "raw/europeana/enp_FR.bnf.bio#train",
    }, results=False, resume=False, use=True)
    low_resource_fractions: list[float] = setting([0.01, 0.02, 0.05], resume=False, use=True)
    # The paper maps MISC to O where the target corpus has no MISC type.
    misc_to_o: list[str] = setting(["fr", "zh"], resume=False, use=True)
    # Targets written without spaces, one character per word in their corpora. With a sentencepiece
    # or byte-level vocabulary (XLM-R, e5) each sentence is tokenised as one unspaced string, as
    # the encoder read such text in pretraining, and labels reach characters through the pieces'
    # offsets; WordPiece vocabularies (mBERT) split every CJK character anyway and are unaffected.
    # [] tokenises every character as a word of its own.
    unspaced_languages: list[str] = setting(["zh"], resume=False, use=True)
    # Sample this many sentences of each target test set (0 = all), reproducibly from the seed.
    target_sample: int = setting(0, resume=False, use=True)
    # Sample of English dev used for model selection during meta-training (0 = all).
    dev_sample: int = setting(500, use=True)

    def resolve(self, relative: str) -> str:
        """Absolute path of a corpus path, keeping a trailing '#train'/'#test' split selector."""
        path, split = split_selector(relative)
        if not os.path.isabs(path):
            path = os.path.join(os.environ.get("METANER_DATA", self.root), path)
        return f"{path}#{split}" if split else path


class RetrievalConfig(Section):
    k: int = setting(2, use=True)
    pooling: Literal["cls", "mean"] = setting("cls")
    # The official code embeds with the pretrained encoder, not the fine-tuned one.
    encoder: Literal["pretrained", "finetuned"] = setting("pretrained")
    index: Literal["flat", "ivf"] = setting("flat", use=True)
    ivf_nlist: int = setting(256, use=True)
    ivf_nprobe: int = setting(16, use=True)
    # The official code drops the single most similar source sentence even for target sentences.
    drop_top1_for_targets: bool = setting(False, use=True)
    batch_size: int = setting(64, resume=False, use=True)
    cache_dir: str = setting(".metaner/cache", results=False, resume=False, use=True)


class TrainConfig(Section):
    mode: Literal["meta", "base"] = setting("meta")
    num_inner_steps: int = setting(2)
    meta_batch_size: int = setting(32)
    num_meta_steps: int = setting(3001)
    eval_every: int = setting(300)
    checkpoint_every: int = setting(300, results=False, resume=False)
    log_every: int = setting(10, results=False, resume=False)
    # Tasks whose inner loops run together (torch.func over per-task copies of the trainable
    # top); 0 sizes the chunks to the free memory.
    task_chunk_size: int = setting(0, results=False, resume=False)
    # BertAdam's inner steps as torch.compile'd kernels: "auto" from a million trainable weights
    # (there a step is bound by passes over every task's weight copy; below, compiling costs more
    # than it saves).
    compile_updates: Literal["auto", "always", "never"] = setting("auto")
    # A task's support windows end to end in one row (block-diagonal attention) rather than a row
    # per window padded to the chunk's longest, and a fine-tuning batch's windows end to end in
    # rows of 128 positions rather than padded to its longest: fewer padded positions, longer
    # attention rows. "auto" from a hidden size of 256, where the per-position layers outweigh the
    # attention (on one CPU thread: 6 % faster at hidden 384, 10 % slower at 64). Needs a frozen
    # bottom and an encoder with absolute positions (else never).
    pack_support: Literal["auto", "always", "never"] = setting("auto", results=False, resume=False)
    # The arithmetic of every forward and backward pass (meta-training, fine-tuning, adaptation,
    # tagging): "bf16" under torch.autocast, the frozen bottom computed and kept in bf16 (half its
    # memory), with fp32 weights, BertAdam moments and meta-gradient sums; "fp32" everywhere, which
    # keeps the equality with the official code exact. bf16 is what GPUs run fast; a CPU without
    # AVX512-BF16 or AMX runs it many times slower (benchmarks/README.md).
    precision: Literal["fp32", "bf16"] = setting("fp32", use=True)
    # Which positions the loss covers: a word's first subword (this project), or every position
    # of a window with continuation subwords as X and [CLS]/[SEP] as classes (the official code).
    loss_positions: Literal["first_subword", "all"] = setting("first_subword")
    inner_lr: Number = setting(3e-5)
    meta_lr: Number = setting(3e-5)
    # The official code scales inner_lr by the meta learning rate's warmup-linear schedule over
    # meta-training progress (its warmup_prop_inner = 0.1); false keeps inner_lr constant.
    schedule_inner_lr: bool = setting(True)
    warmup_proportion: Number = setting(0.1)
    weight_decay: Number = setting(0.01)
    # Multiplies every learning rate (meta, inner, base, adaptation) for the fresh classifier only;
    # 1 is the paper's single rate. For an encoder whose hidden states are small, a new linear head
    # moves too slowly at a BERT-style rate when training is short.
    classifier_lr_scale: Number = setting(1.0)
    # BertAdam clips each parameter tensor's gradient norm to this value.
    max_grad_norm: Number = setting(1.0)
    optimizer: Literal["bertadam", "adamw"] = setting("bertadam")
    mask_ratio: Number = setting(0.2)
    mask_on: Literal["query", "support", "both"] = setting("query")
    lambda_max: Number = setting(2.0)
    # Batch size of plain fine-tuning (the "Base Model" row).
    base_batch_size: int = setting(32)
    # Fine-tuning steps on a target-language sample in the low-resource job.
    low_resource_steps: int = setting(100)
    seeds: list[int] = setting([95, 495, 539, 667, 806], results=False, resume=False, use=True)
    output_dir: str = setting("outputs", results=False, resume=False, use=True)


class AdaptConfig(Section):
    enabled: bool = setting(True, use=True)
    adapt_lr: Number = setting(1e-5, use=True)
    num_adapt_steps: int = setting(1, use=True)
    # Sentences adapted together by the batched path (each from the same meta weights).
    batch_size: int = setting(8, use=True)
    lambda_max: Number = setting(0.0, use=True)


class ClusterConfig(Section):
    address: Optional[str] = setting(None, results=False, resume=False, use=True)
    # Ray Train workers, each with a DeepSpeed engine; 0 meta-trains in the job's own process
    # (no Ray Train, no DeepSpeed), as a laptop or a debugger wants.
    num_workers: int = setting(2, resume=False, use=True)
    use_gpu: bool = setting(False, resume=False, use=True)
    cpus_per_worker: Number = setting(1.0, resume=False, use=True)
    zero_stage: int = setting(0, resume=False, use=True)
    # How the workers share a meta-batch: "dynamic", each claims the next chunk of tasks as it comes
    # free (a worker the machine slows down takes fewer; the sum's order then varies from run to
    # run, in the last bits); "static", shares placed by cost up front (reproducible to the bit).
    task_balance: Literal["static", "dynamic"] = setting("dynamic", resume=False, use=True)
    num_embed_actors: int = setting(2, results=False, resume=False, use=True)
    num_index_shards: int = setting(2, results=False, resume=False, use=True)
    num_adapter_actors: int = setting(2, results=False, resume=False, use=True)
    # Sentences per unit of work sent to an adapter actor (and per resumable file).
    adapt_unit_size: int = setting(32, resume=False, use=True)
    cpus_per_actor: Number = setting(0.5, results=False, resume=False, use=True)
    gpus_per_actor: Number = setting(0.0, results=False, resume=False, use=True)
    # Where Ray Train keeps a job's checkpoints and the training workers put the models the driver
    # collects (each job under a folder of its own): a folder every node mounts, or a pyarrow
    # filesystem URI (s3://bucket/path, gs://bucket/path), as Ray Train's own storage_path. Unset:
    # <out>/.../ray on the driver's disk, which a cluster of several nodes accepts only where every
    # node sees it (checked before any work).
    storage_path: Optional[str] = setting(None, resume=False, use=True)
    # An adapter actor that dies is restarted this many times, its unit of work retried.
    actor_max_restarts: int = setting(3, results=False, resume=False, use=True)
    # A Ray Train worker group that fails is started again from its last checkpoint this often.
    train_max_failures: int = setting(2, results=False, resume=False, use=True)
    # Ray Train checkpoints kept per training run.
    checkpoints_kept: int = setting(2, results=False, resume=False, use=True)


class TagConfig(Section):
    # Sentences per output shard: the unit written whole (atomically) and skipped when a run is
    # started again with the same --out.
    shard_size: int = setting(1000, results=False, resume=False, use=True)
    # Shards read, retrieved and adapted at once: what bounds memory, whatever the input's size.
    shards_in_flight: int = setting(2, results=False, resume=False, use=True)
    # A longer sentence (a line without sentence ends) is cut into pieces of this many words, so
    # that one line cannot fill an adapter's memory.
    max_words: int = setting(256, results=False, resume=False, use=True)
    # Seconds to wait for the actors to be placed and loaded before naming the resources missing.
    start_timeout_s: Number = setting(300.0, results=False, resume=False, use=True)


class DistillConfig(Section):
    """A student trained on a teacher's soft labels over unlabelled target-language text
    (jobs.distill). Its model, frozen layers, windows and learning-rate settings are its teacher's;
    these are what the student adds. Counted by the distill job's own record, not by every
    seed's (results=False): no other job reads them."""

    # Unlabelled sentences per language, the first ones in input order (0: all).
    max_sentences: int = setting(10000, results=False, resume=False, use=True, ge=0)
    # A sentence of the language's test set among them stops the job (false), or is left out (true:
    # a corpus's training file shares boilerplate lines such as "( EFE )" with its test set).
    drop_test_sentences: bool = setting(False, results=False, resume=False, use=True)
    # The student's start: the pretrained encoder with a fresh classifier, or the teacher's weights.
    init: Literal["pretrained", "teacher"] = setting("pretrained", results=False, resume=False, use=True)
    # Updates of `batch_size` windows; learning rate (unset: the teacher's train.meta_lr).
    num_steps: int = setting(440, results=False, resume=False, use=True, ge=1)
    batch_size: int = setting(32, results=False, resume=False, use=True, ge=1)
    lr: Optional[Number] = setting(None, results=False, resume=False, use=True)
    # Whether the student adapts to each sentence's English neighbours when it tags: off, since a
    # student is made to tag without the English source (evaluate/tag adapt.enabled=true turn it on).
    adapt: bool = setting(False, results=False, resume=False, use=True)


class MlflowConfig(Section):
    tracking_uri: Optional[str] = setting(None, results=False, resume=False, use=True)
    experiment: str = setting("metaner", results=False, resume=False, use=True)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tag: TagConfig = Field(default_factory=TagConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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


def _fields(loc: Sequence[str]) -> list:
    """The FieldInfo of each key along `loc`, from Config down, stopping where a key names no field
    (past a mapping setting's keys, or an unknown key)."""
    found, model = [], Config
    for part in loc:
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            break
        found.append(info)
        model = info.annotation
    return found


def roles(key: str) -> dict[str, bool]:
    """What changing the setting at dotted `key` changes ({"results", "resume", "use"}); a key
    inside a mapping setting (data.target_files.fr) is its setting's. KeyError: no such setting."""
    for info in _fields(key.split(".")):
        if isinstance(info.json_schema_extra, dict) and "roles" in info.json_schema_extra:
            return dict(info.json_schema_extra["roles"])
    raise KeyError(key)


def default(key: str) -> Any:
    """The default of the setting at dotted `key` (e.g. "model.dropout"): for the signatures of
    functions that take one setting, so that it is written once, here."""
    return _fields(key.split("."))[-1].get_default(call_default_factory=True)


def affects(key: str, role: str) -> bool:
    """Whether changing the setting at dotted `key` changes `role` (one of ROLES)."""
    return roles(key)[role]


# ---------------------------------------------------------------- loading and checking values
#
# A configuration is built from one nested dict: the defaults, each YAML file (its includes
# first) and each override merged into it key by key, then validated once by pydantic. Where each
# dotted key came from is kept, so that a message names the file and line.

# (dotted key, message) pairs: the key lets a file's line be looked up and repeats be skipped.
Problems = list[tuple[str, str]]
# Where each dotted key was last set: "config file F" and its line, or an override's text.
Origins = dict[str, tuple[str, Optional[int]]]


def _merge(into: dict, updates: dict, prefix: str, origins: Origins, origin: str, lines: dict[str, int]) -> None:
    """Merge `updates` into `into`: a mapping into a mapping key by key (a section, or a mapping
    setting such as data.target_files, where `data.target_files.fr=PATH` changes one language and
    keeps the others), anything else replaces."""
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _merge(into[name], value, key + ".", origins, origin, lines)
        else:
            into[name] = copy.deepcopy(value)
        origins[key] = (origin, lines.get(key))


_TYPE_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "bool_type": "true or false",
               "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
               "list_type": "a list", "dict_type": "a mapping"}


def _field_names(loc: Sequence) -> list[str]:
    """The keys allowed beside the key at `loc` (its section's fields)."""
    parents = _fields(loc[:-1])
    if len(parents) < len(loc) - 1:
        return []
    model = parents[-1].annotation if parents else Config
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _message(error: dict) -> tuple[str, str]:
    """(dotted key, one line naming it and what to do) of one pydantic error."""
    loc = [str(p) for p in error["loc"]]
    key, kind, value = ".".join(loc), error["type"], error.get("input")
    if kind == "extra_forbidden":
        prefix = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        allowed = ", ".join(prefix + n for n in _field_names(loc))
        return key, f"unknown key {key!r}; allowed keys here: {allowed}"
    if kind == "model_type":
        return key, f"{key}: expected a mapping of {', '.join(_field_names(loc + ['x']))}"
    if kind == "literal_error":
        allowed = typing.get_args(_fields(loc)[-1].annotation)
        return key, f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
    if kind == "finite_number":
        return key, f"{key}: expected a finite number, got {value!r}"
    if kind in _TYPE_WORDS:
        return key, f"{key}: expected {_TYPE_WORDS[kind]}, got {value!r}"
    return key, f"{key}: {error['msg']}"


def _without(data: dict, loc: Sequence) -> None:
    """Drop the value at `loc` (its default then applies), so that the other keys can be checked."""
    for part in loc[:-1]:
        data = data.get(part) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            return
    if isinstance(data, dict):
        data.pop(loc[-1], None)


def _build(data: dict, problems: Problems, origins: Origins) -> Config:
    """Config from the merged dict, raising every problem at once: those of loading, of types
    and keys (pydantic), then the checks (validate) of the keys that loaded."""
    found: Problems = []
    cfg = None
    for _ in range(2):  # again without the keys pydantic refused, to check the others too
        try:
            cfg = Config.model_validate(data)
            break
        except ValidationError as err:
            for error in err.errors():
                found.append(_message(error))
                _without(data, [str(p) for p in error["loc"]])
    bad = {key for key, _ in problems + found}
    messages = [message for _, message in problems]
    for key, message in found:
        where = _where(key, origins)
        messages.append(f"{where}: {message}" if where else message)
    if cfg is not None:
        messages += [message for key, message in _validation(cfg) if key not in bad]
    if messages or cfg is None:
        raise ConfigError(messages or ["the configuration does not load"])
    return cfg


def _where(key: str, origins: Origins) -> str:
    """The file and line that set `key` (or the section holding it), "" for a default or override."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:n]))
        if origin is not None:
            name, line = origin
            if not name.startswith("config file"):
                return ""
            return f"{name}:{line}" if line else name
    return ""


def _defaults() -> dict:
    return Config().model_dump()


def config_from_dict(data: dict[str, Any]) -> Config:
    """A checked Config from the nested dict that `Config.to_dict` wrote (checkpoints, workers)."""
    merged, origins = _defaults(), {}
    _merge(merged, data, "", origins, "recorded", {})
    return _build(merged, [], origins)


def with_overrides(cfg: Config, overrides: Sequence[Override]) -> Config:
    """A checked copy of `cfg` with each `a.b=value` (or ("a.b", value)) applied in order; a key
    naming a section (`cluster`) takes a mapping of its keys."""
    merged, origins, problems = cfg.model_dump(), {}, []
    _override(merged, overrides, problems, origins)
    return _build(merged, problems, origins)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[Override] = ()) -> Config:
    """Defaults, then the YAML file at `path` (after the files it names under `include:`, relative
    to it, in order), then each `a.b=value` override, then checks.

    Raises ConfigError (a ValueError) listing every problem, one line each: unknown keys, types,
    finite numbers, choices, then ranges, repeats and the limits between keys. Nothing is read but
    the files, nothing is started or written; what the values point at (a model folder, the hub,
    a tracking store) is checked by jobs.environment.load_job_config.
    """
    merged, origins, problems = _defaults(), {}, []
    if path is not None:
        _apply_file(merged, Path(path), problems, origins)
    _override(merged, overrides, problems, origins)
    return _build(merged, problems, origins)


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


def _override(data: dict, overrides: Sequence[Override], problems: Problems, origins: Origins) -> None:
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
        _merge(data, nested, "", origins, f"override {item!r}", {})


def _apply_file(data: dict, path: Path, problems: Problems, origins: Origins, chain: tuple[Path, ...] = ()) -> None:
    """Merge one YAML file into `data`, the files it includes first: a block shared by several job
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
    found, lines = _load_yaml(text, name)
    found = {} if found is None else found
    if not isinstance(found, dict):
        raise ConfigError([f"{name}: expected a mapping of sections at the top level"])
    includes = found.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError([f"{name}:{lines.get('include', 1)}: include: give a file name or a list of file names, "
                          "relative to this file"])
    for included in includes:
        _apply_file(data, path.parent / included, problems, origins, chain + (path.resolve(),))
    _merge(data, found, "", origins, name, lines)


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
    for key in ("actor_max_restarts", "train_max_failures"):
        _check(getattr(c, key) >= 0, f"cluster.{key}", "must be 0 or more")
    _check(c.checkpoints_kept >= 1, "cluster.checkpoints_kept", "must be at least 1")
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
        for problem in tracking_uri_problems(cfg.mlflow.tracking_uri):
            _check(False, "mlflow.tracking_uri", problem)


# pyarrow's filesystems, as Ray Train reads its storage_path.
_STORAGE_URI = re.compile(r"^(s3|gs|gcs|hdfs|viewfs|abfs|abfss|file)://\S+$")
_RAY_ADDRESS = re.compile(r"^(auto|local|(ray://)?([\w.-]+|\[[0-9a-fA-F:]+\]):\d{1,5})$")
# Schemes MLflow's tracking stores understand ("+driver" allowed on the database ones).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")

def tracking_uri_problems(uri: str) -> list[str]:
    """What is wrong with a tracking URI as written (empty: nothing): a known scheme, a sqlite
    store that names a file. Whether its store can be used is asked where a job starts
    (jobs.environment)."""
    scheme = uri_scheme(uri)
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
        return [f"{uri!r}: unknown scheme {scheme!r}; use one of {', '.join(s + ':' for s in TRACKING_SCHEMES)} "
                "(e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)"]
    if not uri.strip():
        return ["give a tracking URI, e.g. sqlite:///mlflow.db, or null for ./mlflow.db"]
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri in ("sqlite:///", "sqlite:///:memory:")):
        return [f"{uri!r}: name a database file, sqlite:///relative/path.db or sqlite:////absolute/path.db"]
    return []


def uri_scheme(uri: str) -> str:
    """The scheme of a URI in lower case ("" for a plain path)."""
    return uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", uri) else ""

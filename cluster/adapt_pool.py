"""A Ray pool of adapter actors that labels every test sentence of all targets at once.

Work units are batches of sentences of one language; units of all languages are interleaved so
that every language progresses together. Each finished unit is written to disk at once (atomic
file), so an evaluation started again with the same inputs skips it. An actor that dies is
restarted by Ray (loading the checkpoint again) and its unit retried.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import ray
from tqdm.auto import tqdm

from trainer.data.corpus import content_key
from trainer.utils.digest import file_sha256, files_sha256
from trainer.utils.paths import make_output_dir, write_atomic

from .storage import pack, unpack

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    id: str
    lang: str
    indices: tuple[int, ...]  # positions in the language's test set
    items: tuple  # trainer.training.adapt.AdaptItem, ids = indices


def make_units(targets: dict[str, Sequence], supports: dict[str, Sequence[Sequence]], unit_size: int) -> list[Unit]:
    """Units of `unit_size` sentences per language, interleaved round-robin across languages."""
    # torch and the model code: in the actors, not the driver's import (see ShippedAdapter).
    from trainer.training.adapt import AdaptItem

    per_lang: list[list[Unit]] = []
    for lang, sentences in targets.items():
        if len(supports[lang]) != len(sentences):
            raise ValueError(f"{lang}: {len(sentences)} sentences but {len(supports[lang])} support sets")
        units = []
        for start in range(0, len(sentences), unit_size):
            idx = tuple(range(start, min(start + unit_size, len(sentences))))
            items = tuple(AdaptItem(i, sentences[i], tuple(supports[lang][i])) for i in idx)
            units.append(Unit(f"{lang}-{start // unit_size:06d}", lang, idx, items))
        per_lang.append(units)
    out = []
    for row in range(max((len(u) for u in per_lang), default=0)):
        out.extend(units[row] for units in per_lang if row < len(units))
    return out


# Files of a checkpoint besides the weights that change its predictions.
_CHECKPOINT_FILES = ("labels.json", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json", "sentencepiece.bpe.model", "metaner.json")


def inputs_key(checkpoint: str, cfg, units: Sequence[Unit]) -> str:
    """Hash of everything a unit's result depends on: weights, labels and tokenizer, adaptation
    settings, sentences (and which are read unspaced). Units are stored under it, so other inputs
    never reuse a unit."""
    h = hashlib.sha256()
    weights = Path(checkpoint) / "model.safetensors"
    h.update(file_sha256(weights).encode() if weights.is_file() else str(checkpoint).encode())
    h.update(files_sha256(p for p in (Path(checkpoint) / n for n in _CHECKPOINT_FILES) if p.is_file()).encode())
    h.update(json.dumps({"adapt": vars(cfg.adapt), "max_length": cfg.model.max_length,
                         "window_context": cfg.model.window_context}, sort_keys=True).encode())
    for unit in units:
        h.update(unit.id.encode())
        for item in unit.items:
            h.update(repr((content_key(item.sentence), [content_key(s) for s in item.support])).encode())
    return h.hexdigest()[:16]


class UnitStore:
    """Finished units on disk, one JSON file each, written atomically."""

    def __init__(self, folder: str | os.PathLike):
        # A unit is done once its .json exists: it is renamed into place whole, so a kill while
        # writing leaves only a .json.tmp, which done() does not match.
        self.folder = make_output_dir(folder, "adapter work folder (--out)")

    def _path(self, unit_id: str) -> Path:
        return self.folder / f"{unit_id}.json"

    def done(self) -> set[str]:
        return {p.stem for p in self.folder.glob("*.json")}

    def save(self, unit_id: str, tags: dict[int, list[str]]) -> None:
        write_atomic(self._path(unit_id), json.dumps({str(k): v for k, v in tags.items()}))

    def load(self, unit_id: str) -> dict[int, list[str]]:
        return {int(k): v for k, v in json.loads(self._path(unit_id).read_text(encoding="utf-8")).items()}


class ShippedAdapter:
    """A `trainer.training.adapt.Adapter` whose checkpoint reaches it through Ray's object store
    (`storage.pack`): the actor may run on a node that does not see the driver's disk. Unpacked
    into a folder of the actor's own, removed when the actor ends or loads another checkpoint."""

    def __init__(self, files: dict | str, featurizer, cfg, device: str = "cpu", prefix_dir=None):
        """`files`: storage.pack's dict, or the name of the `CheckpointHolder` actor that keeps one
        and the settings to adapt with (which then replace `cfg`)."""
        self._holder, self._featurizer, self._device, self._prefix_dir = None, featurizer, device, prefix_dir
        self._folder = None
        if isinstance(files, str):
            self._holder = files
            files, cfg = self._held()
        self._load(files, cfg)

    def _held(self) -> tuple[dict, object]:
        holder = ray.get_actor(self._holder, namespace=HOLDERS)
        refs, cfg = ray.get(holder.get.remote())
        return ray.get(refs[0]), cfg

    def _load(self, files: dict, cfg) -> None:
        from trainer.training.adapt import Adapter  # torch and the model code: in the actor, not the driver's import

        folder = tempfile.TemporaryDirectory(prefix="metaner-checkpoint-")
        adapter = Adapter(unpack(files, folder.name), self._featurizer, cfg, self._device, self._prefix_dir)
        if self._folder is not None:
            self._folder.cleanup()
        self._folder, self.adapter = folder, adapter

    def reload(self) -> None:
        """Load the checkpoint and settings that the holder keeps now."""
        self._load(*self._held())

    def run(self, *args, **kwargs):
        return self.adapter.run(*args, **kwargs)


HOLDERS = "metaner-checkpoints"  # Ray namespace of the holders' names


class CheckpointHolder:
    """The ObjectRef of a packed checkpoint and the settings to adapt with, for the adapter actors
    to ask at each (re)start and reload."""

    def __init__(self, files: list, cfg):
        self.set(files, cfg)

    def set(self, files: list, cfg) -> None:
        self._files, self._cfg = files, cfg  # [ObjectRef]: in a list, Ray hands the reference over, not the value

    def get(self) -> tuple[list, object]:
        return self._files, self._cfg


def pool_shape(cfg) -> tuple:
    """What a pool's actors are made with, which loading another checkpoint cannot change: their
    number, their resources and the frozen-bottom store."""
    c = cfg.cluster
    return c.num_adapter_actors, c.cpus_per_actor, c.gpus_per_actor, cfg.model.prefix_cache_dir


class AdapterPool:
    """`num_adapter_actors` Adapter actors, each loading the checkpoint once (put in Ray's object
    store once by this process, whichever nodes the actors run on); `load` moves them to another."""

    def __init__(self, checkpoint: str, cfg, max_restarts: Optional[int] = None):
        c = cfg.cluster
        max_restarts = c.actor_max_restarts if max_restarts is None else max_restarts
        threads = max(1, int(c.cpus_per_actor))
        remote = ray.remote(ShippedAdapter).options(
            num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor, max_restarts=max_restarts,
            max_task_retries=max_restarts,
            # Fractional-CPU actors would otherwise each start one torch thread per core.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}})
        device = "cuda" if c.gpus_per_actor > 0 else "cpu"
        # Absolute here: actors may run in another working directory (a Ray job's, a node's).
        prefix_dir = os.path.abspath(cfg.model.prefix_cache_dir) if cfg.model.prefix_cache_dir else None
        # Held for the pool's life: a restarted actor is built again from what the holder keeps.
        # Ray logs an error on the console for a restartable actor whose constructor takes any
        # reference, an object's or an actor's, even nested in a list (ray-project/ray#53727: the
        # object may be gone at a restart), which this one, held here, never is: the actors are
        # given the name of a holder, not restarted, and ask it for the reference.
        self.shape = pool_shape(cfg)
        self.files = ray.put(pack(checkpoint))
        name = f"checkpoint-{uuid.uuid4().hex}"
        holder = ray.remote(CheckpointHolder).options(name=name, namespace=HOLDERS, num_cpus=0)
        self.holder = holder.remote([self.files], cfg)
        self.actors = [remote.remote(name, None, None, device, prefix_dir) for _ in range(c.num_adapter_actors)]

    def load(self, checkpoint: str, cfg) -> None:
        """Every actor loads `checkpoint`, to adapt with `cfg` (of the same `pool_shape`): no new
        process, no import again."""
        self.files = ray.put(pack(checkpoint))  # the old files leave the store once no actor holds them
        ray.get(self.holder.set.remote([self.files], cfg))
        ray.get([actor.reload.remote() for actor in self.actors])

    def pids(self) -> list[int]:
        return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in self.actors])

    def run(self, units: Sequence[Unit], store: UnitStore, progress: bool = True) -> None:
        """Run every unit not yet in `store`, at most two in flight per actor.

        Why not ray.util.ActorPool: each result must be saved the moment it arrives (resume loses
        nothing), and ActorPool's map yields results in submission order, or unordered without
        saying which unit a result belongs to; its submit/get_next_unordered pair would need the
        same bookkeeping of which unit is where as this loop, one call at a time.
        """
        done = store.done()
        todo = [u for u in units if u.id not in done]
        counts = Counter()
        bar = tqdm(total=sum(len(u.indices) for u in units), desc="adapt", unit="sent", disable=not progress)
        for u in units:
            if u.id in done:
                counts[u.lang] += len(u.indices)
                bar.update(len(u.indices))
        if done:
            logger.info("resuming: %d of %d units already done", len(units) - len(todo), len(units))
        in_flight: dict[Any, tuple[Unit, Any]] = {}
        queue = deque(todo)
        # Slots in actor order, a round at a time: the first units go one to each actor. (Taken
        # from the end of [a1, a1, a2, a2], both first units went to a2 and, with two units in
        # all, the second actor idled: a pool of 2 ran at the speed of 1.)
        free = deque(a for _ in range(2) for a in self.actors)
        while queue or in_flight:
            while queue and free:
                actor, unit = free.popleft(), queue.popleft()
                in_flight[actor.run.remote(list(unit.items))] = (unit, actor)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            unit, actor = in_flight.pop(ready[0])
            store.save(unit.id, ray.get(ready[0]))
            free.append(actor)
            counts[unit.lang] += len(unit.indices)
            bar.update(len(unit.indices))
            bar.set_postfix({k: counts[k] for k in sorted(counts)})
        bar.close()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        ray.kill(self.holder)


class ReusedPool:
    """One AdapterPool for a job's successive evaluations: started at the first, moved to each next
    checkpoint instead of new actors that each import torch and transformers again; a new pool
    when the actors' shape changes. close() shuts it down, as a job does before training, which
    needs the CPUs and GPUs the actors hold."""

    def __init__(self):
        self.pool: AdapterPool | None = None

    def get(self, checkpoint: str, cfg) -> AdapterPool:
        if self.pool is not None and self.pool.shape != pool_shape(cfg):
            self.close()
        if self.pool is None:
            self.pool = AdapterPool(checkpoint, cfg)
        else:  # even the folder it holds: it may have been written again since
            self.pool.load(checkpoint, cfg)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self) -> "ReusedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collect(units: Sequence[Unit], store: UnitStore, sizes: dict[str, int]) -> dict[str, list[list[str]]]:
    """Predictions per language in the original sentence order; every sentence exactly once."""
    out: dict[str, list] = {lang: [None] * n for lang, n in sizes.items()}
    for unit in units:
        tags = store.load(unit.id)
        if sorted(tags) != sorted(unit.indices):
            raise RuntimeError(f"unit {unit.id} returned sentences {sorted(tags)[:5]}... not {list(unit.indices)[:5]}...")
        for i, t in tags.items():
            if out[unit.lang][i] is not None:
                raise RuntimeError(f"{unit.lang} sentence {i} was returned twice")
            out[unit.lang][i] = t
    for lang, preds in out.items():
        missing = [i for i, p in enumerate(preds) if p is None]
        if missing:
            raise RuntimeError(f"{lang}: {len(missing)} sentences were never returned (first {missing[:5]})")
    return out


def adapt_targets(checkpoint: str, cfg, targets: dict[str, Sequence], supports: dict[str, Sequence[Sequence]],
                  work_dir: str | os.PathLike, progress: bool = True,
                  pool: AdapterPool | ReusedPool | None = None) -> dict[str, list[list[str]]]:
    """Predicted tags of every target sentence, through the pool, resumable from `work_dir`.

    `pool`: an AdapterPool holding `checkpoint`, a ReusedPool to take one from, or None for a
    pool of this call's own."""
    units = make_units(targets, supports, cfg.cluster.adapt_unit_size)
    store = UnitStore(Path(work_dir) / inputs_key(checkpoint, cfg, units))
    if {u.id for u in units} - store.done():
        own = pool is None
        if isinstance(pool, ReusedPool):
            pool = pool.get(checkpoint, cfg)
        pool = pool or AdapterPool(checkpoint, cfg)
        try:
            pool.run(units, store, progress)
        finally:
            if own:
                pool.shutdown()
    else:
        logger.info("every unit is already done in %s", store.folder)
    return collect(units, store, {lang: len(s) for lang, s in targets.items()})

"""Tag a stream of sentences on Ray: embedding actors, FAISS index shards and adapter actors, alive
together, with a bounded window of shards in flight.

A shard (tag.shard_size consecutive sentences) is cut into units (cluster.adapt_unit_size). Each
unit is embedded on an embedding actor; the vectors go from that actor to every index shard
through the object store, never through the driver; the driver merges the shards' top-k into
support ids, and the unit goes to an adapter actor with its support sentences. When every unit of
a shard is back, the shard is handed to `write` and dropped. At most tag.shards_in_flight shards
are open, so memory does not grow with the input.

Why by hand rather than Ray Data: each unit must visit every index shard and have the results
merged (a fan-out and join that a chain of map_batches does not express without calling actors
from inside a UDF), and resume works per shard, written whole once every one of its sentences is
back, which needs the driver to see shard boundaries that Ray Data's blocks do not keep. The loop
below is a plain ray.wait over the refs in flight; ray.util.ActorPool would submit all values
up front (unbounded) and has no way to resubmit a unit whose actor died for good.

An adapter actor that dies is restarted by Ray, which runs its unit again
(max_restarts/max_task_retries); a unit whose actor cannot be restarted is sent to another. The
driver takes exactly one result per unit, so no sentence is lost or written twice.

Measured (benchmarks/tag.py, 2 CPUs, the demo's checkpoint): peak RSS of all processes within 1 %
from 10,000 to 100,000 sentences; two adapter actors 1.85x one, bounded by the CPU the embedding
actor, the index and this driver take per sentence (about 0.5 ms beside 3.4 ms of adaptation).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import ray

from cluster.adapt_pool import AdapterPool
from cluster.retrieval import ShardedEmbedder, ShardedIndexSpec
from cluster.runtime import wait_placed
from retrieval.tasks import embed_cached, merged_target_support, target_fetch
from trainer.utils.errors import ConfigError

logger = logging.getLogger(__name__)

# An adapter unit whose actor died for good is sent to another actor at most this many times.
MAX_ATTEMPTS = 3
# Units kept queued at each adapter actor: one computing, one arriving.
IN_FLIGHT_PER_ACTOR = 2


@dataclass
class Shard:
    number: int
    first: int  # position of its first sentence in the input
    sentences: list  # trainer.data.corpus.Sentence
    wheres: list  # file:line of each sentence
    tags: list = field(default_factory=list)
    soft: Optional[list] = None  # trainer.data.features.Soft per sentence, when the stream keeps them
    left: int = 0  # units not back yet


@dataclass
class _Unit:
    shard: Shard
    start: int
    stop: int
    waiting: int = 0  # index shards not answered yet
    results: list = field(default_factory=list)
    support: Optional[np.ndarray] = None
    attempts: int = 0


@dataclass
class _Flight:
    """What one `TagStream.run` has in flight."""

    shards: Iterator
    free: deque  # adapter slots: each actor IN_FLIGHT_PER_ACTOR times, a round at a time
    open: dict = field(default_factory=dict)  # shard number -> Shard not yet written
    searching: dict = field(default_factory=dict)  # ref of one index shard's answer -> (unit, shard number)
    adapting: dict = field(default_factory=dict)  # ref of an adapter's answer -> (unit, actor)
    ready: deque = field(default_factory=deque)  # units with their support ids, waiting for a slot
    embed_turn: int = 0
    exhausted: bool = False


class TagStream:
    """The actors of one tagging run; `run` streams shards through them, `close` ends them."""

    def __init__(self, checkpoint: str, encoder: str, cfg, source: Sequence, cache=None, soft: bool = False):
        """`soft`: each shard keeps the model's probabilities beside its tags (`Shard.soft`)."""
        r, timeout = cfg.retrieval, cfg.tag.start_timeout_s
        self.cfg, self.source, self.soft = cfg, list(source), soft
        self.fetch = target_fetch(r.k, r.drop_top1_for_targets)
        if self.fetch > len(self.source):
            raise ConfigError(f"retrieval.k={r.k}{' + 1 dropped' if r.drop_top1_for_targets else ''} support sentences "
                              f"asked of an English source of {len(self.source)} sentences; lower retrieval.k")
        self.embedder = self.index = self.pool = None
        try:
            # Adapter actors load their checkpoint while retrieval starts (they are placed at once:
            # check_resources has seen that everything fits together).
            self.pool = AdapterPool(checkpoint, cfg, max_restarts=MAX_ATTEMPTS)
            self.embedder = ShardedEmbedder.from_config(cfg, encoder, max_restarts=MAX_ATTEMPTS, start_timeout_s=timeout)
            # The English side once per (encoder, source): kept in the retrieval cache.
            xb, _ = embed_cached(self.source, self.embedder, cache)
            self.index = ShardedIndexSpec.from_config(cfg).build(xb, max_restarts=MAX_ATTEMPTS, start_timeout_s=timeout)
            wait_placed(self.pool.actors, timeout, "adapter actors")
        except BaseException:
            self.close()
            raise

    def run(self, shards: Iterable[tuple[int, int, list]], write: Callable[[Shard], None],
            progress: Optional[Callable[[int], None]] = None) -> None:
        """Tag every shard of `shards` ((number, first, [(sentence, where), ...]) in input order) and
        hand each, complete, to `write`; `progress(n)` after each unit of n sentences."""
        f = _Flight(iter(shards), deque(a for _ in range(IN_FLIGHT_PER_ACTOR) for a in self.pool.actors))
        while True:
            while not f.exhausted and len(f.open) < self.cfg.tag.shards_in_flight:
                self._open_next(f)
            while f.ready and f.free:
                unit, actor = f.ready.popleft(), f.free.popleft()
                f.adapting[actor.run.remote(self._items(unit), soft=self.soft)] = (unit, actor)
            if not f.searching and not f.adapting:
                if f.ready:
                    raise RuntimeError("every adapter actor died for good; the shards written so far are kept: run "
                                       "the same command again to continue")
                return  # every shard is written
            ref = ray.wait(list(f.searching) + list(f.adapting), num_returns=1)[0][0]
            if ref in f.searching:
                self._searched(f.searching.pop(ref), ref, f.ready)
                continue
            unit, actor = f.adapting.pop(ref)
            tags = self._adapted(unit, ref, f.ready)
            if tags is None:
                continue  # its actor is gone: its slots are not given back
            f.free.append(actor)
            for i, t in tags.items():
                if self.soft:
                    t, unit.shard.soft[i] = t
                unit.shard.tags[i] = t
            unit.shard.left -= 1
            if progress:
                progress(unit.stop - unit.start)
            if unit.shard.left == 0:
                write(f.open.pop(unit.shard.number))

    def _open_next(self, f: "_Flight") -> None:
        """Read the next shard and send its units to retrieval; mark the input exhausted at its end."""
        nxt = next(f.shards, None)
        if nxt is None:
            f.exhausted = True
            return
        number, first, items = nxt
        sentences = [s for s, _ in items]
        shard = Shard(number, first, sentences, [w for _, w in items], [None] * len(sentences),
                      [None] * len(sentences) if self.soft else None)
        f.open[number] = shard
        f.embed_turn = self._retrieve(shard, f.searching, f.embed_turn)

    def _retrieve(self, shard: Shard, searching: dict, turn: int) -> int:
        """Send each unit of `shard` to an embedding actor and its vectors to every index shard."""
        size = self.cfg.cluster.adapt_unit_size
        actors = self.embedder.actors
        for start in range(0, len(shard.sentences), size):
            unit = _Unit(shard, start, min(start + size, len(shard.sentences)), waiting=len(self.index.shards))
            unit.results = [None] * unit.waiting
            vectors = actors[turn % len(actors)].embed.remote(shard.sentences[unit.start:unit.stop])
            turn += 1
            for j, index_shard in enumerate(self.index.shards):
                searching[index_shard.search.remote(vectors, self.fetch)] = (unit, j)
            shard.left += 1
        return turn

    def _searched(self, entry: tuple[_Unit, int], ref, ready_units: deque) -> None:
        unit, j = entry
        unit.results[j] = ray.get(ref)
        unit.waiting -= 1
        if unit.waiting == 0:
            r = self.cfg.retrieval
            unit.support = merged_target_support(unit.results, r.k, r.drop_top1_for_targets)
            unit.results = []
            ready_units.append(unit)

    def _items(self, unit: _Unit) -> list:
        # torch and the model code stay in the adapter actors (cluster.adapt_pool.ShippedAdapter).
        from trainer.training.adapt import AdaptItem

        sentences = unit.shard.sentences
        return [AdaptItem(i, sentences[i], tuple(self.source[j] for j in unit.support[i - unit.start]))
                for i in range(unit.start, unit.stop)]

    def _adapted(self, unit: _Unit, ref, ready_units: deque) -> Optional[dict]:
        """The unit's tags; None when its actor died for good and the unit was queued again."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            unit.attempts += 1
            if unit.attempts >= MAX_ATTEMPTS:
                raise RuntimeError(f"sentences {unit.shard.first + unit.start}..{unit.shard.first + unit.stop - 1} "
                                   f"failed on {unit.attempts} adapter actors ({err}); the shards written so far are "
                                   "kept: run the same command again to continue") from None
            logger.warning("an adapter actor died for good; sending its %d sentences to another",
                           unit.stop - unit.start)
            ready_units.appendleft(unit)
            return None

    def close(self) -> None:
        for part in (self.pool and self.pool.shutdown, self.index and self.index.close,
                     self.embedder and self.embedder.close):
            if part:
                part()
        self.embedder = self.index = self.pool = None

    def __enter__(self) -> "TagStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

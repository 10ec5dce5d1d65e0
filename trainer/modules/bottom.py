"""The frozen bottom (embeddings and frozen layers) of each window, computed once and kept.

Nothing below the first trainable layer changes during meta-training or adaptation, so its hidden
states depend only on a window's input ids. `FrozenBottom` computes them once per distinct window
(in eval mode: no dropout in frozen layers), keeps them on the model's device, and hands stacked,
padded states to the trainable top. Meta-training, English-dev selection and test-time
adaptation all read them through this one class; `BottomStore` keeps them on disk so that every
checkpoint with the same frozen weights (every row and seed of a job) skips the work. Why by
hand: nothing in torch or transformers caches intermediate activations across calls and runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from trainer.config import EVAL_BATCH_SIZE
from trainer.data.features import FEATURES_VERSION, IGNORE, Featurizer, Window
from trainer.modules.model import NerModel, evaluating
from trainer.utils.digest import text_sha256
from trainer.utils.distributed import barrier
from trainer.utils.errors import ConfigError
from trainer.utils.paths import atomic_file

logger = logging.getLogger(__name__)

States = dict  # window input ids (tuple) -> hidden states [len, hidden]
# A batch of windows may hold at most this many positions per position of its windows (padding).
PAD_SLACK = 1.25
# A kept state costs its floats plus a small tensor header and dict entry.
_ENTRY_OVERHEAD = 400


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where new states would go (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class FrozenBottom:
    """Hidden states after the frozen bottom, once per distinct window (see module doc).

    `num_layers` is 0 when the model has no frozen prefix (trainable embeddings): then there is
    nothing to keep and callers run the whole model.
    """

    def __init__(self, model: NerModel, featurizer: Featurizer, states: Optional[States] = None,
                 batch_size: int = EVAL_BATCH_SIZE):
        self.model, self.featurizer, self.batch_size = model, featurizer, batch_size
        self.num_layers = model.num_frozen_prefix()
        self.states: States = {} if states is None else states
        self.hidden_size = model.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What states are computed and kept in (the model's train.precision)."""
        return self.model.compute_dtype

    @property
    def top_dtype(self) -> torch.dtype:
        """What states are handed to the trainable top in: the weights' dtype. Under bf16 autocast
        the residual stream between layers is fp32 anyway (LayerNorm runs in fp32), and torch's
        vmap of LayerNorm's backward fails on a bf16 residual input (torch 2.13)."""
        return next(self.model.parameters()).dtype

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """States [N, T, H] of a collated batch, not kept (e.g. masked queries, which change per epoch)."""
        device = self.device
        with torch.no_grad(), evaluating(self.model):
            mask4d = self.model.attention_mask_4d(attention_mask.to(device))
            return self.model.prefix(input_ids.to(device), mask4d, self.num_layers)  # in self.dtype

    def batches(self, rows: Sequence[tuple[int, ...]]) -> Iterator[list[Window]]:
        """Windows of the distinct `rows` (input ids) in a fixed order (length, then ids), cut into
        batches of at most `batch_size` whose padding stays under PAD_SLACK of their positions.

        A batch is padded to its longest window: a fixed count of rows of mixed lengths (the masked
        queries of a meta-batch, the supports of a few target sentences) measured about twice the
        positions of its windows on e5-small. The order and the cuts depend on the rows alone, so
        the same windows are always computed in the same batches (a state depends on its batch's
        padded width at the last bits, and a resumed run must see the states the first one saw)."""
        batch: list[Window] = []
        tokens = 0
        for ids in sorted(set(rows), key=lambda ids: (len(ids), ids)):
            padded = (len(batch) + 1) * len(ids)  # rows ascend in length: the new one sets the width
            if batch and (len(batch) == self.batch_size or padded > PAD_SLACK * (tokens + len(ids))):
                yield batch
                batch, tokens = [], 0
            batch.append(Window(0, ids, (IGNORE,) * len(ids), ()))
            tokens += len(ids)
        if batch:
            yield batch

    def compute_windows(self, rows: Sequence[tuple[int, ...]]) -> dict:
        """States of windows given by their ids, in batches of similar length, not kept."""
        out = {}
        for part in self.batches(rows):
            batch = self.featurizer.collate(part)
            hidden = self.compute(batch["input_ids"], batch["attention_mask"])
            for r, w in enumerate(part):
                out[w.input_ids] = hidden[r, : len(w)]
        return out

    def fill(self, windows: Sequence[Window], progress: bool = False) -> int:
        """Compute and keep the states of the windows not kept yet; returns how many were added."""
        if not self.num_layers:
            return 0
        missing = {w.input_ids for w in windows if w.input_ids not in self.states}
        if not missing:
            return 0
        self._check_room(missing)
        bar = None
        if progress:
            bar = tqdm(total=len(missing), desc="frozen bottom", unit="window")
        for part in self.batches(missing):
            batch = self.featurizer.collate(part)
            hidden = self.compute(batch["input_ids"], batch["attention_mask"])
            for row, w in enumerate(part):
                self.states[w.input_ids] = hidden[row, : len(w)].clone()
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return len(missing)

    def _check_room(self, missing: Collection[tuple]) -> None:
        need = (sum(len(ids) for ids in missing) * self.hidden_size * self.dtype.itemsize
                + len(missing) * _ENTRY_OVERHEAD)
        free = available_bytes(self.device)
        logger.info("frozen bottom: %d new windows, %.1f MiB (%d kept, %.1f MiB)", len(missing), need / 2 ** 20,
                    len(self.states), self.nbytes() / 2 ** 20)
        if free is not None and need > 0.9 * free:
            raise ConfigError(f"the frozen-bottom states of {len(missing)} windows need {need / 2 ** 30:.2f} GiB but "
                              f"only {free / 2 ** 30:.2f} GiB is free on {self.device}; freeze fewer layers "
                              "(model.num_frozen_layers), use fewer source sentences, or run on a larger machine")

    def gather(self, windows: Sequence[Window], width: int) -> torch.Tensor:
        """States [N, width, H] of kept windows, zeros where padded (`fill` them first)."""
        out = torch.zeros(len(windows), width, self.hidden_size, device=self.device, dtype=self.top_dtype)
        for row, w in enumerate(windows):
            out[row, : len(w)] = self.states[w.input_ids]
        return out

    def stack(self, groups: Sequence[Sequence[Window]], width: int) -> Optional[torch.Tensor]:
        """States [B, W, width, H] of groups of windows (W the largest group), computing what is missing.

        Padded positions are masked as keys and carry no label, so their values never reach an output.
        """
        if not self.num_layers:
            return None
        self.fill([w for g in groups for w in g])
        count = max(len(g) for g in groups)
        out = torch.zeros(len(groups), count, width, self.hidden_size, device=self.device, dtype=self.top_dtype)
        for b, group in enumerate(groups):
            for i, w in enumerate(group):
                out[b, i, : len(w)] = self.states[w.input_ids]
        return out


class BottomStore:
    """Kept states on disk, one file per named set of windows, written atomically.

    Files sit under a key of everything they depend on: the frozen parameters themselves (so a
    checkpoint whose bottom differs never reads them), how many layers are frozen, and how
    sentences are cut into windows.
    """

    def __init__(self, folder: Union[str, os.PathLike], model: NerModel, featurizer: Featurizer):
        self.num_layers = model.num_frozen_prefix()
        key = (self.num_layers, featurizer.max_length, featurizer.context, type(model.encoder).__name__,
               FEATURES_VERSION)
        if model.precision != "fp32":  # states computed in bf16 differ; fp32 files keep their old key
            key += (model.precision,)
        h = hashlib.sha256(repr(key).encode())
        if self.num_layers:
            frozen = [model.encoder.embeddings, *list(model.encoder.encoder.layer[:self.num_layers])]
            for module in frozen:
                for name, t in sorted(module.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        self.folder = Path(folder) / h.hexdigest()[:16]

    def path(self, content: str) -> Path:
        return self.folder / f"{text_sha256(content, 24)}.pt"

    def load(self, content: str, device: Union[str, torch.device] = "cpu") -> States:
        """The states saved under `content` (a description of the windows), or {}."""
        path = self.path(content)
        if not self.num_layers or not path.is_file():
            return {}
        try:
            # Memory-mapped: processes that read the same file share its pages.
            states = torch.load(path, weights_only=True, mmap=True)
        except Exception as err:  # a damaged file only costs recomputing it
            logger.warning("ignoring unreadable frozen-bottom file %s (%s)", path, err)
            return {}
        if torch.device(device).type != "cpu":
            states = {k: v.to(device) for k, v in states.items()}
        return states

    def save(self, content: str, states: States) -> Path:
        path = self.path(content)
        with atomic_file(path, "wb") as fh:
            torch.save({k: v.cpu() for k, v in states.items()}, fh)
        return path


def keep_source(bottom: FrozenBottom, folder: Union[str, os.PathLike], windows: Sequence[Window], rank: int = 0,
                world_size: int = 1) -> None:
    """Fill `bottom` with the states of the source `windows` (in `Featurizer.encode` order), read
    from `folder` or computed and saved there for every later run with the same frozen weights
    (meta-training and fine-tuning share them). With several ranks each computes a share and rank
    0 merges them (call on every rank)."""
    store = BottomStore(folder, bottom.model, bottom.featurizer)
    content = "source:" + text_sha256(repr([w.input_ids for w in windows]))
    states = store.load(content, bottom.device)
    if not states:
        mine = windows[rank::world_size]
        bottom.fill(mine, progress=rank == 0)
        part = {w.input_ids: bottom.states[w.input_ids] for w in mine}
        if world_size > 1:
            store.save(f"{content}:part{rank}of{world_size}", part)
        barrier()
        if rank == 0:
            for other in range(1, world_size):
                part.update(store.load(f"{content}:part{other}of{world_size}"))
                store.path(f"{content}:part{other}of{world_size}").unlink(missing_ok=True)
            store.path(f"{content}:part0of{world_size}").unlink(missing_ok=True)
            store.save(content, part)
        barrier()
        states = store.load(content, bottom.device)
    bottom.states.update(states)
    logger.info("frozen bottom of %d source windows: %.1f MiB (%s)", len(states), bottom.nbytes() / 2 ** 20,
                store.path(content))

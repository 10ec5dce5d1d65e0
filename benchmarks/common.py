"""What the adaptation and meta-training benchmarks share: arguments, machine line, models, support
sets by [CLS] cosine, timing and peak-memory readings.

Peak RSS is read from /proc/self/status (VmHWM) and reset between measurements by writing 5 to
/proc/self/clear_refs (Linux >= 4.0), so that several variants can be measured in one process.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks._setup import set_accelerator
from trainer.config import with_overrides

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.environ.get("METANER_DATA", os.path.join(REPO, "..", "shared", "data"))
DEFAULT_MODEL = os.path.join(REPO, "..", "shared", "models", "bert-tiny-6l")
# The engine's reference setting: multilingual-e5-small with 10 of 12 layers frozen, in which its speed
# targets are stated (jobs/configs/replicate_cpu.yaml now freezes 11, to fit its 150-minute budget).
E5 = os.path.join(REPO, "..", "shared", "models", "me5-small-ner")
E5_FROZEN = 10
# The mid-size model, built on the fly: where the cost of copying weights and gradients
# starts to matter next to the forward pass.
MID_LAYERS, MID_HIDDEN, MID_HEADS = 4, 256, 4


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=DEFAULT_DATA, help="data root (default: $METANER_DATA or ../shared/data)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model of record (default: ../shared/models/bert-tiny-6l)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sentences/steps: under 2 minutes on 2 cores")
    parser.add_argument("--limit", type=int, default=0, help="cap on sentences / tasks (smoke runs)")
    parser.add_argument("--no-mid", action="store_true", help="skip the mid-size model")
    parser.add_argument("--e5", default=E5, help="the replication setting's encoder (default: ../shared/models/me5-small-ner)")
    parser.add_argument("--no-e5", action="store_true", help="skip the replication setting")
    return parser


def check_args(args) -> None:
    if not os.path.isdir(os.path.join(args.data, "meta-cross")):
        raise SystemExit(f"no corpora under {args.data}/meta-cross: pass --data or set METANER_DATA")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"{args.model} is not a model folder (no config.json): pass --model")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    set_accelerator(args.device)
    if args.limit < 0:
        raise SystemExit("--limit must be 0 (no cap) or positive")


def quiet() -> None:
    """No progress bars or per-call warnings from transformers in the benchmark's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine cpu={cpu!r} cores={os.cpu_count()} gpu={gpu!r} device={device} torch={torch.__version__} "
            f"torch_threads={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
            f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


# ------------------------------------------------------------------------------ models


@dataclass
class Bundle:
    name: str
    path: str
    cfg: object  # trainer.config.Config
    tokenizer: object
    featurizer: object  # trainer.data.features.Featurizer

    def fresh_model(self, device: str, seed: int = 0):
        """A new NerModel with the same weights every call (the head is seeded)."""
        from trainer.modules.model import build_model

        return build_model(self.cfg, seed=seed).to(device)

    def trainable_count(self) -> int:
        from trainer.modules.model import trainable_parameters

        return sum(p.numel() for _, p in trainable_parameters(self.fresh_model("cpu")))


def bundle(name: str, path: str, num_frozen_layers: Optional[int] = None) -> Bundle:
    from trainer.config import Config
    from trainer.data.corpus import LABELS
    from trainer.data.features import Featurizer
    from trainer.modules.model import load_tokenizer

    cfg = Config()
    cfg = with_overrides(cfg, [("model.name_or_path", path)])
    if num_frozen_layers is not None:
        cfg = with_overrides(cfg, [("model.num_frozen_layers", num_frozen_layers)])
    tokenizer = load_tokenizer(path)
    featurizer = Featurizer(tokenizer, cfg.model.max_length, cfg.model.window_context, LABELS)
    return Bundle(name, path, cfg, tokenizer, featurizer)


def mid_bundle(texts: Sequence[Sequence[str]], workdir: str) -> Bundle:
    """A mid-size random BERT with its own vocabulary of `texts`; its top two layers train, as the
    paper's freezing leaves them on the model of record."""
    from jobs.tiny import build_tiny_bert

    path = build_tiny_bert(os.path.join(workdir, "mid"), texts, num_layers=MID_LAYERS, hidden=MID_HIDDEN,
                           heads=MID_HEADS, vocab_size=3000, seed=0)
    return bundle(f"mid{MID_LAYERS}l{MID_HIDDEN}", path, num_frozen_layers=MID_LAYERS - 2)


def models(args, texts: Sequence[Sequence[str]], workdir: str) -> list[Bundle]:
    """The model of record, then the mid-size model unless --no-mid."""
    return [bundle("tiny6l", args.model)] + ([] if args.no_mid else [mid_bundle(texts, workdir)])


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="metaner-bench-")


# ------------------------------------------------------------------------------ data


def read(args, relative: str, limit: int = 0):
    from trainer.data.corpus import read_corpus

    sentences = read_corpus(os.path.join(args.data, relative)).sentences
    return sentences[:limit] if limit else sentences


def cls_embeddings(model, featurizer, sentences, batch_size: int = 64) -> np.ndarray:
    """L2-normalised [CLS] vectors of each sentence's first window, from the encoder in eval mode."""
    import torch

    first = {}
    for w in featurizer.encode(sentences):
        first.setdefault(w.sentence, w)
    ordered = [first[i] for i in range(len(sentences))]
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = featurizer.collate(ordered[start:start + batch_size])
            hidden = model.encoder(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu().numpy())
    vectors = np.concatenate(out)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def top_k(queries: np.ndarray, pool: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Ids of the k most similar pool rows per query (flat cosine; ties broken by the lower id)."""
    scores = queries @ pool.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------ timing and memory


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pid_peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory:
    """Peak RSS (and peak CUDA allocation) of a block of code, relative to where it started.

    Freed heap is handed back to the system first (glibc malloc_trim), so that memory one variant
    freed does not hide the next variant's growth.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            logger.warning("cannot reset the peak RSS: figures include earlier peaks")
        self.start_rss = _status("VmRSS")
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_cuda = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_rss = _status("VmHWM")
        self.rss_growth = max(self.peak_rss - self.start_rss, 0)
        self.cuda_peak = self.cuda_growth = 0
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()
            self.cuda_growth = self.cuda_peak - self.start_cuda


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}MiB"


def print_ratios(ratios: dict[str, float]) -> None:
    for name, value in ratios.items():
        print(f"ratio {name} {value:.3f}", flush=True)


def main(run: Callable, parse_args: Callable, argv=None) -> int:
    """A benchmark script's entry point: run it and print its `ratio` lines."""
    logging.basicConfig(level=logging.WARNING)
    print_ratios(run(parse_args(argv)))
    return 0

"""GPU readiness: one command that runs what a GPU changes, end to end, on one GPU, in under 10 minutes.

    python benchmarks/gpu_check.py [--cpu-only] [--quick] [--only NAME ...] [--keep DIR] [--budget-s S]

Prints one `PASS <name> <detail>` or `FAIL <name> <detail>` line per check and exits 1 if any failed.
With a CUDA device (the GPU checks):
- `meta-step`: one meta-gradient of a tiny BERT (2 layers, hidden 64, built on the fly, dropout
  off, train.compile_updates=always) on cuda against the same on the CPU, float32: every tensor
  within a relative L2 error of META_TOL (the masks are drawn on the CPU, so both see the same);
- `meta-step-bf16`: the same meta-gradient on cuda with train.precision=bf16 against fp32: the
  whole gradient within a relative L2 error of BF16_TOL, float32 out, the kept bottom in bf16;
- `faiss-k2`, `faiss-k2040`, `faiss-k2100`: a flat index on the GPU (retrieval.index.IndexShard)
  against numpy brute force over 6,000 unit vectors with a 51-way tie, ids equal up to ties
  within 1e-6; k=2100 is more than FAISS answers on a GPU and must take the CPU fallback;
- `adapt-tags`: test-time adaptation (trainer.training.adapt.adapt_many, one BertAdam step at lr 1e-2) of
  200 synthetic sentences in five languages on cuda against the CPU: the same tags;
- `pytest-gpu`: `python -m pytest -q -m gpu` (tests/test_gpu_readiness.py): all pass, none skipped;
- `demo-zero0`, `demo-zero1`: `python -m jobs.demo` with cluster.use_gpu=true, one NCCL DeepSpeed
  worker, FAISS shards, embedding and adapter actors on a quarter of the GPU each, ZeRO 0 and 1:
  it finishes its results table, and nvidia-smi sees processes on the GPU meanwhile.
Without a CUDA device, or with --cpu-only, the same comparisons on the CPU: the meta-step compiled
against not compiled, bf16 against fp32 on the CPU, FAISS on the CPU, adaptation sequential against batched, the gpu-marked
tests (skipped there), and the demo with cluster.use_gpu=false at a tiny size (`demo-cpu`; left
out by --quick).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._setup import prepare, set_accelerator  # noqa: E402

prepare()  # threads, offline hub and sys.path, before torch is imported

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# float32 meta-gradients of one meta-step, cuda against cpu (or compiled against not), per tensor
# relative L2 error (floored at 1e-3 of the whole gradient's norm): what the order of float32 sums
# changes is ~1e-6; a wrong kernel or a lost term changes far more.
META_TOL = 1e-4
# bf16 keeps 8 bits of mantissa: the tiny model's whole meta-gradient in bf16 is 0.3 % from fp32
# on a CPU (tests/test_precision.py); a lost autocast or a bf16 sum would be far off or not bf16.
BF16_TOL = 0.03
# A run must finish within the 10 minutes a GPU check is given; a demo is stopped at this.
DEMO_TIMEOUT_S = 300
ADAPT_SENTENCES = 200


class CheckFailed(Exception):
    """A check ran and found a difference (its message is the detail line)."""


# ---------------------------------------------------------------------------------- the tiny model


class Tiny:
    """A 2-layer BERT with a WordPiece vocabulary of the synthetic corpora, built once per run."""

    def __init__(self, workdir: Path):
        from jobs.synthetic import TEMPLATES, make_sentences
        from jobs.tiny import build_tiny_bert

        self.corpus = {lang: make_sentences(lang, 60 if lang == "en" else 40, seed=1) for lang in TEMPLATES}
        texts = [s.words for sentences in self.corpus.values() for s in sentences]
        with _stdout_to_stderr():  # the vocabulary trainer's progress would come between the result lines
            self.path = build_tiny_bert(workdir / "tiny-bert", texts, num_layers=2, hidden=64, vocab_size=500,
                                        dropout=0.0)

    def model(self, labels, device: str, frozen: int = 1):
        from torch import nn

        from trainer.modules.model import NerModel, freeze

        model = NerModel.from_pretrained(self.path, labels, dropout=0.0, seed=0)
        freeze(model, frozen)
        for module in model.modules():  # the encoder's own dropouts too: both devices must draw none
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model.to(device)

    def tokenizer(self):
        from trainer.modules.model import load_tokenizer

        return load_tokenizer(self.path)


# ---------------------------------------------------------------------------------- checks


def meta_gradient(tiny: Tiny, device: str, compile_updates: str, precision: str = "fp32"):
    """(names, gradients as float64 on the CPU, totals, compiled, engine) of one meta-step of 8 tasks."""
    import torch

    from trainer.config import load_config
    from trainer.data.features import Featurizer, group_windows, labels_for
    from trainer.data.sampling import Task
    from trainer.modules.bottom import FrozenBottom
    from trainer.training.engine import TaskEngine

    cfg = load_config(None, ["train.schedule_inner_lr=false", "train.warmup_proportion=0.0",
                             "train.num_inner_steps=2", "train.inner_lr=0.001", "train.lambda_max=2.0",
                             "train.mask_ratio=0.5", "train.classifier_lr_scale=3.0",
                             f"train.compile_updates={compile_updates}", f"train.precision={precision}"])
    labels = labels_for(cfg.train.loss_positions)
    model = tiny.model(labels, device).set_precision(precision)
    featurizer = Featurizer(tiny.tokenizer(), max_length=16, context=4, labels=labels)
    source = group_windows(featurizer.encode(tiny.corpus["en"][:16]))
    tasks = [Task((i, (i + 5) % 16), (i + 9) % 16) for i in range(8)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = TaskEngine(model, featurizer, cfg, FrozenBottom(model, featurizer), seed=7, names=names)
    grads, totals = engine.meta_gradient(tasks, source, epoch=3, inner_lr=cfg.train.inner_lr)
    if any(g.dtype != torch.float32 for g in grads):
        raise CheckFailed(f"train.precision={precision}: the meta-gradient is {grads[0].dtype}, not float32")
    return names, [g.detach().double().cpu() for g in grads], totals, engine.compiled, engine


def check_meta_step_bf16(tiny: Tiny, cuda: bool) -> str:
    import torch

    device = "cuda" if cuda else "cpu"
    # On a CPU the comparison is the point, not the compiled update (whose first compile under
    # bf16 takes a minute there).
    compiled = "always" if cuda else "never"
    (_, got, totals, _, engine), t = _timed(meta_gradient, tiny, device, compiled, "bf16")
    (_, ref, ref_totals, _, _), t_ref = _timed(meta_gradient, tiny, device, compiled, "fp32")
    states = {s.dtype for s in engine.bottom.states.values()}
    diff = float(sum(float((a - b).norm()) ** 2 for a, b in zip(got, ref))) ** 0.5
    error = diff / float(sum(float(b.norm()) ** 2 for b in ref)) ** 0.5
    loss_error = abs(totals["meta_loss"] - ref_totals["meta_loss"]) / abs(ref_totals["meta_loss"])
    detail = (f"{device} train.precision=bf16 against fp32: relative L2 error of the meta-gradient {error:.1e}, "
              f"meta-loss {loss_error:.1e}, tolerance {BF16_TOL:g}; kept bottom {sorted(map(str, states))} "
              f"({t:.1f} s and {t_ref:.1f} s)")
    if states != {torch.bfloat16} or not 0 < error <= BF16_TOL or loss_error > BF16_TOL:
        raise CheckFailed(detail)
    return detail


def check_meta_step(tiny: Tiny, cuda: bool) -> str:
    if cuda:
        (names, got, totals, compiled, _), t = _timed(meta_gradient, tiny, "cuda", "always")
        (_, ref, ref_totals, _, _), t_ref = _timed(meta_gradient, tiny, "cpu", "always")
        what = f"cuda against cpu, both compiled={compiled}"
    else:
        (names, got, totals, compiled, _), t = _timed(meta_gradient, tiny, "cpu", "always")
        (_, ref, ref_totals, _, _), t_ref = _timed(meta_gradient, tiny, "cpu", "never")
        what = f"cpu compiled={compiled} against not compiled"
    whole = float(sum(float(b.norm()) ** 2 for b in ref)) ** 0.5
    worst, worst_name = 0.0, ""
    for name, a, b in zip(names, got, ref):
        # Relative to the tensor, floored at 1e-3 of the whole gradient: some tensors' gradients
        # are rounding noise around zero (attention's key biases, which the softmax ignores).
        error = float((a - b).norm()) / (float(b.norm()) + 1e-3 * whole)
        if error > worst:
            worst, worst_name = error, name
    loss_error = abs(totals["meta_loss"] - ref_totals["meta_loss"]) / abs(ref_totals["meta_loss"])
    detail = (f"{what}: max relative L2 error {worst:.1e} ({worst_name}), meta-loss {loss_error:.1e}, tolerance "
              f"{META_TOL:g} ({len(names)} tensors, {int(totals['tasks'])} tasks; {t:.1f} s and {t_ref:.1f} s, first "
              "compiles included)")
    if not compiled:
        raise CheckFailed(f"train.compile_updates=always did not compile: {detail}")
    if worst > META_TOL or loss_error > META_TOL:
        raise CheckFailed(detail)
    return detail


def faiss_vectors():
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(6000, 64)).astype(np.float32)
    xb[100:150] = xb[7]  # a 51-way tie, larger than the search's candidate margin
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.normal(size=(32, 64)).astype(np.float32)
    xq = np.concatenate([xb[:32], xq / np.linalg.norm(xq, axis=1, keepdims=True)])
    return xq, xb


def tie_flips(I, I_ref, xq, xb) -> int:
    """How many ids differ from the reference; raises where two differing ids do not tie within 1e-6."""
    rows, cols = np.nonzero(I != I_ref)
    for r, c in zip(rows, cols):
        exact = xb[[I[r, c], I_ref[r, c]]].astype(np.float64) @ xq[r].astype(np.float64)
        if abs(exact[0] - exact[1]) > 1e-6:
            raise CheckFailed(f"query {r} rank {c}: id {I[r, c]} against brute force's {I_ref[r, c]}, scores "
                              f"{exact[0]:.7f} and {exact[1]:.7f} do not tie")
    return len(rows)


def check_faiss(shard, xq, xb, k: int, cuda: bool) -> str:
    from retrieval.index import brute_force

    before = shard.cpu_searches
    (D, I), t = _timed(shard.search, xq, k)
    fallbacks = shard.cpu_searches - before
    D_ref, I_ref = brute_force(xq, xb, k)
    gap = float(np.abs(D - D_ref).max())
    if gap > 1e-5:
        raise CheckFailed(f"k={k}: scores differ from brute force by up to {gap:.2e} (> 1e-5)")
    flips = tie_flips(I, I_ref, xq, xb)
    where = "GPU" if shard.on_gpu else "CPU"
    detail = (f"{where} flat index, {xb.shape[0]} vectors, {xq.shape[0]} queries, k={k}: ids equal to brute force "
              f"({flips} tie flips), max |dD| {gap:.1e}"
              f"{f'; candidate rounds on its CPU copy: {fallbacks}' if shard.on_gpu else ''} ({t:.2f} s)")
    if cuda and not shard.on_gpu:
        raise CheckFailed(f"the index stayed on the CPU (faiss.get_num_gpus() is 0?): {detail}")
    if cuda and k > 2048 and fallbacks == 0:
        raise CheckFailed(f"k={k} is more than FAISS answers on a GPU but no round searched the CPU copy: {detail}")
    if cuda and k <= 2 and fallbacks:
        raise CheckFailed(f"k={k} searched the CPU copy: {detail}")
    return detail


def check_adapt(tiny: Tiny, cuda: bool) -> str:
    from jobs.synthetic import make_sentences
    from trainer.config import load_config
    from trainer.data.corpus import LABELS
    from trainer.data.features import Featurizer
    from trainer.training.adapt import adapt_many
    from trainer.training.predict import predict

    cfg = load_config(None, ["adapt.adapt_lr=0.01", "adapt.batch_size=8"])
    per_lang = ADAPT_SENTENCES // 5
    sentences = [s for lang in ("es", "nl", "de", "fr", "zh") for s in make_sentences(lang, per_lang, seed=2)]
    english = make_sentences("en", 400, seed=3)
    rng = random.Random(0)
    supports = [[english[rng.randrange(len(english))], english[rng.randrange(len(english))]] for _ in sentences]
    featurizer = Featurizer(tiny.tokenizer(), max_length=32, context=8)
    cpu_model = tiny.model(LABELS, "cpu").eval()
    if cuda:
        got, t = _timed(adapt_many, tiny.model(LABELS, "cuda").eval(), featurizer, sentences, supports, cfg)
        ref, t_ref = _timed(adapt_many, cpu_model, featurizer, sentences, supports, cfg)
        what = "cuda against cpu (batched)"
    else:
        got, t = _timed(adapt_many, cpu_model, featurizer, sentences, supports, cfg, batched=True)
        ref, t_ref = _timed(adapt_many, cpu_model, featurizer, sentences, supports, cfg, batched=False)
        what = "cpu batched against sequential"
    changed = sum(a != b for a, b in zip(ref, predict(cpu_model, featurizer, sentences)))
    words = sum(len(s.words) for s in sentences)
    differ = sum(x != y for a, b in zip(got, ref) for x, y in zip(a, b))
    detail = (f"{what}: {len(sentences)} sentences, {words} words, {differ} tags differ; adaptation changed "
              f"{changed} sentences' tags ({t:.1f} s and {t_ref:.1f} s)")
    if differ or any(len(a) != len(b) for a, b in zip(got, ref)):
        raise CheckFailed(detail)
    if not changed:
        raise CheckFailed(f"adaptation changed no tag, so the comparison proves little: {detail}")
    return detail


def check_pytest(cuda: bool, quick: bool, timeout_s: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider"]
    if quick:
        cmd.append("tests/test_gpu_readiness.py")
    out, t, rc = _run(cmd, timeout_s)
    summary = next((line.strip("= ") for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|skipped|"
                                                                                         r"failed|deselected)", line)),
                   "no summary line")
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", summary)) else 0
    detail = f"`python {' '.join(cmd[1:])}`: {summary} ({t:.0f} s)"
    if rc != 0:
        raise CheckFailed(f"{detail}; exit status {rc}:\n{_tail(out)}")
    if cuda and (skipped or not passed):
        reasons = sorted({line.split("] ", 1)[-1] for line in out.splitlines() if line.startswith("SKIPPED")})
        raise CheckFailed(f"{detail}; on a GPU none may be skipped: {'; '.join(reasons)}")
    if not cuda:
        detail += "; skipped here: no CUDA device"
    return detail


class GpuWatch:
    """Processes nvidia-smi sees on the GPUs, polled every second while a command runs."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.pids: set[int] = set()
        self.most, self.peak_mib = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            rows = [line.split(",") for line in out.splitlines() if line.count(",") == 1]
            try:
                rows = [(int(p), int(m)) for p, m in rows]
            except ValueError:
                continue
            self.pids.update(p for p, _ in rows)
            self.most = max(self.most, len(rows))
            self.peak_mib = max(self.peak_mib, sum(m for _, m in rows))

    def __enter__(self) -> "GpuWatch":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def demo_overrides(name: str) -> list[str]:
    short = ["train.num_meta_steps=8", "train.eval_every=4", "train.checkpoint_every=4"]
    if name == "demo-cpu":
        return ["cluster.use_gpu=false", "cluster.num_workers=1", "cluster.zero_stage=0", "train.num_meta_steps=4",
                "train.eval_every=2", "train.checkpoint_every=2"]
    zero = name.rsplit("zero", 1)[1]
    # One worker on the whole GPU for training; in the other phases the embedding actor, the two
    # FAISS shards and the two adapter actors each take a quarter of it.
    return ["cluster.use_gpu=true", "cluster.num_workers=1", f"cluster.zero_stage={zero}",
            "cluster.gpus_per_actor=0.25", "cluster.cpus_per_worker=2", "cluster.cpus_per_actor=1"] + short


def check_demo(name: str, workdir: Path, cuda: bool, timeout_s: float) -> str:
    out_dir = workdir / name
    overrides = demo_overrides(name)
    cmd = [sys.executable, "-m", "jobs.demo", "--out", str(out_dir),
           f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", *overrides]
    with GpuWatch() as watch:
        out, t, rc = _run(cmd, timeout_s)
    table = out_dir / "synthetic" / "results.md"
    detail = f"`python -m jobs.demo {' '.join(overrides)}`: "
    if rc != 0 or not table.is_file():
        written = "written" if table.is_file() else "missing"
        raise CheckFailed(f"{detail}exit status {rc} after {t:.0f} s, results table {written}:\n{_tail(out)}")
    rows = table.read_text(encoding="utf-8").splitlines()
    ours = next((line for line in rows if line.startswith("| Ours (this")), "")
    detail += f"results table in {t:.0f} s ({ours.split('|')[-3].strip() if ours.count('|') > 3 else '?'} avg F1)"
    if not cuda:
        return detail
    if not watch.available:
        return detail + "; GPU use not observed (no nvidia-smi)"
    if not watch.pids:
        raise CheckFailed(f"{detail}, but nvidia-smi saw no process on the GPU: the work ran on the CPU")
    rank0 = out_dir / "synthetic" / "ours" / "seed95" / "workers" / "rank0.pid"
    on_gpu = "unknown"
    if rank0.is_file():
        on_gpu = "yes" if int(rank0.read_text().strip()) in watch.pids else "not seen (pid namespaces may differ)"
    return (f"{detail}; nvidia-smi saw {len(watch.pids)} processes on the GPU (at most {watch.most} at once, "
            f"{watch.peak_mib} MiB at the peak); training rank 0 among them: {on_gpu}")


# ---------------------------------------------------------------------------------- running


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 onto 2 inside (native code writes there directly, past sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _run(cmd: list[str], timeout_s: float) -> tuple[str, float, int]:
    """(stdout and stderr, seconds, exit status; 124 on a timeout) of a command run from the repository."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, never one this shell points at
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
        return done.stdout + done.stderr, time.perf_counter() - start, done.returncode
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return text + f"\n(stopped after {timeout_s:.0f} s)", time.perf_counter() - start, 124


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="the CPU comparisons only (implied without a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="leave out the CPU demo (minutes on 2 cores); only the gpu tests of "
                             "tests/test_gpu_readiness.py")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these checks (names as printed, or their prefixes: demo, faiss, ...)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=570.0,
                        help="seconds the whole run may take (default 570): a demo is stopped at what is left")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import logging

    import torch

    from benchmarks.common import quiet

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet()
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_only
    set_accelerator("cuda" if cuda else "cpu")
    if not cuda and not args.cpu_only:
        print("no CUDA device: running the CPU-only checks", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine gpu={gpu!r} cuda_checks={cuda} torch={torch.__version__} cores={os.cpu_count()} "
          f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="metaner-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    state: dict = {}

    def tiny() -> Tiny:
        if "tiny" not in state:
            state["tiny"] = Tiny(workdir)
        return state["tiny"]

    def shard():
        if "shard" not in state:
            from retrieval.index import IndexShard

            state["vectors"] = faiss_vectors()
            state["shard"] = IndexShard(state["vectors"][1], device="cuda" if cuda else "cpu")
        return state["shard"]

    checks = [("meta-step", lambda: check_meta_step(tiny(), cuda)),
              ("meta-step-bf16", lambda: check_meta_step_bf16(tiny(), cuda))]
    checks += [(f"faiss-k{k}", lambda k=k: check_faiss(shard(), *state["vectors"], k, cuda)) for k in (2, 2040, 2100)]
    checks += [("adapt-tags", lambda: check_adapt(tiny(), cuda)),
               ("pytest-gpu", lambda: check_pytest(cuda, args.quick, min(240.0, left())))]
    demos = ["demo-zero0", "demo-zero1"] if cuda else ([] if args.quick else ["demo-cpu"])
    checks += [(name, lambda name=name: check_demo(name, workdir, cuda, min(DEMO_TIMEOUT_S, left()))) for name in demos]
    if args.only:
        checks = [(n, c) for n, c in checks if any(n == o or n.startswith(o) for o in args.only)]
        if not checks:
            raise SystemExit(f"--only {' '.join(args.only)} names no check")
    failed = 0
    try:
        for name, check in checks:
            if left() < 5:
                print(f"FAIL {name} not run: the {args.budget_s:g} s budget is spent", flush=True)
                failed += 1
                continue
            try:
                print(f"PASS {name} {check()}", flush=True)
            except CheckFailed as err:
                print(f"FAIL {name} {err}", flush=True)
                failed += 1
            except Exception as err:  # a check that cannot run is a failure of the machine, named
                where = traceback.extract_tb(err.__traceback__)[-1]
                first = (str(err).strip().splitlines() or [""])[0]
                print(f"FAIL {name} {type(err).__name__}: {first} ({Path(where.filename).name}:{where.lineno})",
                      flush=True)
                failed += 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{len(checks) - failed} of {len(checks)} checks passed in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

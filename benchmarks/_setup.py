"""Run first by every timing script (`prepare()`), before torch: one thread per process for stable timing
(torch reads OMP_NUM_THREADS at import), the hub never asked, Ray on loopback; and sys.path without
this folder, where benchmarks/retrieval.py would hide the `retrieval` package when a script runs as
a file. DeepSpeed's accelerator is set later, by `set_accelerator`, once --device is parsed."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def prepare() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    if os.path.dirname(_HERE) not in sys.path:
        sys.path.insert(0, os.path.dirname(_HERE))


def set_accelerator(device: str) -> None:
    """DeepSpeed's accelerator follows the device the benchmark runs on (cuda for --device cuda,
    cpu otherwise).

    Set once the arguments are parsed rather than in prepare(): only then is --device known (and
    a script's main(argv) may be called with arguments that are not sys.argv). It must still come
    before deepspeed is imported, which reads DS_ACCELERATOR once; the plain DeepSpeed processes of
    benchmarks/meta_train.py inherit it (Ray Train workers get theirs from cluster.use_gpu).
    Forced either way: a DS_ACCELERATOR=cpu left in the shell makes deepspeed.initialize move a
    GPU run's model back to the CPU, and detection on a GPU machine would give a CPU run cuda.
    """
    wanted = "cuda" if device == "cuda" else "cpu"
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != wanted:
            raise RuntimeError(f"deepspeed was imported with the {get_accelerator().device_name()} accelerator "
                               f"before --device {device} was read; set DS_ACCELERATOR={wanted}")
    os.environ["DS_ACCELERATOR"] = wanted

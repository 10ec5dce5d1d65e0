"""Run first by every timing script (`prepare()`), before torch: one thread per process for stable timing
(torch reads OMP_NUM_THREADS at import), the hub never asked, Ray and DeepSpeed on this machine's
CPUs; and sys.path without this folder, where benchmarks/retrieval.py would hide the `retrieval`
package when a script runs as a file."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def prepare() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    if os.path.dirname(_HERE) not in sys.path:
        sys.path.insert(0, os.path.dirname(_HERE))

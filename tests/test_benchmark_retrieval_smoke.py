"""The retrieval benchmark runs end to end on a few real sentences per corpus (not a timing test)."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import MODELS, REPO, needs_data, needs_tiny_6l


@pytest.mark.slow
@needs_data
@needs_tiny_6l
def test_retrieval_benchmark_smoke(ray_local, data_root, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_retrieval", REPO / "benchmarks" / "retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--limit", "40", "--data", str(data_root), "--model", str(MODELS / "bert-tiny-6l"),
                       "--shards", "2"]) == 0
    out = capsys.readouterr().out
    assert "corpus en=40 es=40 nl=40 de=40 fr=40 zh=40" in out
    assert "neighbours identical" in out
    ratios = [line.split() for line in out.splitlines() if line.startswith("ratio ")]
    assert len(ratios) == 4 and all(float(value) > 0 for _, _, value in ratios)

"""The paper's rows as config overrides, and the results table."""
from __future__ import annotations

import pytest

from jobs.variants import TABLE3, TABLE4, VARIANTS, markdown_table, summarize, variant_config
from trainer.config import Config


def test_each_variant_changes_only_its_own_keys():
    base = Config()
    flat = base.flat()
    for name in VARIANTS:
        changed = {k for k, v in variant_config(base, name).flat().items() if flat[k] != v}
        assert changed <= {o.split("=")[0] for o in VARIANTS[name]}, name
    assert variant_config(base, "ours_mean").retrieval.pooling == "mean"
    assert variant_config(base, "base").adapt.enabled is False
    assert set(TABLE3) <= set(TABLE4) <= set(VARIANTS)
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variant_config(base, "nope")


def test_table_has_mean_std_paper_rows_and_wall_time():
    per_seed = {1: {"es": 50.0, "nl": 60.0}, 2: {"es": 52.0, "nl": 58.0}}
    row = summarize(per_seed)
    assert row["es"] == (51.0, pytest.approx(1.4142, abs=1e-4)) and row["avg"][0] == 55.0
    text = markdown_table({"ours": row, "no_both": row}, {"ours": {"es": 76.75, "nl": 80.44}},
                          {"ours": 600.0, "no_both": 90.0})
    lines = text.splitlines()
    assert lines[0] == "| variant | es | nl | avg | wall |"
    assert lines[2] == "| Ours (this run) | 51.00 ± 1.41 | 59.00 ± 1.41 | 55.00 ± 0.00 | 10.0 min |"
    assert lines[3].startswith("| Ours (paper, mBERT) | 76.75 | 80.44 | 78.59")
    assert lines[4].startswith("| w/o max loss & masking (this run)") and lines[4].endswith("1.5 min |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)

"""The paper's rows as config overrides, and the results table."""
from __future__ import annotations

import json

import pytest

from jobs.variants import (
    REUSES,
    STARTS_FROM,
    TABLE3,
    TABLE4,
    VARIANTS,
    markdown_table,
    summarize,
    variant_config,
    with_parents,
)
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
    assert variant_config(base, "base_adapt").adapt.enabled is True
    assert variant_config(base, "base_adapt").train.mode == "base"
    assert variant_config(base, "ours_noadapt").adapt.enabled is False
    assert variant_config(base, "ours_official").train.loss_positions == "all"
    assert set(REUSES) | set(STARTS_FROM) <= set(VARIANTS)
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variant_config(base, "nope")


def test_table_has_mean_std_paper_rows_and_wall_time():
    per_seed = {1: {"es": 50.0, "nl": 60.0}, 2: {"es": 52.0, "nl": 58.0}}
    row = summarize(per_seed)
    assert row["es"] == (51.0, pytest.approx(1.4142, abs=1e-4), 2) and row["avg"][0] == 55.0
    text = markdown_table({"ours": row, "no_both": row}, {"ours": {"es": 76.75, "nl": 80.44}},
                          {"ours": 600.0, "no_both": 90.0})
    lines = text.splitlines()
    assert lines[0] == "| variant | es | nl | avg | wall |"
    assert lines[2] == "| Ours (this run) | 51.00 ± 1.41 | 59.00 ± 1.41 | 55.00 ± 0.00 | 10.0 min |"
    assert lines[3].startswith("| Ours (paper, mBERT) | 76.75 | 80.44 | 78.59")
    assert lines[4].startswith("| w/o max loss & masking (this run)") and lines[4].endswith("1.5 min |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    one = markdown_table({"ours": summarize({1: {"es": 50.0, "nl": 60.0}})}, {})
    assert "| Ours (this run) | 50.00 (n=1) | 60.00 (n=1) | 55.00 (n=1) |" in one


def test_parents_run_before_the_rows_that_need_their_checkpoints():
    assert with_parents(["base_adapt"]) == ["base", "base_adapt"]
    assert with_parents(["ours_from_base", "ours_noadapt", "base"]) == ["base", "ours_from_base", "ours", "ours_noadapt"]
    assert with_parents(["ours", "no_both"]) == ["ours", "no_both"]


def test_rows_evaluate_or_start_from_their_parents_checkpoint(tmp_path, ray_local):
    """base_adapt and ours_noadapt train nothing and evaluate their parents' checkpoints under their
    own adaptation setting; ours_from_base meta-trains from the Base Model's weights; every seed
    keeps precision, recall and its English-dev curve."""
    from jobs.common import CONFIGS
    from jobs.demo import synthetic_data, tiny_model
    from jobs.pipeline import run_variants
    from trainer.config import load_config, with_overrides
    from trainer.training.checkpoint import read_info

    files = synthetic_data(tmp_path / "data")
    cfg = load_config(CONFIGS / "demo.yaml", [
        f"data.root={tmp_path / 'data'}", "data.targets=[es]", f"data.target_files.es={files['es']}",
        "train.num_meta_steps=4", "train.eval_every=2", "train.checkpoint_every=2", "cluster.num_workers=0",
        "cluster.num_adapter_actors=1", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    cfg = with_overrides(cfg, [f"model.name_or_path={tiny_model(tmp_path / 'model', cfg)}",
                               f"retrieval.cache_dir={tmp_path / 'cache'}", f"model.prefix_cache_dir={tmp_path / 'prefix'}"])
    out = tmp_path / "out"
    run_variants(cfg, ["base_adapt", "ours_from_base", "ours_noadapt"], out)

    def scores(row):
        return json.loads((out / row / "seed95" / "scores.json").read_text())

    def record(row):
        return json.loads((out / row / "seed95" / "inputs.json").read_text())

    assert scores("base_adapt")["checkpoint"] == scores("base")["checkpoint"]
    assert scores("ours_noadapt")["checkpoint"] == scores("ours")["checkpoint"]
    assert not (out / "base_adapt" / "seed95" / "best").exists() and not (out / "ours_noadapt" / "seed95" / "best").exists()
    assert record("base_adapt")["values"]["input.parent"] == record("base")["hash"]
    assert record("ours_from_base")["values"]["input.parent"] == record("base")["hash"]
    started = read_info(scores("ours_from_base")["checkpoint"])["config"]["model"]["init_checkpoint"]
    assert started == str((out / "base" / "seed95" / "best").resolve())
    for row in ("base", "ours", "ours_from_base"):
        assert [step for step, _ in scores(row)["dev_curve"]] == [2, 4], row
    for row in ("base", "base_adapt", "ours", "ours_noadapt", "ours_from_base"):
        assert set(scores(row)["precision"]) == set(scores(row)["recall"]) == {"es"}, row
    # The base checkpoint labelled with and without adaptation: the same weights, other predictions.
    base_tags = (out / "base" / "seed95" / "eval" / "predictions.es.txt").read_text()
    adapted_tags = (out / "base_adapt" / "seed95" / "eval" / "predictions.es.txt").read_text()
    assert base_tags != adapted_tags

    # The results page reads it all back: rows, the decompositions, the curves and the chart.
    from jobs.results import page

    text = page(out, tmp_path / "curves.png", resamples=50)
    assert "| Base Model + adaptation | 1 |" in text and "| *paper (mBERT)* | 5 | *74.59* |" in text
    f1 = {row: scores(row)["f1"]["es"] for row in ("ours", "base_adapt", "ours_noadapt")}
    assert f"| meta-training effect | Ours − Base Model + adaptation | {f1['ours'] - f1['base_adapt']:+.2f} |" in text
    assert f"| adaptation effect | Ours − Ours w/o adaptation | {f1['ours'] - f1['ours_noadapt']:+.2f} |" in text
    assert "| row | 2 | 4 |" in text and (tmp_path / "curves.png").stat().st_size > 0
    assert "### Seed 95: against Ours" in text

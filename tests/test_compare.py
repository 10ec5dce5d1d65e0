"""Paired bootstrap of F1 between rows of a job's output folder."""
from __future__ import annotations

import numpy as np
import pytest

from jobs.compare import compare
from trainer.data.scoring import bootstrap_f1, score, write_conll

GOLD = [["B-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["B-PER", "I-PER", "O"], ["O", "O", "B-LOC"]] * 10


def test_bootstrap_resamples_conlleval_f1_and_pairs_the_rows():
    worse = [["O"] * 3 if i % 2 else list(g) for i, g in enumerate(GOLD)]
    samples = bootstrap_f1(GOLD, {"same": GOLD, "worse": worse}, n=200, seed=1)
    assert np.all(samples["same"] == 100.0)
    assert 0 < samples["worse"].std() < 20 and abs(samples["worse"].mean() - score(GOLD, worse)["f1"]) < 3


def test_compare_prints_each_row_against_the_reference(tmp_path):
    words = [[f"w{j}" for j in range(3)] for _ in GOLD]
    rows = {"base": [["O"] * 3 if i % 3 == 0 else list(g) for i, g in enumerate(GOLD)], "ours": [list(g) for g in GOLD]}
    for name, pred in rows.items():
        folder = tmp_path / name / "seed95" / "eval"
        folder.mkdir(parents=True)
        write_conll(folder / "predictions.es.txt", words, GOLD, pred)
    table = compare(tmp_path, "base", 200).splitlines()
    ours = next(line for line in table if line.startswith("| ours | es |"))
    gain = 100.0 - score(GOLD, rows["base"])["f1"]
    assert f"| {100.0:.2f} |" in ours and f"{gain:+.2f}" in ours
    with pytest.raises(ValueError, match="no evaluated row 'nope'"):
        compare(tmp_path, "nope", 10)
    # A second training seed where ours is the worse row: --seed picks its predictions.
    for name, pred in {"base": GOLD, "ours": rows["base"]}.items():
        folder = tmp_path / name / "seed495" / "eval"
        folder.mkdir(parents=True)
        write_conll(folder / "predictions.es.txt", words, GOLD, pred)
    ours_495 = next(line for line in compare(tmp_path, "base", 200, run_seed=495).splitlines()
                    if line.startswith("| ours | es |"))
    assert f"{-gain:+.2f}" in ours_495
    assert compare(tmp_path, "base", 200) == compare(tmp_path, "base", 200, run_seed=95)  # lowest, not "seed495"
    with pytest.raises(ValueError, match="for seed 7"):
        compare(tmp_path, "base", 10, run_seed=7)


def test_results_and_compare_name_a_missing_folder_in_one_line(tmp_path, capsys):
    from jobs.compare import main as compare_main
    from jobs.results import main as results_main

    for main in (compare_main, results_main):
        assert main([str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'none'}: no such folder; give the --out folder") and err.count("\n") == 1

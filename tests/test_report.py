"""Per-language scores, the conlleval file, and the MLflow record of an evaluation."""
import mlflow

from cluster.report import PAPER_TABLE3, log_evaluation, score_language
from cluster.tracking import MlflowLogger
from trainer.data.scoring import read_conll


def test_evaluation_run_has_one_child_per_language_and_a_chart(tmp_path, toy_corpus):
    results = {}
    for lang in ("es", "nl", "zh"):
        sentences = toy_corpus[lang][:10]
        # Predict every entity as PER: right for PER, wrong elsewhere.
        preds = [[t if t == "O" else t[:2] + "PER" for t in s.tags] for s in sentences]
        results[lang] = score_language(lang, sentences, preds, tmp_path)
        words, gold, pred = read_conll(results[lang]["predictions_file"])
        assert gold == [list(s.tags) for s in sentences] and pred == preds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MlflowLogger(uri, "eval", run_name="evaluate")
    summary = log_evaluation(parent, results, "ckpt/path", {"es": "es.txt"}, tmp_path)
    parent.close()
    assert abs(summary["f1_avg"] - sum(r["f1"] for r in results.values()) / 3) < 1e-9
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([parent.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
    assert sorted(r.data.params["language"] for r in children) == ["es", "nl", "zh"]
    for child in children:
        lang = child.data.params["language"]
        assert child.data.metrics["f1"] == results[lang]["f1"]
        assert child.data.metrics["PER_recall"] == 100.0 and child.data.metrics["LOC_recall"] == 0.0
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == [f"predictions.{lang}.txt"]
    assert "f1_per_language.png" in [a.path for a in client.list_artifacts(parent.run_id)]
    assert (tmp_path / "f1_per_language.png").read_bytes()[:4] == b"\x89PNG"
    assert set(PAPER_TABLE3["ours"]) == {"es", "nl", "de", "fr", "zh"}
    # A labelled evaluation names its chart by row, seed and encoder.
    other = MlflowLogger(uri, "eval", run_name="labelled")
    log_evaluation(other, results, "ckpt/path", {}, tmp_path, label="ours, seed 95, me5-small-ner")
    other.close()
    assert (tmp_path / "f1_ours_seed_95_me5-small-ner.png").read_bytes()[:4] == b"\x89PNG"


def test_predicted_misc_is_not_scored_where_the_target_has_no_misc(tmp_path):
    from trainer.data.corpus import Sentence

    gold = [Sentence(("Paris", "et", "Lyon"), ("B-LOC", "O", "B-LOC"))]
    preds = [["B-LOC", "B-MISC", "B-MISC"]]  # one right, one MISC where O, one MISC where LOC
    kept = score_language("fr", gold, preds, tmp_path / "kept")
    mapped = score_language("fr", gold, preds, tmp_path / "mapped", misc_to_o=True)
    assert abs(kept["precision"] - 100 / 3) < 1e-9 and mapped["precision"] == 100.0
    assert kept["recall"] == mapped["recall"] == 50.0
    assert read_conll(mapped["predictions_file"])[2] == [["B-LOC", "O", "O"]]

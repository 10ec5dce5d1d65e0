"""A student trained on a teacher's soft labels: the loss, the teacher's rows per window, and the
fine-tuning loop learning the teacher's outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.data.corpus import LABELS, Sentence
from trainer.data.features import Featurizer, Soft, soft_targets
from trainer.modules.losses import soft_loss
from trainer.modules.model import NerModel, freeze
from trainer.training.finetune import finetune
from trainer.training.predict import predict, predict_soft


def test_soft_loss_is_the_mean_squared_error_of_the_distributions_at_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9)
    labels = torch.tensor([[-100, 0, 3, -100, -100], [-100, 1, -100, -100, -100]])
    teacher = torch.softmax(torch.randn(3, 9), -1)
    expected = ((torch.softmax(logits[labels != -100], -1) - teacher) ** 2).mean()
    torch.testing.assert_close(soft_loss(logits, labels, teacher), expected)
    same = soft_loss(logits, labels, torch.softmax(logits[labels != -100], -1))
    assert float(same) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="3 labelled positions but 2 teacher rows"):
        soft_loss(logits, labels, teacher[:2])


def test_each_window_gets_its_sentences_rows_and_other_units_are_refused(tiny_tokenizer, toy_corpus):
    en = toy_corpus["en"]
    long = Sentence(tuple(w for s in en[:6] for w in s.words), tuple(t for s in en[:6] for t in s.tags))
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    sentences = [long, en[7]]
    windows = featurizer.encode(sentences)
    assert len(windows) > 3
    teacher = [Soft(np.arange(len(s.words), dtype=np.int32),
                    np.tile(np.arange(len(s.words), dtype=np.float16)[:, None], (1, 9))) for s in sentences]
    rows = soft_targets(windows, teacher)
    for w, r in zip(windows, rows):
        assert r.dtype == torch.float16 and r[:, 0].tolist() == list(w.words)  # row i is word i's here
    short = [Soft(t.firsts[:-1], t.probs[:-1]) for t in teacher]
    with pytest.raises(ValueError, match="the teacher labelled no unit starting at word"):
        soft_targets(windows, short)


def test_a_student_learns_its_teachers_outputs(tiny_bert, tiny_tokenizer, toy_corpus):
    """From another random start, fine-tuning on the teacher's soft labels of target-language
    text brings the student's tags towards the teacher's and lowers the soft loss."""
    teacher_model = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=0).eval()
    featurizer = Featurizer(tiny_tokenizer, max_length=32, context=8)
    text = [Sentence(s.words, ("O",) * len(s.words)) for lang in ("es", "de") for s in toy_corpus[lang][:12]]
    labelled = predict_soft(teacher_model, featurizer, text)
    teacher_tags = [t for t, _ in labelled]
    sentences = [Sentence(s.words, tuple(t)) for s, t in zip(text, teacher_tags)]
    student = NerModel.from_pretrained(tiny_bert, LABELS, dropout=0.0, seed=1)
    freeze(student, 1)

    def agreement():
        tags = predict(student, featurizer, text)
        return np.mean([a == b for x, y in zip(tags, teacher_tags) for a, b in zip(x, y)])

    before = agreement()
    cfg = load_config(None, ["train.meta_lr=0.003", "train.base_batch_size=8", "train.warmup_proportion=0.0",
                             "train.lambda_max=0", "train.mask_ratio=0"])
    stats = finetune(student, featurizer, sentences, cfg, seed=3, num_steps=40, teacher=[s for _, s in labelled])
    assert before < 0.3 and agreement() > 0.8, (before, agreement())  # measured: 0.14 before, 0.89 after
    assert stats["last_loss"] < 0.01
    with pytest.raises(ValueError, match="soft labels of 1"):
        finetune(student, featurizer, sentences, cfg, seed=3, num_steps=1, teacher=[labelled[0][1]])


# --------------------------------------------------------------------------- the job


def _files(tmp_path, toy_corpus) -> dict:
    """Unlabelled Spanish text as CoNLL (its tags to be ignored), a Spanish test set that shares
    none of its sentences, and an English dev set."""
    from jobs.synthetic import write_corpus

    es = toy_corpus["es"]
    write_corpus(tmp_path / "unlabelled.conll", es[:12])
    write_corpus(tmp_path / "test.conll", es[12:20])
    write_corpus(tmp_path / "dev.conll", toy_corpus["en"][40:52])
    return {name: str(tmp_path / f"{name}.conll") for name in ("unlabelled", "test", "dev")}


def _distill(teacher, files, out, *extra):
    from jobs.distill import run

    return run(["--teacher", str(teacher), "--lang", "es", "--unlabelled", files["unlabelled"], "--test",
                files["test"], "--dev", files["dev"], "--out", str(out), "distill.max_sentences=10",
                "distill.num_steps=4", "distill.batch_size=4", "tag.shard_size=4", "cluster.adapt_unit_size=4",
                "cluster.num_workers=1", "cluster.num_embed_actors=1", "cluster.num_index_shards=1",
                "cluster.num_adapter_actors=1", "cluster.cpus_per_actor=0.5",
                f"mlflow.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", *extra])


def test_test_sentences_or_no_sentence_in_the_unlabelled_text_are_refused_before_any_work(
        trained_checkpoint, toy_corpus, tmp_path):
    from trainer.utils.errors import InputError

    files = _files(tmp_path, toy_corpus)
    leaky = tmp_path / "leaky.conll"
    leaky.write_text(open(files["unlabelled"]).read() + "\n" + open(files["test"]).read().split("\n\n")[0] + "\n")
    with pytest.raises(InputError, match=r"--unlabelled: 1 of its first 13 sentences are in the test set.*"
                                         r"distill.drop_test_sentences=true"):
        _distill(trained_checkpoint / "best", {**files, "unlabelled": str(leaky)}, tmp_path / "out",
                 "distill.max_sentences=0")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="no sentence to tag"):
        _distill(trained_checkpoint / "best", {**files, "unlabelled": str(empty)}, tmp_path / "out2")
    # Only test sentences: with them left out, nothing is left.
    with pytest.raises(InputError, match=r"--unlabelled: no sentence left to label \(8 read, 8 in the test set\)"):
        _distill(trained_checkpoint / "best", {**files, "unlabelled": files["test"]}, tmp_path / "out3",
                 "distill.drop_test_sentences=true")
    for out in ("out", "out2", "out3"):
        assert not (tmp_path / out / "soft").exists() and not (tmp_path / out / "student").exists()


@pytest.mark.slow
def test_distill_tags_trains_a_student_checkpoint_resumes_and_refuses_another_teacher(
        ray_local, trained_checkpoint, toy_corpus, tmp_path, capsys):
    from jobs.tag import run as tag
    from jobs.textio import read_soft
    from trainer.training.checkpoint import build_model, read_info, save_checkpoint, use_config
    from trainer.utils.errors import InputError

    files = _files(tmp_path, toy_corpus)
    out, teacher = tmp_path / "out", trained_checkpoint / "best"
    assert _distill(teacher, files, out) == 0
    printed = capsys.readouterr().out
    soft = list(read_soft(out / "soft"))
    assert len(soft) == 10 and all(len(s.units) == len(s.words) and s.probs.shape[1] == 9 for s in soft)
    best = out / "student" / "best"
    info = read_info(best)
    assert info["meta"]["mode"] == "student" and info["meta"]["steps"] == 4 and "best_f1" in info["meta"]
    assert use_config(best).adapt.enabled is False  # a student tags without adaptation unless asked
    assert str(best) in printed and "English dev F1" in printed

    # Started again: nothing is tagged or trained twice.
    work = [*(out / "soft").glob("part-*"), *(out / "student" / "best").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in work}
    assert _distill(teacher, files, out) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # Soft labels of another teacher in the same --out: refused, nothing lost.
    other = save_checkpoint(tmp_path / "other", build_model(use_config(teacher), seed=4),
                            tokenizer=None, config=use_config(teacher))
    with pytest.raises(InputError, match=r"holds work made with other inputs: checkpoint.weights"):
        _distill(other, files, out)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # The student is a checkpoint `metaner tag` takes.
    (tmp_path / "in.txt").write_text("Ana vive en Madrid .\n", encoding="utf-8")
    assert tag(["--checkpoint", str(best), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "tagged"),
                "cluster.num_adapter_actors=1", "cluster.num_embed_actors=1", "cluster.num_index_shards=1"]) == 0
    assert len((tmp_path / "tagged" / "part-000000.jsonl").read_text().splitlines()) == 1

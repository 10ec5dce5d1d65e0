"""`metaner tag`: raw text in, tagged shards out, from the checkpoint alone; resumable, exact, in
input order, surviving a killed adapter actor, refusing what the cluster cannot place."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import REPO

from trainer.config import with_overrides

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Small shards and units, so that a few sentences make several of each.
_JOB = ["tag.shard_size=7", "cluster.adapt_unit_size=3", "cluster.num_adapter_actors=2",
        "cluster.num_embed_actors=1", "cluster.num_index_shards=1", "cluster.cpus_per_actor=0.5"]


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    return trained_checkpoint


def _text_folder(folder: Path, toy_corpus, n_per_lang: int = 5) -> list[list[str]]:
    """Raw sentences of four languages in two files and a subfolder; the words as they will be read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    langs = {"a.txt": ("es", "nl"), "sub/b.txt": ("de", "fr")}
    words = []
    for name, pair in langs.items():
        lines = [" ".join(s.words) for lang in pair for s in toy_corpus[lang][:n_per_lang]]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        words += [line.split() for line in lines]
    return words


def _read_parts(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("part-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return rows


def _reference(trained: Path, words: list[list[str]], unspaced: bool = False, soft: bool = False) -> list:
    """Tags (with `soft`, (tags, Soft)) from one process, no Ray: exact retrieval over the whole
    source, then the Adapter."""
    from jobs.inputs import adaptation_inputs
    from retrieval.embed import Embedder
    from retrieval.tasks import target_support
    from trainer.data.corpus import Sentence, read_corpus
    from trainer.training.adapt import Adapter, AdaptItem

    found = adaptation_inputs(trained / "best")
    cfg = found.config
    cfg = with_overrides(cfg, [("model.prefix_cache_dir", "")])
    source = read_corpus(found.source).sentences
    sentences = [Sentence(tuple(w), ("O",) * len(w), unspaced) for w in words]
    embed = Embedder(found.encoder, max_length=cfg.model.max_length, pooling=cfg.retrieval.pooling, progress=False)
    ids = target_support(embed(sentences), embed(source), cfg.retrieval.k)
    tags = Adapter(found.checkpoint, cfg=cfg).run(
        [AdaptItem(i, s, tuple(source[j] for j in ids[i])) for i, s in enumerate(sentences)], soft=soft)
    return [tags[i] for i in range(len(sentences))]


# --------------------------------------------------------------------------- reading raw text


def test_text_is_split_into_sentences_and_words_as_the_corpora_are():
    from jobs.textio import split_sentences, tokenize

    words = tokenize("Dr. Smith flog nach Paris. Dann sprach er mit J. Doe! ¿Qué pasa? Fin.")
    assert [" ".join(s) for s in split_sentences(words)] == [
        "Dr . Smith flog nach Paris .", "Dann sprach er mit J . Doe !", "¿ Qué pasa ?", "Fin ."]
    assert tokenize("江泽民访问美国。") == ["江", "泽", "民", "访", "问", "美", "国", "。"]
    assert [len(s) for s in split_sentences(tokenize("他来了。她走了！"))] == [4, 4]


def test_formats_folders_and_globs(tmp_path):
    from jobs.textio import InputSet, expand

    (tmp_path / "in").mkdir()
    (tmp_path / "in/1.txt").write_text("Anna lives in Berlin .\nJohn works . He left .\n")
    (tmp_path / "in/2.conll").write_text("-DOCSTART- O\n\nAnna B-PER\nlives O\n\nBerlin\n")
    (tmp_path / "in/3.jsonl").write_text('{"text": "Sofia met Jan ."}\n\n{"text": ["Li", "Wei"]}\n')
    (tmp_path / "in/.hidden").write_text("never read\n")
    (tmp_path / "p.txt").write_text("A line that\ngoes on .\n\nNext paragraph .\n")
    files = expand(str(tmp_path / "in"))
    assert [Path(f).name for f in files] == ["1.txt", "2.conll", "3.jsonl"]
    inputs = InputSet(files)
    assert inputs.count() == 7
    got = [(" ".join(r.words), r.where.rsplit("/", 1)[1]) for r in inputs.sentences()]
    assert got == [("Anna lives in Berlin .", "1.txt:1"), ("John works .", "1.txt:2"), ("He left .", "1.txt:2"),
                   ("Anna lives", "2.conll:3"), ("Berlin", "2.conll:6"), ("Sofia met Jan .", "3.jsonl:1"),
                   ("Li Wei", "3.jsonl:3")]
    assert [" ".join(r.words) for r in InputSet([str(tmp_path / "p.txt")], format="paragraphs").sentences()] == [
        "A line that goes on .", "Next paragraph ."]
    assert expand(str(tmp_path / "in/*.txt")) == [str(tmp_path / "in/1.txt")]
    with pytest.raises(ValueError, match="matches no file"):
        expand(str(tmp_path / "in/*.xml"))


def test_bad_input_is_named_by_file_and_line_before_any_work(tmp_path):
    from jobs.textio import InputSet

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no text field 'text'.*--text-field"):
        InputSet([str(bad)]).count()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Málaga está en España .\n".encode("latin-1"))
    inputs = InputSet([str(latin)])
    assert inputs.count() == 1 and next(inputs.sentences()).words[0] == "Málaga"


def test_shards_are_written_whole_and_skipped_when_done(tmp_path, toy_corpus):
    from jobs.textio import ShardWriter, shards

    writer = ShardWriter(tmp_path, conll=True)
    sentences = toy_corpus["es"][:3]
    counts = writer.write(4, 12, sentences, ["x:1"] * 3, [list(s.tags) for s in sentences])
    assert writer.done() == {4} and sum(counts.values()) == sum(len(r["entities"]) for r in _read_parts(tmp_path))
    assert not list(tmp_path.glob(".*tmp")) and writer.path(4, ".conll").is_file()
    assert [(n, first, len(b)) for n, first, b in shards(iter(range(10)), 4, skip={1})] == [(0, 0, 4), (2, 8, 2)]


def _assert_soft_equal(out: Path, reference: list) -> None:
    """The soft shards in `out` hold, sentence by sentence, the reference's units and probabilities
    (float16 both: exactly equal up to the summation order of actors' batches, 2e-3)."""
    import numpy as np

    from jobs.textio import read_soft

    got = list(read_soft(out))
    assert len(got) == len(reference)
    for g, (tags, soft) in zip(got, reference):
        assert g.tags == tags and g.units == soft.firsts.tolist()
        assert isinstance(g.probs.base, np.memmap) or isinstance(g.probs, np.memmap)
        assert np.abs(g.probs.astype(np.float32) - soft.probs.astype(np.float32)).max() < 2e-3


def test_soft_shards_are_read_back_memory_mapped_and_a_bad_one_is_named(tmp_path, toy_corpus):
    import numpy as np

    from jobs.textio import ShardWriter, read_soft
    from trainer.data.features import Soft
    from trainer.utils.errors import InputError

    sentences = toy_corpus["es"][:3]
    rng = np.random.default_rng(0)
    soft = []
    for s in sentences:
        p = rng.random((len(s.words), 9))
        soft.append(Soft(np.arange(len(s.words), dtype=np.int32), (p / p.sum(-1, keepdims=True)).astype(np.float16)))
    writer = ShardWriter(tmp_path / "out", soft=True)
    writer.write(0, 0, sentences[:2], ["x:1", "x:2"], [list(s.tags) for s in sentences[:2]], soft[:2])
    writer.write(1, 2, sentences[2:], ["x:3"], [list(s.tags) for s in sentences[2:]], soft[2:])
    assert {p.name for p in writer.paths()} == {"part-000000.jsonl", "part-000001.jsonl", "part-000000.soft.npy",
                                                "part-000001.soft.npy"}
    got = list(read_soft(tmp_path / "out"))
    assert [g.words for g in got] == [list(s.words) for s in sentences]
    for g, s in zip(got, soft):
        assert isinstance(g.probs, np.memmap) and np.array_equal(np.asarray(g.probs), s.probs)
    with pytest.raises(ValueError, match="soft labels missing"):
        writer.write(2, 3, sentences[:1], ["x:4"], [list(sentences[0].tags)])
    # A line whose rows lie outside its sidecar, and a shard without one: named, with what to do.
    part = tmp_path / "out" / "part-000001.jsonl"
    part.write_text(part.read_text().replace('"soft_row": 0', '"soft_row": 99'))
    with pytest.raises(InputError, match=r"part-000001.jsonl:1: not a soft-labelled shard line .*--soft"):
        list(read_soft(tmp_path / "out"))
    (tmp_path / "out" / "part-000001.soft.npy").unlink()
    with pytest.raises(InputError, match=r"part-000001.jsonl has no soft labels beside it"):
        list(read_soft(tmp_path / "out"))


# --------------------------------------------------------------------------- the checkpoint


def test_the_checkpoint_records_and_checks_its_encoder_and_source(trained, tiny_bert_no_dropout, tmp_path):
    from jobs.inputs import adaptation_inputs
    from trainer.training.checkpoint import read_info

    info = read_info(trained / "best")
    enc, src = info["provenance"]["retrieval_encoder"], info["provenance"]["source"]
    assert enc["name_or_path"] == os.path.abspath(tiny_bert_no_dropout) and len(enc["weights_sha256"]) == 64
    assert src["path"] == str(trained / "en.txt") and len(src["sha256"]) == 64
    found = adaptation_inputs(trained / "best")
    assert found.checked and found.encoder == os.path.abspath(tiny_bert_no_dropout)

    moved = shutil.copytree(tiny_bert_no_dropout, tmp_path / "moved-encoder")
    assert adaptation_inputs(trained / "best", encoder=str(moved)).checked
    other = tmp_path / "en-edited.txt"
    other.write_text((trained / "en.txt").read_text() + "Extra O\n\n")
    with pytest.raises(ValueError, match=r"English source .* differs .* pass --source FILE"):
        adaptation_inputs(trained / "best", source=str(other))
    (moved / "model.safetensors").write_bytes((moved / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match=r"retrieval encoder .* differ.* pass --encoder FOLDER"):
        adaptation_inputs(trained / "best", encoder=str(moved))


def test_an_encoder_that_is_not_on_this_machine_is_named_before_any_work(trained, tmp_path):
    from jobs.inputs import adaptation_inputs
    from trainer.training.checkpoint import META_FILE

    copy = shutil.copytree(trained / "best", tmp_path / "best")
    meta = json.loads((copy / META_FILE).read_text())
    meta["provenance"]["retrieval_encoder"]["name_or_path"] = str(tmp_path / "gone")
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"encoder in .*gone, which is not on this machine; pass --encoder FOLDER"):
        adaptation_inputs(copy)
    meta["provenance"]["retrieval_encoder"].update(kind="hub", name_or_path="nobody/not-cached-model")
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"not in this machine's Hugging Face cache .*pass --encoder"):
        adaptation_inputs(copy)


def test_a_checkpoint_given_as_an_encoder_loads_its_own_encoder(trained):
    import torch

    from trainer.training.checkpoint import load_encoder, load_model

    encoder = load_encoder(str(trained / "best"))
    reference = load_model(trained / "best")[0].encoder
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), reference.state_dict().values()))


def test_a_checkpoint_is_used_with_its_own_settings_and_overrides_of_how_only(trained):
    from trainer.training.adapt import Adapter
    from trainer.training.checkpoint import use_config
    from trainer.utils.errors import ConfigError

    folder = trained / "best"
    cfg = use_config(folder)
    assert (cfg.model.max_length, cfg.adapt.adapt_lr, cfg.model.num_frozen_layers) == (32, 1e-3, 1)  # not the defaults
    used = use_config(folder, ["adapt.adapt_lr=1e-4", "retrieval.k=1", ("cluster.num_adapter_actors", 3),
                               "train.precision=bf16", "data.target_sample=5", "model.max_length=32"])
    assert (used.adapt.adapt_lr, used.retrieval.k, used.cluster.num_adapter_actors, used.train.precision,
            used.data.target_sample, used.model.max_length) == (1e-4, 1, 3, "bf16", 5, 32)
    with pytest.raises(ConfigError) as refused:
        use_config(folder, ["model.max_length=64", "adapt.adapt_lr=1e-4", "train.loss_positions=all"])
    assert [p.split(":")[0] for p in refused.value.problems] == ["model.max_length=64", "train.loss_positions='all'"]
    assert "was trained with 32, and model.max_length is part of what a checkpoint means" in str(refused.value)
    # Given no settings, the Adapter reads the checkpoint's windows and adaptation, not the defaults.
    adapter = Adapter(str(folder))
    assert adapter.featurizer.max_length == 32 and adapter.featurizer.context == 4
    assert adapter.cfg.adapt.adapt_lr == 1e-3


def test_evaluate_and_tag_take_the_checkpoints_settings_and_refuse_changing_them(trained, tmp_path, capsys):
    import logging

    from jobs.evaluate import checkpoint_config
    from jobs.tag import main
    from trainer.config import load_config
    from trainer.utils.errors import ConfigError

    folder = str(trained / "best")
    job = load_config(None, ["data.target_sample=7", "cluster.num_adapter_actors=3", "model.max_length=256"])
    cfg = checkpoint_config(folder, job, ["adapt.num_adapt_steps=2"])
    assert (cfg.model.max_length, cfg.adapt.adapt_lr, cfg.adapt.num_adapt_steps) == (32, 1e-3, 2)
    assert (cfg.data.target_sample, cfg.cluster.num_adapter_actors) == (7, 3)  # the job's data and actors
    with pytest.raises(ConfigError, match=r"^model\.max_length=256: checkpoint .* was trained with 32"):
        checkpoint_config(folder, job, ["model.max_length=256"])
    argv = ["--checkpoint", folder, "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"),
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", "model.window_context=8"]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert main(argv) == 2
    finally:  # the job's console handler writes to this test's captured stderr, closed after it
        root.handlers[:] = handlers
        root.setLevel(level)
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: model.window_context=8: checkpoint ")


# --------------------------------------------------------------------------- on Ray


def test_actors_the_cluster_cannot_place_are_refused_before_any_work(ray_local):
    from cluster.runtime import _per_node, check_resources
    from trainer.config import load_config

    one_each = ["cluster.num_embed_actors=1", "cluster.num_index_shards=1"]
    with pytest.raises(ValueError, match=r"times cluster.gpus_per_actor asks for 2 GPUs at once but the Ray cluster has 0"):
        check_resources(load_config(None, one_each + ["cluster.gpus_per_actor=0.5", "cluster.cpus_per_actor=0.25"]),
                        ("tag",))
    with pytest.raises(ValueError, match=r"num_adapter_actors, times cluster.cpus_per_actor asks for 3 CPUs"):
        check_resources(load_config(None, one_each + ["cluster.num_adapter_actors=4", "cluster.cpus_per_actor=0.5"]),
                        ("tag",))
    # On several nodes the total may suffice where no single node can hold one actor.
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}]
    assert _per_node(nodes, {"CPU": 1.0, "GPU": 0.5}, "k") == []
    assert "no node of the Ray cluster has that much (the largest has 2 CPU, 1 GPU)" in \
        _per_node(nodes, {"CPU": 3.0, "GPU": 0.5}, "k")[0]
    check_resources(load_config(REPO / "jobs/configs/tag.yaml"), ("tag",))  # the defaults fit 2 CPUs
    assert ray_local.available_resources().get("CPU") == 2.0  # nothing was started


def _run_tag(argv) -> int:
    from jobs.tag import run

    return run(argv)


@pytest.mark.slow
def test_tag_a_folder_exactly_in_input_order_and_resume(ray_local, trained, toy_corpus, tmp_path, capsys):
    words = _text_folder(tmp_path / "in", toy_corpus)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(trained / "best"), "--input", str(tmp_path / "in"), "--out", str(out), "--conll",
            "--soft", *_JOB]
    assert _run_tag(argv) == 0
    printed = capsys.readouterr().out
    rows = _read_parts(out)
    assert [r["sentence"] for r in rows] == list(range(len(words)))
    assert [r["words"] for r in rows] == words
    reference = _reference(trained, words, soft=True)
    assert [r["tags"] for r in rows] == [tags for tags, _ in reference]
    assert len(list(out.glob("part-*.jsonl"))) == 3 and len(list(out.glob("part-*.conll"))) == 3
    _assert_soft_equal(out, reference)
    assert "sentences  20" in printed and str(out) in printed and "wall time" in printed

    # An interrupted run leaves whole shards only; started again, it writes just the missing ones.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    os.unlink(out / "part-000001.jsonl")
    os.unlink(out / "part-000001.conll")
    (out / ".part-000002.jsonl.tmp").write_text("cut short")
    assert _run_tag(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert {k for k in after if after[k] != before.get(k)} == {"part-000001.jsonl", "part-000001.conll",
                                                               "part-000001.soft.npy"}
    assert [r["tags"] for r in _read_parts(out)] == [r["tags"] for r in rows]
    _assert_soft_equal(out, reference)

    # Other inputs in the same --out are refused before any work, naming the difference.
    (tmp_path / "in/a.txt").write_text("Something else .\n")
    with pytest.raises(ValueError, match=r"holds work made with other inputs: input.digest"):
        _run_tag(argv)


@pytest.mark.slow
def test_a_killed_adapter_actor_loses_no_sentence_and_writes_none_twice(ray_local, trained, toy_corpus, tmp_path):
    from types import SimpleNamespace

    from cluster.tag_stream import TagStream
    from jobs.tag import open_input, prepare, sentences
    from jobs.textio import ShardWriter, shards
    from retrieval.cache import RetrievalCache
    from trainer.config import load_config
    from trainer.data.corpus import read_corpus

    words = _text_folder(tmp_path / "in", toy_corpus, n_per_lang=8)
    args = SimpleNamespace(checkpoint=str(trained / "best"), encoder=None, source=None, lang=None, format="auto",
                           overrides=_JOB)
    cfg, found = prepare(load_config(REPO / "jobs/configs/tag.yaml", _JOB), args)
    inputs, _ = open_input([str(tmp_path / "in")], cfg, args)
    writer, written = ShardWriter(tmp_path / "out"), []
    stream = TagStream(found.checkpoint, found.encoder, cfg, read_corpus(found.source).sentences,
                       RetrievalCache(cfg.retrieval.cache_dir))
    victim = stream.pool.pids()[0]

    def write(shard):
        written.append(shard.number)
        writer.write(shard.number, shard.first, shard.sentences, shard.wheres, shard.tags)
        if len(written) == 1:  # mid-run: the other shards are being retrieved and adapted
            os.kill(victim, signal.SIGKILL)

    try:
        stream.run(shards(sentences(inputs), cfg.tag.shard_size), write)
        assert victim not in stream.pool.pids(), "the actor was not killed and replaced"
    finally:
        stream.close()
    rows = _read_parts(tmp_path / "out")
    assert sorted(written) == list(range(5))  # each shard written once
    assert [r["sentence"] for r in rows] == list(range(len(words)))
    assert [r["tags"] for r in rows] == _reference(trained, words)


@pytest.mark.slow
def test_chinese_is_tagged_by_character_and_read_unspaced(ray_local, trained, tmp_path):
    text = "江泽民访问美国。他在北京见了李鹏！\n"
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(trained / "best"), "--input", str(tmp_path / "zh.txt"), "--out", str(out),
            "--lang", "zh", *_JOB]
    assert _run_tag(argv) == 0
    rows = _read_parts(out)
    assert [r["words"] for r in rows] == [list("江泽民访问美国。"), list("他在北京见了李鹏！")]
    assert all(len(r["tags"]) == len(r["words"]) for r in rows)
    assert [r["tags"] for r in rows] == _reference(trained, [r["words"] for r in rows], unspaced=True)
    for r in rows:
        for e in r["entities"]:
            assert e["text"] == "".join(r["words"][e["start"]:e["end"]])  # joined without spaces


@pytest.mark.slow
def test_predict_prints_entities_on_the_same_path(ray_local, trained, toy_corpus, tmp_path, capsys):
    from jobs.predict import run

    sentence = " ".join(toy_corpus["de"][0].words)
    argv = ["--checkpoint", str(trained / "best"), "--text", sentence, "--out", str(tmp_path / "p"), *_JOB]
    assert run(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == sentence and printed[1].startswith("  ")
    assert run(argv) == 0  # asked again: printed from what is there
    assert capsys.readouterr().out.splitlines() == printed

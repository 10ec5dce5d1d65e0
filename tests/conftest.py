"""Shared fixtures: paths to the shared corpora and models, and a tiny BERT built on the fly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("METANER_SHARED", REPO.parent / "shared"))
DATA = Path(os.environ.get("METANER_DATA", SHARED / "data"))
MODELS = SHARED / "models"

# Ray reads this when it is imported: set before any test imports it, so that every node and
# MASTER_ADDR stay on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Two tiers. A bare `pytest` (no paths, no -m) runs the suite and leaves out the end-to-end
    tier (`slow`: whole jobs on their own Ray clusters, killed and restarted workers and jobs, the
    benchmark scripts), whose time goes to process start-ups: tens of processes a run, each
    importing torch, transformers and DeepSpeed. `-m slow` runs that tier; a file or test id named
    on the command line runs what it names, slow or not. Not `addopts = -m "not slow"`, which
    would deselect a slow test even when it is named."""
    if config.option.markexpr or config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def load_job_config(path):
    """A job's YAML loaded as the job loads it; skipped, saying why, where it names a model under
    ../shared and that folder is not beside the checkout (the setting that reads it does not load)."""
    from jobs.environment import load_job_config as load
    from trainer.config import ConfigError

    try:
        return load(path)
    except ConfigError as err:
        if "shared/" in str(err) and not SHARED.is_dir():
            pytest.skip(f"{Path(path).name} names a model under {SHARED}, which is absent: {err}")
        raise


needs_data = pytest.mark.skipif(not (DATA / "meta-cross").is_dir(),
                                reason=f"shared corpora not found at {DATA} (set METANER_DATA)")
needs_tiny_6l = pytest.mark.skipif(not (MODELS / "bert-tiny-6l").is_dir(),
                                   reason=f"model of record not found at {MODELS / 'bert-tiny-6l'}")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "meta-cross").is_dir():
        pytest.skip(f"shared corpora not found at {DATA} (set METANER_DATA)")
    return DATA


@pytest.fixture(scope="session")
def toy_corpus():
    """Synthetic English train and per-language test sentences (deterministic)."""
    from jobs.synthetic import TEMPLATES, make_sentences

    return {lang: make_sentences(lang, 60 if lang == "en" else 20, seed=1) for lang in TEMPLATES}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, toy_corpus) -> str:
    """A 2-layer, hidden-64 BERT with a WordPiece vocabulary trained on the toy corpus, saved and
    reloadable with from_pretrained offline."""
    from jobs.tiny import build_tiny_bert

    texts = [s.words for sentences in toy_corpus.values() for s in sentences]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts, num_layers=2, hidden=64, vocab_size=500)


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory, toy_corpus) -> str:
    """The same tiny BERT with every dropout off, for exact equivalence tests."""
    from jobs.tiny import build_tiny_bert

    texts = [s.words for sentences in toy_corpus.values() for s in sentences]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), texts, num_layers=2, hidden=64,
                           vocab_size=500, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture(scope="session")
def e5_tokenizer():
    """multilingual-e5-small's tokenizer (XLM-R's sentencepiece vocabulary)."""
    from transformers import AutoTokenizer

    if not (MODELS / "me5-small-ner").is_dir():
        pytest.skip(f"pretrained encoder not found at {MODELS / 'me5-small-ner'}")
    return AutoTokenizer.from_pretrained(MODELS / "me5-small-ner")


@pytest.fixture(scope="session")
def tiny_encoder_e5_vocab(e5_tokenizer):
    """A 2-layer, hidden-32 random BERT over e5's vocabulary, no dropout: real sentencepiece
    pieces at the cost of a tiny model."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(e5_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=e5_tokenizer.pad_token_id, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


def zh_sentences(n: int, unspaced: bool = True):
    """The first `n` sentences of WikiANN zh (MISC to O, as the jobs read it), marked unspaced."""
    from dataclasses import replace

    from trainer.data.corpus import read_corpus

    path = DATA / "raw/panx/dev-zh.tsv"
    if not path.is_file():
        pytest.skip(f"WikiANN zh not found at {path} (set METANER_DATA)")
    return [replace(s, unspaced=unspaced) for s in read_corpus(path, misc_to_o=True).sentences[:n]]


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU, 0-GPU Ray cluster bound to 127.0.0.1 for the whole session, shut down at its end:
    the tests that check placement against the cluster's resources expect no GPU, and Ray would
    count the machine's own.

    Tests that make actors must kill them when done: actors hold their CPUs until then.
    """
    import ray

    from cluster.runtime import init_ray

    started = not ray.is_initialized()
    if started:
        # The project's own start-up path, so that the tests see the loopback binding it enforces.
        init_ray(num_cpus=2, num_gpus=0, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_bert_no_dropout, toy_corpus, tmp_path_factory) -> Path:
    """A folder holding `best`, a checkpoint of the tiny BERT saved as training saves it (with its
    config, so that it records its retrieval encoder and English source), and that source, en.txt."""
    from transformers import AutoTokenizer

    from jobs.synthetic import write_corpus
    from trainer.config import load_config
    from trainer.modules.model import build_model
    from trainer.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "en.txt", toy_corpus["en"])
    settings = ["model.dropout=0.0", "model.num_frozen_layers=1", "model.max_length=32", "model.window_context=4",
                "adapt.batch_size=4", "adapt.adapt_lr=1e-3", "retrieval.k=2"]
    cfg = load_config(None, settings + [f"model.name_or_path={tiny_bert_no_dropout}", f"data.root={root}",
                                        "data.source_train=en.txt", f"retrieval.cache_dir={root / 'cache'}"])
    save_checkpoint(root / "best", build_model(cfg, seed=3), tokenizer=AutoTokenizer.from_pretrained(tiny_bert_no_dropout),
                    config=cfg)
    return root


# The demo at its smallest that still runs every stage (2 meta-steps, 10 sentences a language),
# with settings that cannot fit one 1-CPU node: the two training workers, the embedding actor and
# the index shard, and the two adapter actors each land one on each node of a two-node cluster.
SMALL_DEMO = ["train.num_meta_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.target_sample=10",
              "data.dev_sample=10", "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.num_embed_actors=1",
              "cluster.num_index_shards=1", "cluster.num_adapter_actors=2", "cluster.cpus_per_actor=0.75",
              "cluster.task_balance=static"]


def run_demo(out: Path, *extra: str, cwd: Path, env: dict | None = None):
    """`python -m jobs.demo --out out SMALL_DEMO extra`, its own local Ray cluster unless `env`
    names one; stdout and stderr as text."""
    own = env is None
    env = dict(os.environ if own else env)
    env.pop("METANER_VERBOSE", None)
    if own:
        env.pop("RAY_ADDRESS", None)
    # Bytes: text mode would read each carriage return of a bar as a line end.
    result = subprocess.run([sys.executable, "-m", "jobs.demo", "--out", str(out), *SMALL_DEMO, *extra],
                            capture_output=True, cwd=cwd, env=env, timeout=900)
    result.stdout, result.stderr = (b.decode("utf-8", "replace") for b in (result.stdout, result.stderr))
    return result


@pytest.fixture(scope="session")
def one_node_demo(tmp_path_factory):
    """The small demo run once with --verbose on a local one-node cluster: (result, tmp folder, out).
    Shared by the test of what --verbose shows and the two-node test, whose reference it is
    (--verbose changes what the console shows, not what is computed)."""
    tmp = tmp_path_factory.mktemp("one-node-demo")
    out = tmp / "one"
    result = run_demo(out, f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                      f"cluster.storage_path={tmp / 'storage'}", "--verbose", cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result, tmp, out


def set_dropout(model, p: float) -> None:
    """Set every dropout of the model, encoder included (`NerModel`'s own `dropout` is the head's only)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p

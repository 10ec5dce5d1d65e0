import pytest

from trainer.config import Config, load_config


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.retrieval.k == 2 and cfg.train.mask_ratio == 0.2 and cfg.train.lambda_max == 2.0
    assert cfg.train.num_inner_steps == 2 and cfg.train.meta_batch_size == 32
    assert cfg.train.num_meta_steps == 3001 and cfg.train.eval_every == 300
    assert cfg.train.inner_lr == cfg.train.meta_lr == 3e-5 and cfg.train.warmup_proportion == 0.1
    assert cfg.adapt.adapt_lr == 1e-5 and cfg.adapt.num_adapt_steps == 1
    assert cfg.model.max_length == 128 and cfg.model.num_frozen_layers == 4
    assert cfg.model.name_or_path == "bert-base-multilingual-cased"
    assert cfg.train.seeds == [95, 495, 539, 667, 806]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  meta_batch_size: 8\nretrieval:\n  pooling: mean\n")
    cfg = load_config(path, ["train.meta_batch_size=16", "data.targets=[es, nl]", "train.meta_lr=1e-4"])
    assert cfg.train.meta_batch_size == 16
    assert cfg.retrieval.pooling == "mean"
    assert cfg.data.targets == ["es", "nl"]
    assert cfg.train.meta_lr == pytest.approx(1e-4)


@pytest.mark.parametrize("override, key", [
    ("train.meta_batchsize=3", "train.meta_batchsize"),
    ("train.meta_batch_size=abc", "train.meta_batch_size"),
    ("train.meta_lr=-1", "train.meta_lr"),
    ("train.mask_ratio=1.5", "train.mask_ratio"),
    ("retrieval.pooling=max", "retrieval.pooling"),
    ("data.targets=[]", "data.targets"),
    ("data.targets=[xx]", "data.targets"),
    ("model.dropout=true", "model.dropout"),
    ("cluster.zero_stage=3", "cluster.zero_stage"),
    ("data.unspaced_languages=[xx]", "data.unspaced_languages"),
    ("data.unspaced_languages=zh", "data.unspaced_languages"),
    ("nosection.key=1", "nosection"),
])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_literal_error_lists_allowed_values():
    with pytest.raises(ValueError, match="'cls', 'mean'"):
        load_config(overrides=["retrieval.pooling=max"])


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flat_params_cover_every_section():
    flat = Config().flat()
    assert flat["train.meta_batch_size"] == 32
    assert flat["data.target_files.fr"].endswith("#test")
    assert any(k.startswith("cluster.") for k in flat) and any(k.startswith("mlflow.") for k in flat)


def test_data_root_from_environment(monkeypatch):
    cfg = load_config()
    monkeypatch.setenv("METANER_DATA", "/corpora")
    assert cfg.data.resolve("meta-cross/en/train.txt") == "/corpora/meta-cross/en/train.txt"
    assert cfg.data.resolve("raw/europeana/enp_FR.bnf.bio#test") == "/corpora/raw/europeana/enp_FR.bnf.bio#test"


def test_mapping_override_changes_one_key():
    cfg = load_config(overrides=["data.target_files.fr=my/fr.txt"])
    assert cfg.data.target_files["fr"] == "my/fr.txt" and cfg.data.target_files["es"] == "meta-cross/es/test.txt"


def test_unspaced_languages_default_to_chinese_and_can_be_emptied():
    assert load_config().data.unspaced_languages == ["zh"]
    assert load_config(overrides=["data.unspaced_languages=[]"]).data.unspaced_languages == []
    # Another unspaced script is a target like any other once it has a test file.
    cfg = load_config(overrides=["data.target_files.ja=raw/ja.tsv", "data.unspaced_languages=[zh, ja]"])
    assert cfg.data.unspaced_languages == ["zh", "ja"]


def test_a_file_includes_shared_blocks_first_and_overrides_them(tmp_path):
    """`include:` files (relative to the including file) apply first; the file itself wins; errors
    name the included file and who included it; a loop is refused."""
    from trainer.config import ConfigError

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "gpu.yaml").write_text("cluster:\n  num_workers: 4\n  use_gpu: true\n")
    (tmp_path / "job.yaml").write_text("# job\ninclude: shared/gpu.yaml\ncluster:\n  num_workers: 8\n")
    cfg = load_config(tmp_path / "job.yaml")
    assert (cfg.cluster.num_workers, cfg.cluster.use_gpu) == (8, True)
    (tmp_path / "shared" / "bad.yaml").write_text("cluster:\n  num_workers: many\n")
    cases = {"job2.yaml": ("include: [shared/gpu.yaml, shared/bad.yaml]\n",
                           r"shared/bad.yaml \(included by .*job2.yaml\):2: .*num_workers"),
             "job3.yaml": ("include: shared/none.yaml\n", r"shared/none.yaml \(included by .*job3.yaml\) does not exist"),
             "loop.yaml": ("include: loop.yaml\n", r"loop.yaml .* includes itself"),
             "job4.yaml": ("include: {a: 1}\n", r"job4.yaml:1: include: give a file name or a list")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / name)


def test_the_paper_scale_jobs_share_one_gpu_cluster_block():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    shared = load_config(configs / "shared" / "gpu_cluster.yaml").cluster
    for name in ("pipeline", "ablation", "replicate", "meta_train", "evaluate", "build_index", "low_resource"):
        text = (configs / f"{name}.yaml").read_text()
        assert "include: shared/gpu_cluster.yaml" in text and "\ncluster:" not in text, name
        assert load_config(configs / f"{name}.yaml").cluster == shared, name

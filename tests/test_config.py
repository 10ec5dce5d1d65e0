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


def test_values_load_offline_and_what_they_point_at_is_asked_where_a_job_starts(tmp_path):
    """trainer.config reads no folder, store or network: a model folder that is not there loads as
    a value and is refused, naming it, by the job's loader (jobs.environment)."""
    from jobs.environment import load_job_config
    from trainer.config import ConfigError

    overrides = [f"model.name_or_path={tmp_path / 'gone'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/no/m.db"]
    assert load_config(overrides=overrides).model.name_or_path == str(tmp_path / "gone")
    with pytest.raises(ConfigError) as err:
        load_job_config(overrides=overrides)
    assert "model.name_or_path:" in str(err.value) and "of the sqlite store does not exist" in str(err.value)


def test_a_config_is_frozen_and_changed_by_overrides_into_a_new_checked_one():
    from pydantic import ValidationError

    from trainer.config import ConfigError, with_overrides

    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.meta_lr = 1.0
    changed = with_overrides(cfg, [("train.meta_lr", 1e-4), "data.target_files.fr=my/fr.txt"])
    assert (changed.train.meta_lr, cfg.train.meta_lr) == (1e-4, 3e-5)
    assert changed.data.target_files["es"] == cfg.data.target_files["es"]
    with pytest.raises(ConfigError, match="train.meta_lr: must be positive"):
        with_overrides(cfg, [("train.meta_lr", -1.0)])


@pytest.mark.parametrize("override, message", [
    ("train.meta_batch_size=true", "train.meta_batch_size: expected an integer, got True"),
    ("train.seeds=[1, '2']", "train.seeds.1: expected an integer, got '2'"),
    ("model.name_or_path=3", "model.name_or_path: expected a string, got 3"),
    ("adapt.enabled=1", "adapt.enabled: expected true or false, got 1"),
    ("train.meta_lr=.nan", "train.meta_lr: expected a finite number, got nan"),
    ("train.meta_lr=1e999", "train.meta_lr: expected a finite number, got inf"),
    ("train.meta_lr=3e-5", None),  # YAML 1.1 reads it as a string: read as the number meant
    ("cluster=3", "cluster: expected a mapping of address, num_workers"),
    ("train.meta_lrr=1", "unknown key 'train.meta_lrr'; allowed keys here: train.mode, train.num_inner_steps"),
])
def test_types_are_strict_and_every_message_names_its_key(override, message):
    from trainer.config import ConfigError

    if message is None:
        assert load_config(overrides=[override]).train.meta_lr == 3e-5
        return
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value), str(err.value)


def test_all_problems_at_once_types_and_ranges_of_the_keys_that_loaded(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  meta_batch_size: many\n  mask_ratio: 1.5\nretrieval:\n  k: 0\n")
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(path, ["adapt.adapt_lr=-1"])
    text = str(err.value)
    assert "4 problems" in text and f"{path}:2: train.meta_batch_size: expected an integer, got 'many'" in text
    assert "train.mask_ratio: must be in [0, 1]" in text and "retrieval.k: must be at least 1" in text
    assert "adapt.adapt_lr: must be positive" in text


def test_every_setting_says_what_changing_it_changes():
    """No default hides what a setting changes: each field carries its roles, and the ones that
    were lists beside the config read from the fields (tagging's settings resume meta-training)."""
    from trainer.config import Config, affects, roles

    for key in Config().flat():
        assert set(roles(key)) == {"results", "resume", "use"}, key
    assert not affects("tag.shard_size", "resume") and not affects("tag.shard_size", "results")
    assert affects("train.meta_lr", "resume") and not affects("train.meta_lr", "use")
    assert affects("adapt.adapt_lr", "use") and affects("adapt.adapt_lr", "results")
    assert not affects("data.target_files.fr", "results")  # counted by the file's content instead
    assert affects("model.num_frozen_layers", "resume") and not affects("model.num_frozen_layers", "use")
    with pytest.raises(KeyError):
        roles("train.no_such_key")

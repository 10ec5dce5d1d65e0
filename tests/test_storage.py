"""The job's shared storage: where it is, models published and fetched through pyarrow's
filesystems (a folder or a URI), the newest complete checkpoint found, and the setting checked."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.storage import fetch, job_storage, join, list_dirs, pack, publish, unpack
from trainer.config import ConfigError, load_config


def test_each_job_gets_a_folder_of_its_own(tmp_path):
    unset = load_config(None, [])
    assert job_storage(unset, tmp_path / "seed95") == str(tmp_path / "seed95" / "ray")
    shared = load_config(None, ["cluster.storage_path=s3://bucket/metaner"])
    a, b = job_storage(shared, tmp_path / "a" / "seed95"), job_storage(shared, tmp_path / "b" / "seed95")
    assert a.startswith("s3://bucket/metaner/seed95-") and b.startswith("s3://bucket/metaner/seed95-") and a != b
    assert job_storage(shared, tmp_path / "a" / "seed95") == a  # the same job finds its own again


@pytest.mark.parametrize("uri", [False, True])
def test_a_published_folder_is_replaced_whole_and_fetched_back(tmp_path, uri):
    root = f"file://{tmp_path / 'store'}" if uri else str(tmp_path / "store")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"one")
    (model / "sub" / "a.json").write_text("{}")
    publish(model, join(root, "best"))
    (model / "weights.bin").write_bytes(b"two")
    (model / "sub" / "a.json").unlink()
    publish(model, join(root, "best"))
    got = fetch(join(root, "best"), tmp_path / "out" / "best")
    assert (got / "weights.bin").read_bytes() == b"two" and not (got / "sub" / "a.json").exists()
    assert [Path(p).name for p in list_dirs(root)] == ["best"], "no staging folder left behind"
    assert fetch(join(root, "missing"), tmp_path / "out" / "missing") is None


def test_the_newest_complete_checkpoint_is_found_on_a_uri(tmp_path):
    from cluster.meta_train import latest_checkpoint

    run = tmp_path / "store" / "meta-seed95"
    for name, complete in (("checkpoint_2026-12-01_10-00-00.000001", True),
                           ("checkpoint_2026-12-01_11-00-00.000001", True),
                           ("checkpoint_2026-12-01_12-00-00.000001", False)):  # cut short by a kill
        (run / name).mkdir(parents=True)
        if complete:
            (run / name / "trainer_state.pt").write_bytes(b"x")
    found = latest_checkpoint(f"file://{tmp_path / 'store'}", "meta-seed95")
    assert found.endswith("checkpoint_2026-12-01_11-00-00.000001")
    assert latest_checkpoint(str(tmp_path / "store"), "other") is None


def test_a_checkpoint_travels_as_its_files(tmp_path):
    (tmp_path / "ck" / "d").mkdir(parents=True)
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00\x01")
    (tmp_path / "ck" / "d" / "x.txt").write_text("y")
    back = unpack(pack(tmp_path / "ck"), tmp_path / "copy")
    assert (back / "model.safetensors").read_bytes() == b"\x00\x01" and (back / "d" / "x.txt").read_text() == "y"


def test_storage_path_must_be_absolute_or_a_uri():
    with pytest.raises(ConfigError, match=r"cluster.storage_path: 'shared/x': give an absolute folder"):
        load_config(None, ["cluster.storage_path=shared/x"])
    assert load_config(None, ["cluster.storage_path=gs://b/p"]).cluster.storage_path == "gs://b/p"


def test_one_node_has_nothing_to_share(ray_local, tmp_path):
    from cluster.storage import shared_problems

    cfg = load_config(None, [f"model.prefix_cache_dir={tmp_path / 'prefix'}"])
    assert shared_problems(cfg, str(tmp_path / "ray")) == []

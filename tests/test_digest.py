import os
from pathlib import Path

from trainer.utils.digest import file_sha256, files_sha256, values_sha256


def test_digests_follow_content_names_and_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Anna Berg\n"), b.write_text("Madrid\n")
    before = files_sha256([a, b])
    assert files_sha256([a, b]) == before != files_sha256([b, a])
    assert files_sha256([a, b], label=os.path.abspath) != before
    b.write_text("Madrid !\n")
    os.utime(b, ns=(1, 1))  # a changed file is hashed again even with an old mtime (its size changed)
    assert files_sha256([a, b]) != before
    assert len(file_sha256(a)) == 64


def test_values_digest_ignores_key_order_and_writes_what_json_cannot():
    assert values_sha256({"a": 1, "b": [2, 3]}) == values_sha256({"b": [2, 3], "a": 1})
    assert len(values_sha256({"path": Path("/data/en/train.txt")}, 32)) == 32

"""The CPU replication and the paper-scale run differ only in the values marked as reductions."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import load_job_config
from trainer.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _marked_reductions(path: Path) -> set[str]:
    """Dotted keys (or whole sections) whose YAML line follows a '# reduction:' comment."""
    keys, section, marked = set(), None, False
    for line in path.read_text().splitlines():
        if re.match(r"\s*# reduction:", line):
            marked = True
            continue
        m = re.match(r"(\s*)(\w+):", line)
        if line.lstrip().startswith("#") or not m:
            continue
        indent, key = m.groups()
        section = key if not indent else section
        if marked:
            keys.add(key if not indent else f"{section}.{key}")
        marked = False
    return keys


def test_cpu_replication_differs_from_the_paper_scale_only_in_marked_reductions():
    cpu, full = load_job_config(CONFIGS / "replicate_cpu.yaml"), load_config(CONFIGS / "replicate.yaml")
    differ = {k for k, v in cpu.flat().items() if full.flat()[k] != v}
    reductions = _marked_reductions(CONFIGS / "replicate_cpu.yaml")
    unmarked = {k for k in differ if k not in reductions and k.split(".")[0] not in reductions}
    assert not unmarked, f"values that differ without a '# reduction:' reason: {sorted(unmarked)}"
    assert {"model.name_or_path", "data.target_sample", "train.num_meta_steps", "train.seeds"} <= differ
    # The paper's scale: mBERT, 3001 meta-steps of 32 tasks, 5 seeds, full test sets.
    assert full.model.name_or_path == "bert-base-multilingual-cased"
    assert (full.train.num_meta_steps, full.train.meta_batch_size, len(full.train.seeds)) == (3001, 32, 5)
    assert full.data.target_sample == 0
    # The CPU budget: every meta-trained row sees English train (14,041 sentences) once as queries,
    # 32 tasks a step as in the paper, English-dev selection at least every 50 steps.
    assert cpu.train.meta_batch_size == 32 and cpu.train.num_meta_steps * 32 >= 14_041
    assert cpu.train.eval_every <= 50 and cpu.data.target_sample >= 1000
    # Every corpus path is relative to the one data-root setting.
    for cfg in (cpu, full):
        assert not any(Path(p.partition("#")[0]).is_absolute() for p in cfg.data.target_files.values())
        assert cfg.data.resolve(cfg.data.target_files["zh"]).startswith(cfg.data.root)

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


def test_deep_replication_is_the_cpu_one_at_the_papers_freezing():
    """replicate_cpu_deep.yaml: replicate_cpu.yaml with embeddings + 4 of 12 layers frozen (the
    official code's), the same one-pass budget; what else differs is marked as a reduction or is
    the learning rate chosen on English dev."""
    deep_path = CONFIGS / "replicate_cpu_deep.yaml"
    deep, shallow = load_job_config(deep_path), load_job_config(CONFIGS / "replicate_cpu.yaml")
    full = load_config(CONFIGS / "replicate.yaml")
    assert deep.model.num_frozen_layers == full.model.num_frozen_layers == 4
    assert shallow.model.num_frozen_layers == 11
    differ = {k for k, v in deep.flat().items() if shallow.flat()[k] != v}
    chosen = {"train.meta_lr", "train.classifier_lr_scale"}
    assert differ - chosen - _marked_reductions(deep_path) == {"model.num_frozen_layers"}
    assert deep.train.num_meta_steps * deep.train.meta_batch_size >= 14_041 and deep.train.meta_batch_size == 32
    assert deep.train.num_meta_steps == shallow.train.num_meta_steps
    assert deep.data.target_sample >= 500 and deep.mlflow.experiment != shallow.mlflow.experiment

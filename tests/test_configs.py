"""Every shipped training config parses into its stage's config (unknown fields and bad values would be errors), and
the real-data examples show the fields a user needs: train_data, eval_data, image_root, max_steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from glimpseprune.training.stage1 import Stage1Config
from glimpseprune.training.stage2 import Stage2Config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path):
    cfg = load_config(path)
    stage2 = "stage: 2" in path.read_text()  # step B (stage2_world_step_b) is a stage-1 run on the adapted model
    assert isinstance(cfg, Stage2Config if stage2 else Stage1Config)
    assert path.read_text().startswith(f"# glimpseprune train --config configs/{path.name}")


@pytest.mark.parametrize("name", ["stage1_visual_cot_7b.yaml", "stage2_visual_cot_7b.yaml"])
def test_real_data_examples_show_the_data_fields(name):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_config(path)
    assert cfg.train_data and cfg.eval_data and cfg.image_root and cfg.max_steps != 0
    assert "max_steps" in path.read_text() and "image_root" in path.read_text()

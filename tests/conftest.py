"""Shared fixtures: composed Hydra configs on tiny synthetic data, outputs in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
REAL = ROOT.parent / "shared" / "data" / "real"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A few hundred users: preprocessing in well under a second, an epoch in a few seconds.
TINY_DATA = [
    "data.source.spec.num_users=150",
    "data.source.spec.num_items=300",
    "data.source.spec.num_cates=12",
    "data.batch_size=64",
    "data.eval_batch_size=128",
]
TINY_MODEL = ["model.net.embed_dim=8", "model.net.num_heads=2", "model.net.mlp_dims=[32,16]"]


def compose_cfg(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Composes a real config from conf/ as the CLI would, with every path under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to the task
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def cfg_train_tiny(tmp_path: Path) -> DictConfig:
    return compose_cfg(
        "train.yaml",
        [*TINY_DATA, *TINY_MODEL, "trainer=cpu", "trainer.max_epochs=1", "logger=csv"],
        tmp_path,
    )

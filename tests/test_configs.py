"""Every conf/model x conf/data composes and instantiates; every experiment/debug preset composes."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from seqrank.data.types import Schema
from tests.conftest import CONF, TINY_DATA, compose_cfg

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATAS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


@pytest.mark.parametrize("data", DATAS)
@pytest.mark.parametrize("model", MODELS)
def test_model_data_compose_and_instantiate(model: str, data: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"model={model}", f"data={data}"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.name == cfg.data.name
    # A Schema shaped like the data source sizes the net without touching raw files.
    behaviors = 5 if "taobao" in data else 2
    schema = Schema(
        name=data,
        num_users=30,
        num_items=50,
        num_cates=7,
        num_behaviors=behaviors,
        behavior_names=("pv", "buy", "cart", "fav")[: behaviors - 1],
        protocol="loo",
    )
    net = hydra.utils.instantiate(cfg.model.net)(schema)
    module = hydra.utils.instantiate(cfg.model, net=net)
    opt = module.configure_optimizers()
    assert isinstance(
        opt if isinstance(opt, torch.optim.Optimizer) else opt["optimizer"], torch.optim.Optimizer
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"experiment={experiment}"], tmp_path)
    assert cfg.model.net._target_


@pytest.mark.parametrize("debug", DEBUGS)
def test_debug_configs_compose(debug: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"debug={debug}"], tmp_path)
    assert "trainer" in cfg


def test_eval_config_needs_ckpt(tmp_path: Path) -> None:
    cfg = compose_cfg("eval.yaml", [], tmp_path)
    from omegaconf import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue):
        _ = cfg.ckpt_path


def test_bad_heads_fail_before_work(tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [*TINY_DATA, "model.net.num_heads=3"], tmp_path)
    schema = Schema(
        name="t",
        num_users=3,
        num_items=5,
        num_cates=3,
        num_behaviors=2,
        behavior_names=("review",),
        protocol="loo",
    )
    with pytest.raises(ValueError, match=r"num_heads=3.*128"):
        hydra.utils.instantiate(cfg.model.net)(schema)


def test_bad_protocol_names_key(tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", ["data.protocol=random"], tmp_path)
    with pytest.raises(Exception, match=r"data\.protocol='random'.*paper.*loo"):
        hydra.utils.instantiate(cfg.data)

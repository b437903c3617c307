"""The models and the training entry point on every device this machine has.

Each test runs on the CPU and, marked `gpu`, on CUDA when a device is present (else that variant
skips). The CUDA variants are what `benchmarks/gpu_check.sh` runs on a lent GPU: there the
attention goes through `F.scaled_dot_product_attention`, the length groups are planned from a
device batch, and the store lives on the device.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import nn

from seqrank.data.types import Batch, Schema
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.tasks import train
from tests.conftest import TINY_DATA, TINY_MODEL, compose_cfg
from tests.models.conftest import make_batch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]
SCHEMA = Schema(
    name="devices",
    num_users=50,
    num_items=120,
    num_cates=9,
    num_behaviors=2,
    behavior_names=("review",),
    protocol="loo",
)


def _net(model: str) -> nn.Module:
    """A small model without dropout whose batches always split into length groups."""
    torch.manual_seed(0)
    if model == "bst":
        net = BST(
            SCHEMA,
            embed_dim=16,
            num_heads=2,
            num_layers=1,
            dropout=0.0,
            max_len=16,
            mlp_dims=[32, 16],
        )
    else:
        net = ATRank(SCHEMA, embed_dim=16, num_heads=2, num_layers=1, max_len=16)
    net.group_cost = 1  # groups cost (almost) nothing: every mixed-length batch is split
    return net


def _batch(seed: int = 1) -> Batch:
    lengths = torch.tensor([0, 16, 1, 2, 3, 5, 8, 16, 4, 9, 11, 2, 7, 13, 6, 1] * 2)
    return make_batch(SCHEMA, B=len(lengths), L=16, seed=seed, lengths=lengths)


def _step(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = net(batch)
    F.binary_cross_entropy_with_logits(logits.float(), batch.label.to(logits.device)).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return logits, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["bst", "atrank"])
def test_training_step_matches_the_float64_padded_model(device: str, model: str) -> None:
    """One float32 step on the device, length groups on, against the same weights in float64
    on the CPU with every batch padded: logits and every gradient."""
    net = _net(model)
    ref = copy.deepcopy(net).double()
    ref.length_groups = 0
    batch = _batch()
    logits, grads = _step(net.to(device), batch.to(device))
    want, want_grads = _step(ref, batch)
    assert logits.device.type == device and logits.dtype == torch.float32
    torch.testing.assert_close(logits.cpu().double(), want.double(), atol=2e-5, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(
            g.cpu().double(),
            want_grads[name],
            atol=2e-5,
            rtol=1e-3,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["bst", "atrank"])
def test_bf16_autocast_step_is_close_to_float32(device: str, model: str) -> None:
    """A bf16-autocast step (`trainer.precision=bf16-mixed`) on the device: finite float32
    gradients for every parameter that gets one in float32, logits within bf16's rounding of
    the float32 step's."""
    net = _net(model).to(device)
    batch = _batch().to(device)
    want, want_grads = _step(copy.deepcopy(net), batch)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        logits = net(batch)
    F.binary_cross_entropy_with_logits(logits.float(), batch.label).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys()
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    scale = want.abs().max().item()
    torch.testing.assert_close(logits.float(), want, atol=0.03 * max(scale, 1.0), rtol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["bst", "atrank"])
def test_bf16_mixed_run_through_the_configs(tmp_path: Path, device: str, model: str) -> None:
    """The README's mixed-precision command on the device, store on the device: a full run
    (train, validate, test) of the tiny data ends with finite metrics."""
    trainer = "cpu" if device == "cpu" else "gpu"
    model_overrides = (
        TINY_MODEL if model == "bst" else ["model.net.embed_dim=8", "model.net.num_heads=2"]
    )
    cfg = compose_cfg(
        "train.yaml",
        [
            *TINY_DATA,
            f"model={model}",
            *model_overrides,
            f"trainer={trainer}",
            "trainer.precision=bf16-mixed",
            "data.device_store=true",
            "trainer.max_epochs=1",
            "callbacks=none",
            "~logger",
        ],
        tmp_path,
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
    metrics, objs = train(cfg)
    assert next(objs["model"].parameters()).device.type == device
    for key in ("val/pairwise_auc", "test/pairwise_auc", "test/logloss"):
        assert math.isfinite(float(metrics[key])), key
    assert 0.0 <= float(metrics["test/pairwise_auc"]) <= 1.0

"""End-to-end training through the real configs, Trainer and DataModule (tiny synthetic data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from seqrank.tasks import evaluate, train
from tests.conftest import ROOT, TINY_DATA, TINY_MODEL, compose_cfg


def test_fast_dev_run(cfg_train_tiny) -> None:
    with open_dict(cfg_train_tiny):
        cfg_train_tiny.trainer.fast_dev_run = True
    metrics, _ = train(cfg_train_tiny)
    assert "train/loss_step" in metrics or "train/loss" in metrics


def test_train_then_eval_round_trip(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "train.yaml", [*TINY_DATA, *TINY_MODEL, "trainer=cpu", "trainer.max_epochs=2"], tmp_path
    )
    metrics, objs = train(cfg)
    out = Path(cfg.paths.output_dir)
    ckpt = metrics["best_ckpt"]
    assert Path(ckpt).exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "csv" / "metrics.csv").exists()
    for key in (
        "val/auc",
        "val/gauc",
        "val/pairwise_auc",
        "val/logloss",
        "test/auc",
        "test/pairwise_auc",
    ):
        assert key in metrics, key
    assert "test/oracle_pairwise_auc" in metrics and "test/popularity_pairwise_auc" in metrics
    assert metrics["test/num_samples"] == objs["datamodule"].schema.split_sizes["test"]

    ecfg = compose_cfg("eval.yaml", [f"ckpt_path={ckpt}", "trainer=cpu"], tmp_path / "eval")
    emetrics, _ = evaluate(ecfg)
    for key in ("test/auc", "test/gauc", "test/pairwise_auc", "test/logloss"):
        assert emetrics[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_seeded_runs_reproduce(tmp_path: Path) -> None:
    results = []
    for run in ("a", "b"):
        cfg = compose_cfg(
            "train.yaml",
            [
                *TINY_DATA,
                *TINY_MODEL,
                "trainer=cpu",
                "trainer.max_epochs=1",
                "callbacks=none",
                "~logger",
            ],
            tmp_path / run,
        )
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path / "shared_data")
        metrics, _ = train(cfg)
        results.append({k: v for k, v in metrics.items() if k.startswith("test/")})
    assert results[0] == results[1]


def test_device_store_trains_to_the_same_metrics(tmp_path: Path) -> None:
    """data.device_store=true (store on the training device, batches gathered there) gives the
    very same run as the host gather: same batches, so the same metrics (on CPU here)."""
    results = []
    for run, device_store in (("host", "false"), ("device", "true")):
        cfg = compose_cfg(
            "train.yaml",
            [
                *TINY_DATA,
                *TINY_MODEL,
                "trainer=cpu",
                "trainer.max_epochs=1",
                "callbacks=none",
                "~logger",
                f"data.device_store={device_store}",
            ],
            tmp_path / run,
        )
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path / "shared_data")
        metrics, _ = train(cfg)
        results.append({k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))})
    assert results[0] == results[1] and results[0]


def test_missing_amazon_files_stop_with_paths_and_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=electro", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "reviews_Electronics_5.json.gz" in err and "meta_Electronics.json.gz" in err
    assert "python -m seqrank.data.download electro" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_default_run_closes_70_percent_of_the_gap(tmp_path: Path) -> None:
    """The README promise: `python train.py` (BST, synthetic, defaults) closes >= 70% of the
    popularity -> oracle gap in test pairwise AUC (a few minutes on a 2-core CPU)."""
    cfg = compose_cfg("train.yaml", [], tmp_path)
    metrics, _ = train(cfg)
    assert metrics["test/gap_closed"] >= 0.70, metrics


@pytest.mark.parametrize("model", ["atrank", "bst"])
def test_taobao_runs_on_a_generated_userbehavior_file(model: str, tmp_path: Path) -> None:
    """`python train.py model=<m> data=taobao` on a UserBehavior.csv written by the generator into
    the path `data=taobao` reads: trains, tests, and the histories carry all four behaviours."""
    from seqrank.data.synthetic_taobao import SyntheticTaobaoSpec, generate_taobao

    spec = SyntheticTaobaoSpec(num_users=150, num_items=600, num_cates=20, mean_events=30, seed=3)
    generate_taobao(tmp_path / "data" / "raw" / "taobao", spec)
    net = ["model.net.embed_dim=8", "model.net.num_heads=2", "model.net.time_unit_seconds=3600"]
    if model == "bst":
        net.append("model.net.mlp_dims=[32,16]")
    cfg = compose_cfg(
        "train.yaml",
        [
            f"model={model}",
            "data=taobao",
            *net,
            "trainer=cpu",
            "trainer.max_epochs=1",
            "data.batch_size=64",
            "logger=csv",
        ],
        tmp_path,
    )
    metrics, objs = train(cfg)
    dm = objs["datamodule"]
    assert dm.schema.behavior_names == ("pv", "cart", "fav", "buy") and dm.schema.protocol == "time"
    assert metrics["test/num_samples"] == dm.schema.split_sizes["test"] > 0
    assert 0.0 <= metrics["test/pairwise_auc"] <= 1.0
    assert (
        dm.store.meta["reader"]["rows_out_of_window"] > 0
    )  # the generator's dirty rows were dropped
    assert (Path(cfg.paths.output_dir) / "attention.png").exists()

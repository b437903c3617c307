"""Trainer presets, mixed precision, and DDP on 2 CPU processes (gloo).

DDP contract: every eval sample counted once (metrics equal a single process on the same weights),
rank 0 alone writes logs and results, one Hydra output dir per run or job, also inside a multirun.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from seqrank.tasks import train
from seqrank.utils.ddp import HydraDDPStrategy, hydra_job_command
from tests.conftest import CONF, ROOT, TINY_DATA, TINY_MODEL, compose_cfg

TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
EVAL_KEYS = ("test/auc", "test/gauc", "test/pairwise_auc", "test/logloss", "test/num_samples")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_presets_compose_and_build(trainer: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"trainer={trainer}"], tmp_path)
    assert cfg.trainer.use_distributed_sampler is False  # IndexBatchSampler shards itself
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert trainer in ("gpu", "ddp")
        return
    t = hydra.utils.instantiate(cfg.trainer, logger=False)
    if trainer == "ddp_cpu":
        assert isinstance(t.strategy, HydraDDPStrategy) and t.world_size == 2
        assert t.strategy.process_group_backend == "gloo"


def test_ddp_devices_nodes_and_precision_are_overrides(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "train.yaml",
        ["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4", "trainer.precision=bf16-mixed"],
        tmp_path,
    )
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == (
        8,
        4,
        "bf16-mixed",
    )
    assert cfg.trainer.strategy._target_ == "seqrank.utils.ddp.HydraDDPStrategy"
    for precision in ("16-mixed", "32"):
        assert compose_cfg(
            "train.yaml", [f"trainer.precision={precision}"], tmp_path
        ).trainer.precision in (precision, 32)


def test_child_rank_command_reruns_the_job_not_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as if started by `python train.py -m model.net.num_heads=1,2 +sweep=bst_arch`
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    monkeypatch.setattr(
        sys, "argv", ["train.py", "-m", "model.net.num_heads=1,2", "+sweep=bst_arch"]
    )
    compose_cfg("train.yaml", ["model.net.num_heads=2", "+sweep=bst_arch"], tmp_path)
    hc = copy.deepcopy(HydraConfig.instance().cfg)
    OmegaConf.set_readonly(hc.hydra, False)
    hc.hydra.mode = "MULTIRUN"
    hc.hydra.job.name = "train"
    hc.hydra.overrides.hydra = [
        "hydra.mode=MULTIRUN",
        "hydra.sweep.dir=/x",
        "hydra/launcher=basic",
        "hydra.verbose=true",
    ]
    HydraConfig.instance().set_config(hc)
    command, cwd = hydra_job_command(local_rank=1)
    assert command[:3] == [
        sys.executable,
        str(Path(hc.hydra.runtime.cwd, "train.py").resolve()),
        f"--config-path={CONF}",
    ]
    assert "-m" not in command and "--multirun" not in command
    assert command[3].startswith("--config-name=train")
    assert [c for c in command if c.startswith(("model.", "+sweep"))] == [
        "model.net.num_heads=2",
        "+sweep=bst_arch",
    ]
    assert "hydra.verbose=true" in command and "hydra.sweep.dir=/x" not in command
    assert "hydra/launcher=basic" not in command and "hydra.mode=MULTIRUN" not in command
    assert command[-4:] == [
        "hydra.mode=RUN",
        f"hydra.run.dir='{tmp_path / 'out'}'",
        "hydra.output_subdir=null",
        "hydra.job.name=train_rank1",
    ]
    assert cwd == hc.hydra.runtime.cwd


def test_bf16_mixed_on_cpu_trains_with_finite_loss_and_metrics(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "train.yaml",
        [
            *TINY_DATA,
            *TINY_MODEL,
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.precision=bf16-mixed",
            "+trainer.limit_train_batches=5",
            "callbacks=none",
            "~logger",
        ],
        tmp_path,
    )
    metrics, objs = train(cfg)
    assert type(objs["trainer"].precision_plugin).__name__ == "MixedPrecision"
    assert objs["trainer"].precision_plugin.precision == "bf16-mixed"
    for key in (
        "train/loss_epoch",
        "val/auc",
        "val/logloss",
        "test/auc",
        "test/gauc",
        "test/pairwise_auc",
        "test/logloss",
    ):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test/auc"] <= 1.0


# -- 2 CPU processes ---------------------------------------------------------------------------
def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _only_run_dir(root: Path, task: str) -> Path:
    (run,) = (root / "logs" / task / "runs").iterdir()  # one Hydra run dir, not one per rank
    assert not (root / "logs" / task / "multiruns").exists()
    return run


@pytest.mark.slow
def test_ddp_eval_metrics_equal_single_process(tmp_path: Path) -> None:
    # 151 users: an odd number of (positive, negative) pairs, so one pair straddles the two shards;
    # eval batches of 7 give the ranks batches of different sizes.
    data = [o if "num_users" not in o else "data.source.spec.num_users=151" for o in TINY_DATA]
    cfg = compose_cfg(
        "train.yaml",
        [*data, *TINY_MODEL, "trainer=cpu", "trainer.max_epochs=1", "~logger"],
        tmp_path / "train",
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")
    metrics, objs = train(cfg)
    ckpt = metrics["best_ckpt"]
    n_test = objs["datamodule"].schema.split_sizes["test"]
    assert n_test % 4 == 2
    results = {}
    for name, trainer in (
        ("single", ["trainer=cpu"]),
        ("ddp", ["trainer=ddp_cpu", "trainer.devices=2"]),
    ):
        root = tmp_path / name
        root.mkdir()
        proc = _run(
            "eval.py",
            [
                f"ckpt_path={ckpt}",
                *trainer,
                "data_overrides={eval_batch_size:7}",
                f"paths.root_dir={root}",
            ],
            cwd=root,
        )
        run = _only_run_dir(root, "eval")
        results[name] = json.loads((run / "results.json").read_text())["metrics"]
        names = {p.name for p in run.iterdir()}
        assert names >= {".hydra", "config_tree.log", "eval.log", "results.json"}
        assert not [n for n in names if "rank" in n or (n.startswith(".") and n != ".hydra")]
        messages = [
            line.split("] - ", 1)[-1] for line in (run / "eval.log").read_text().splitlines()
        ]
        assert len(messages) == len(set(messages))  # rank 0's lines only, none twice
        assert proc.stdout.count("model test") == 1  # the results table: rank 0 only
    print({k: (results["single"][k], results["ddp"][k]) for k in EVAL_KEYS})
    for key in EVAL_KEYS:
        assert results["ddp"][key] == results["single"][key], key  # exactly: every sample once
    assert results["ddp"]["test/num_samples"] == n_test


@pytest.mark.slow
def test_ddp_multirun_one_output_dir_per_job_rank0_writes(tmp_path: Path) -> None:
    net = [o for o in TINY_MODEL if "num_heads" not in o]
    _run(
        "train.py",
        [
            "-m",
            "model.net.num_heads=1,2",
            *TINY_DATA,
            *net,
            "trainer=ddp_cpu",
            "trainer.max_epochs=1",
            "logger=csv",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    logs = tmp_path / "logs" / "train"
    assert [p.name for p in logs.iterdir()] == ["multiruns"]  # no stray run dir from a child rank
    (multirun,) = (logs / "multiruns").iterdir()
    jobs = sorted(p.name for p in multirun.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        d = multirun / job
        names = {p.name for p in d.iterdir()}
        assert names >= {
            ".hydra",
            "checkpoints",
            "config_tree.log",
            "csv",
            "results.json",
            "train.log",
        }
        assert not [n for n in names if "rank" in n or (n.startswith(".") and n != ".hydra")]
        assert sorted(p.name for p in (d / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
        result = json.loads((d / "results.json").read_text())
        assert result["status"] == "completed" and result["metrics"]["val/num_samples"] == 300
        log = (d / "train.log").read_text()
        assert (
            log.count("best checkpoint") == 1 and log.count("preparing data") == 1
        )  # rank 0's lines only
    stores = [
        p.name for p in (tmp_path / "data" / "processed").iterdir() if not p.name.endswith(".lock")
    ]
    assert len(stores) == 1 and not stores[0].startswith(
        ".tmp"
    )  # prepared once, before the ranks start
    assert (multirun / "summary.md").exists()

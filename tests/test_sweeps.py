"""Sweep presets, launchers and Optuna compose; a multirun writes its summary (table + plot)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from omegaconf import OmegaConf

from seqrank.utils.sweep import main as sweep_cli
from seqrank.utils.sweep import summarize
from tests.conftest import CONF, ROOT, TINY_DATA, TINY_MODEL, compose_cfg

SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
WANDB_SPECS = sorted((ROOT / "sweep").glob("*.yaml"))
TINY_NET = [o for o in TINY_MODEL if "num_heads" not in o]  # the sweeps choose the heads


def _grid(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",")]


def _compose_hydra(overrides: list[str]):  # noqa: ANN202
    """The `hydra` node of a composed train config (compose_cfg drops it, as @hydra.main does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train.yaml", overrides=overrides, return_hydra_config=True).hydra


@pytest.mark.parametrize("preset", SWEEPS)
def test_sweep_presets_compose(preset: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"+sweep={preset}"], tmp_path)
    hc = _compose_hydra([f"+sweep={preset}"])
    params = OmegaConf.to_container(hc.sweeper.params)
    assert set(params) >= {
        "model.net.num_heads",
        "model.net.num_layers",
        "model.net.time_buckets",
        "seed",
    }
    for key in params:
        assert OmegaConf.select(cfg, key) is not None, key
    width = 2 * cfg.model.net.embed_dim
    assert all(width % int(h) == 0 for h in _grid(params["model.net.num_heads"]))
    assert len(_grid(params["seed"])) >= 2  # mean ± std needs seeds
    assert preset in hc.sweep.dir and preset in cfg.tags


@pytest.mark.parametrize("search", SEARCHES)
def test_hparams_search_presets_compose(search: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"hparams_search={search}"], tmp_path)
    hc = _compose_hydra([f"hparams_search={search}"])
    assert hc.sweeper._target_.endswith("OptunaSweeper") and hc.mode.name == "MULTIRUN"
    assert hc.sweeper.direction == (
        "minimize" if cfg.optimized_metric.endswith("loss") else "maximize"
    )
    assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == "val/auc"
    for key in hc.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key
    assert hydra.utils.instantiate(hc.sweeper.sampler) is not None


def test_joblib_launcher_composes() -> None:
    hc = _compose_hydra(["launcher=joblib"])
    assert hc.launcher._target_.endswith("JoblibLauncher") and hc.launcher.n_jobs == 2
    assert hydra.utils.instantiate(hc.launcher) is not None


def test_slurm_launcher_composes_for_multi_node_ddp() -> None:
    hc = _compose_hydra(
        [
            "launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
        ]
    )
    launcher = OmegaConf.to_container(hc.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["submitit_folder"].endswith(".submitit/%j")
    assert hydra.utils.instantiate(hc.launcher) is not None  # no cluster needed until launch()


@pytest.mark.parametrize("spec", WANDB_SPECS, ids=lambda p: p.stem)
def test_wandb_sweep_specs_call_train_py_with_valid_overrides(spec: Path, tmp_path: Path) -> None:
    s = yaml.safe_load(spec.read_text())
    assert (ROOT / s["program"]).name == "train.py" and (ROOT / s["program"]).exists()
    assert re.fullmatch(r"(val|test)/\w+", s["metric"]["name"])
    assert "${args_no_hyphens}" in s["command"] and "logger=wandb" in s["command"]
    first = {k: (v["values"][0] if "values" in v else v["min"]) for k, v in s["parameters"].items()}
    cfg = compose_cfg(
        "train.yaml", [f"{k}={v}" for k, v in first.items()] + ["logger=wandb"], tmp_path
    )
    for key, value in first.items():
        assert OmegaConf.select(cfg, key) == value, key


# -- the summary, on hand-made results ---------------------------------------------------------
def _job(
    root: Path, num: int, overrides: list[str], val_auc: float, status: str = "completed"
) -> None:
    d = root / str(num)
    d.mkdir(parents=True)
    metrics = {
        "val/auc": val_auc,
        "val/logloss": 1 - val_auc,
        "test/auc": val_auc - 0.01,
        "test/oracle_auc": 0.9,
        "train/loss": 0.5,
    }
    (d / "results.json").write_text(
        json.dumps(
            {
                "status": status,
                "overrides": ["trainer=cpu", *overrides],
                "optimized_metric": "val/auc",
                "objective": val_auc,
                "wall_time_s": 10.0 + num,
                "metrics": metrics if status == "completed" else {},
            }
        )
    )


def test_summary_groups_seeds_and_sorts_by_objective(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "multirun"
    aucs = {(1, 0): 0.60, (1, 1): 0.62, (2, 0): 0.70, (2, 1): 0.74}
    for num, ((heads, seed), auc) in enumerate(aucs.items()):
        _job(root, num, [f"model.net.num_heads={heads}", f"seed={seed}"], auc)
    _job(root, 4, ["model.net.num_heads=4", "seed=0"], 0.0, status="failed")
    (root / "5").mkdir()  # a job that never finished
    s = summarize(root)
    assert s.swept == ["model.net.num_heads"] and s.fixed == {"trainer": "cpu"}
    assert [r.params["model.net.num_heads"] for r in s.rows] == ["2", "1"]  # higher val/auc first
    assert s.rows[0].mean("val/auc") == pytest.approx(0.72) and s.rows[0].std(
        "val/auc"
    ) == pytest.approx(0.02828427)
    assert s.rows[0].mean("wall_time_s") == pytest.approx(12.5)
    assert (
        s.metrics[0] == "val/auc"
        and "test/oracle_auc" not in s.metrics
        and "train/loss" not in s.metrics
    )
    md = (root / "summary.md").read_text()
    assert "| 1 | 2 | 2 | 0.7200 ± 0.0283 |" in md
    assert (
        "Failed jobs: 4" in md
        and "without results.json" in md
        and "5" in md.split("without results.json")[1]
    )
    assert md in capsys.readouterr().out
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert [r["model.net.num_heads"] for r in rows] == ["2", "1"] and rows[0]["runs"] == "2"
    assert float(rows[1]["val/auc_mean"]) == pytest.approx(0.61)
    assert (root / "summary.png").read_bytes()[:4] == b"\x89PNG"

    sweep_cli(["summarize", str(root), "--metric", "val/logloss"])  # lower is better: same order
    assert [r["model.net.num_heads"] for r in csv.DictReader((root / "summary.csv").open())] == [
        "2",
        "1",
    ]
    sweep_cli(["summarize", str(root), "--metric", "val/logloss", "--direction", "max"])
    assert [r["model.net.num_heads"] for r in csv.DictReader((root / "summary.csv").open())] == [
        "1",
        "2",
    ]
    sweep_cli(["summarize", str(root), "--seed-keys", ""])  # every seed its own configuration
    assert len(list(csv.DictReader((root / "summary.csv").open()))) == 4


def test_summarize_refuses_a_dir_without_results(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.json"):
        summarize(tmp_path)


# -- real multiruns in a subprocess --------------------------------------------------------------
def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_preset_multirun_writes_summary_table_and_plot(tmp_path: Path) -> None:
    # +sweep=bst_arch with a 2 x 2 slice of its grid: command-line values replace the preset's
    proc = _run(
        [
            "-m",
            "+sweep=bst_arch",
            "model.net.num_heads=1,2",
            "model.net.num_layers=1",
            "model.net.time_buckets=8",
            "seed=0,1",
            *TINY_DATA,
            *TINY_NET,
            "trainer=cpu",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=5",
            "callbacks=none",
            "logger=csv",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    (multirun,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert multirun.name.startswith("bst_arch_")
    assert not (tmp_path / "logs" / "train" / "runs").exists()
    jobs = sorted(p for p in multirun.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    results = [json.loads((p / "results.json").read_text()) for p in jobs]
    assert all(
        r["status"] == "completed" and r["objective"] == r["metrics"]["val/auc"] for r in results
    )
    assert {
        o
        for r in results
        for o in r["overrides"]
        if o.startswith(("seed=", "model.net.num_heads="))
    } == {"seed=0", "seed=1", "model.net.num_heads=1", "model.net.num_heads=2"}

    md = (multirun / "summary.md").read_text()
    assert md in proc.stdout  # printed at the end of the multirun
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| # | model.net.num_heads | runs | val/auc |")
    assert len(table) == 3 and all(" | 2 | " in row and "±" in row for row in table[1:])
    rows = list(csv.DictReader((multirun / "summary.csv").open()))
    means = [float(r["val/auc_mean"]) for r in rows]
    assert means == sorted(means, reverse=True) and {r["model.net.num_heads"] for r in rows} == {
        "1",
        "2",
    }
    assert (multirun / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_optuna_preset_runs_two_trials(tmp_path: Path) -> None:
    _run(
        [
            "hparams_search=bst_optuna",
            "hydra.sweeper.n_trials=2",
            *TINY_DATA,
            *TINY_NET,
            "trainer=cpu",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=5",
            "callbacks=none",
            "logger=csv",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    (multirun,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    best = yaml.safe_load((multirun / "optimization_results.yaml").read_text())
    objectives = [
        json.loads((multirun / n / "results.json").read_text())["objective"] for n in ("0", "1")
    ]
    assert best["best_value"] == pytest.approx(max(objectives))
    assert set(best["best_params"]) >= {
        "model.optimizer.lr",
        "model.net.num_heads",
        "model.net.num_layers",
    }
    assert (multirun / "summary.md").exists() and (multirun / "summary.png").exists()

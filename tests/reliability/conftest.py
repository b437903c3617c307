"""Fixtures of the reliability tests: tiny real runs (`python train.py` in a subprocess, or
`run_task(train, cfg)` in process) and builders of broken inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from seqrank.tasks import run_task, train
from tests.conftest import ROOT, TINY_DATA, TINY_MODEL, compose_cfg

# one epoch of the tiny synthetic data is 40 batches of 64
TINY_RUN = [
    *TINY_DATA,
    *TINY_MODEL,
    "trainer=cpu",
    "+plot_attention=false",
    "callbacks.rich_progress_bar=null",
]


def run_cli(tmp_path: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` with every path under tmp_path, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=env,
    )


def run_in_process(tmp_path: Path, overrides: list[str]) -> tuple[str | None, DictConfig]:
    """`run_task(train, cfg)` as train.py calls it; returns (the exit message or None, cfg)."""
    cfg = compose_cfg("train.yaml", overrides, tmp_path)
    try:
        run_task(train, cfg)
    except SystemExit as e:
        return str(e.code), cfg
    return None, cfg


def results(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())


@pytest.fixture
def tiny_run() -> list[str]:
    return list(TINY_RUN)

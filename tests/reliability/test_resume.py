"""SIGKILL a training run mid-epoch; resuming from `last.ckpt` ends with the metrics of the
uninterrupted run with the same seed, and the logs read as one continuous run.

Tolerance: none. On CPU the resumed run is bitwise the uninterrupted one (same batches in the
same order from the restored sampler position, same dropout draws from the restored RNG
states), so val/test metrics and every per-step training loss must be equal. One number is
not: `train/loss_epoch` of the interrupted epoch (Lightning does not checkpoint its epoch
accumulators; the resumed mean covers the batches trained after the resume)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.reliability.conftest import TINY_RUN, results, run_cli

# 40 batches per epoch, 2 epochs; last.ckpt every 4 steps (mid-epoch) or only at epoch ends
RUN = [*TINY_RUN, "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]
KILLS = {  # case -> (checkpoint every n steps, the step the run hangs at and is killed, what
    #          last.ckpt then holds: global step, epoch, the loader position)
    "mid_epoch": (4, 50, 48, 1, {"epoch": 1, "consumed": 8, "num_batches": 40}),
    "after_epoch_end": (1000, 41, 40, 0, {"epoch": 0, "consumed": 40, "num_batches": 40}),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    full = run_cli(
        tmp,
        *RUN,
        "callbacks.last_checkpoint.every_n_train_steps=4",
        f"hydra.run.dir={tmp / 'full'}",
    )
    assert full.returncode == 0, full.stderr[-3000:]
    return tmp


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _by_step(rows: list[dict[str, str]], key: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for r in rows:
        if r.get(key):
            assert int(r["step"]) not in out, f"{key}: step {r['step']} logged twice"
            out[int(r["step"])] = r[key]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_then_resume_matches_uninterrupted_run(
    case: str, uninterrupted: Path, tmp_path: Path
) -> None:
    every, hang_at, ckpt_step, ckpt_epoch, position = KILLS[case]
    run = [
        *RUN,
        f"callbacks.last_checkpoint.every_n_train_steps={every}",
        f"paths.data_dir={uninterrupted / 'data'}",
    ]
    killed_dir, marker = tmp_path / "killed", tmp_path / "hung"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"paths.root_dir={tmp_path}",
            *run,
            f"hydra.run.dir={killed_dir}",
            "+callbacks.hang._target_=tests.reliability.helpers.HangAtStep",
            f"+callbacks.hang.step={hang_at}",
            f"+callbacks.hang.marker={marker}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (
        f"the run never reached step {hang_at}: {proc.stderr.read()[-3000:] if proc.poll() is not None else 'timeout'}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = killed_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain data only
    assert (ckpt["global_step"], ckpt["epoch"]) == (ckpt_step, ckpt_epoch)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position], (
        "the loader position"
    )

    resumed = run_cli(tmp_path, *run, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # the same final metrics, exactly
    a, b = results(uninterrupted / "full"), results(killed_dir)
    assert b["status"] == "completed"
    print(
        f"\n{case}: "
        + "; ".join(
            f"{k} uninterrupted {a['metrics'][k]!r} resumed {b['metrics'][k]!r}"
            for k in ("val/auc", "test/auc", "test/gauc", "test/logloss")
        )
    )
    for key in (
        "val/auc",
        "val/gauc",
        "val/logloss",
        "test/auc",
        "test/gauc",
        "test/pairwise_auc",
        "test/logloss",
    ):
        assert b["metrics"][key] == a["metrics"][key], (
            f"{key}: resumed {b['metrics'][key]} vs uninterrupted {a['metrics'][key]}"
        )

    # one continuous run in the logs: every step once, the same losses as the uninterrupted run
    full_rows, rows = (
        _rows(uninterrupted / "full" / "csv" / "metrics.csv"),
        _rows(killed_dir / "csv" / "metrics.csv"),
    )
    steps = _by_step(rows, "train/loss_step")
    assert sorted(steps) == list(range(80)), "train steps 0..79, each once"
    assert steps == _by_step(full_rows, "train/loss_step"), "per-step training losses equal"
    assert _by_step(rows, "val/auc") == _by_step(full_rows, "val/auc")
    assert "resuming the run in" in resumed.stderr + resumed.stdout

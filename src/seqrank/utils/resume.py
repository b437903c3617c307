"""Resuming a killed run exactly: RNG states in every checkpoint, the run's own folder and logs.

Lightning restores weights, optimiser, progress counters and (through `ResumableDataLoader`)
the position inside the epoch; this adds what it leaves out, so that a run killed mid-epoch and
resumed from `last.ckpt` ends with the metrics of the uninterrupted run:

- `ResumeState`: the global torch/CUDA/numpy/python RNG states (dropout draws from them), saved
  with each checkpoint and put back just before the first training batch after the restore; and
  the loggers flushed whenever a checkpoint is written, so logs on disk reach the checkpoint.
- `resume_output_dir`: a resumed run writes into the folder of the run it continues.
- `continue_csv_logs`: its `metrics.csv` keeps the rows up to the checkpoint and goes on from
  there, instead of being replaced: one continuous run in the logs.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _rng_states() -> dict[str, Any]:
    """Plain tensors and ints only: checkpoints stay loadable with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """Saves the RNG states with every checkpoint and restores them at the first training batch
    after a resume, the point where the uninterrupted run went on drawing from them (seqrank's
    loaders have their own generators, so creating their iterators draws nothing in between)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:  # what a checkpoint holds is also on disk in the logs
            logger.save()


def resume_output_dir(ckpt_path: str | Path) -> Path | None:
    """`<run>/checkpoints/x.ckpt` -> `<run>`: the folder a resumed run continues in (None for a
    checkpoint outside a run's `checkpoints/` folder)."""
    path = Path(ckpt_path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} does not exist")
    return path.parent.parent if path.parent.name == "checkpoints" else None


def checkpoint_step(ckpt_path: str | Path) -> int:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["global_step"])


@rank_zero_only
def continue_csv_logs(loggers: list, step: int) -> None:
    """Keeps each CSVLogger's rows logged before `step` (the checkpoint's global step; later ones
    belong to work lost in the kill and are logged again) and appends from there (rank 0 only,
    the rank that writes the logs)."""
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.exists():
            continue
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < step]
        writer = lg.experiment  # creating the writer deletes the old file: write the kept rows back
        writer.metrics_keys = sorted(header)
        with open(path, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=writer.metrics_keys)
            out.writeheader()
            out.writerows(kept)
        log.info("resuming %s at step %d: kept %d of %d rows", path, step, len(kept), len(rows))

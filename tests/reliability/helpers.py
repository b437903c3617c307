"""Helpers the reliability tests load into a real `python train.py` run through Hydra."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L


class HangAtStep(L.Callback):
    """Writes `marker` and hangs once training reaches global step `step` (before any checkpoint
    of that step is written), so that the test can SIGKILL the process at a known point."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(f"epoch {trainer.current_epoch} batch {batch_idx} step {trainer.global_step}\n")
            time.sleep(3600)

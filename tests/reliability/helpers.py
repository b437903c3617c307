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

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(
                f"epoch {trainer.current_epoch} batch {batch_idx} step {trainer.global_step}\n"
            )
            time.sleep(3600)


def main() -> None:
    """`python -m tests.reliability.helpers <hang|slow> <marker> <train.py overrides...>`: runs
    train.py with the processed store's array writes (np.save into the build's temp folder)
    hanging at the 3rd write after writing `marker` (`hang`), or each taking 0.1 s (`slow`, so
    that a second process reaches the store while the first is still building it)."""
    import runpy
    import sys

    import numpy as np

    mode, marker, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    save, calls = np.save, [0]

    def patched_save(file, arr, *args, **kwargs):  # noqa: ANN001, ANN202
        save(file, arr, *args, **kwargs)
        if ".tmp-" not in str(file):
            return
        calls[0] += 1
        if mode == "slow":
            time.sleep(0.1)
        elif calls[0] == 3:
            marker.write_text(f"{file}\n")
            time.sleep(3600)

    np.save = patched_save
    root = Path(__file__).resolve().parents[2]
    sys.argv = [str(root / "train.py"), *overrides]
    runpy.run_path(str(root / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()

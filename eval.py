"""Re-evaluate a checkpoint: `python eval.py ckpt_path=logs/train/runs/.../checkpoints/best.ckpt`."""

import hydra
from omegaconf import DictConfig

from seqrank.tasks import evaluate, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()

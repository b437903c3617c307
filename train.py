"""Train a seqrank model: `python train.py model=bst data=electro` (see README)."""

import hydra
from omegaconf import DictConfig

from seqrank.tasks import run_task, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)


if __name__ == "__main__":
    main()

"""Checkpoints load with `torch.load(weights_only=True)` (no pickled code), re-evaluate to the
metrics of the run, and a checkpoint of data with another schema is refused with a message
that says so, by eval.py and by a resumed train.py alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from seqrank.tasks import evaluate, run_task, train
from tests.conftest import compose_cfg
from tests.reliability.conftest import TINY_RUN, results, run_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ckpt")
    msg, cfg = run_in_process(tmp, [*TINY_RUN, "trainer.max_epochs=1"])
    assert msg is None, msg
    return tmp, results(cfg.paths.output_dir)


def _eval(tmp_path: Path, ckpt: Path, *overrides: str) -> tuple[str | None, Path]:
    cfg = compose_cfg("eval.yaml", [f"ckpt_path={ckpt}", "trainer=cpu", *overrides], tmp_path)
    try:
        run_task(evaluate, cfg)
    except SystemExit as e:
        return str(e.code), Path(cfg.paths.output_dir)
    return None, Path(cfg.paths.output_dir)


def test_checkpoints_load_weights_only_and_reevaluate_to_the_run(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    tmp, res = trained
    best, last = Path(res["best_ckpt"]), tmp / "out" / "checkpoints" / "last.ckpt"
    for path in (best, last):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert "state_dict" in ckpt and "seqrank_config" in ckpt and "seqrank_schema" in ckpt
    msg, out = _eval(tmp_path, best, f"paths.data_dir={tmp / 'data'}")
    assert msg is None
    for key in ("test/auc", "test/gauc", "test/pairwise_auc", "test/logloss"):
        assert results(out)["metrics"][key] == pytest.approx(res["metrics"][key], abs=1e-6), key


def test_eval_of_a_checkpoint_from_another_schema_says_so(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    _, res = trained
    msg, out = _eval(tmp_path, Path(res["best_ckpt"]), "+data_overrides.source.spec.num_users=100")
    assert (
        msg is not None
        and "another schema" in msg
        and "num_users: checkpoint 151 vs data 101" in msg
    ), msg
    assert results(out)["status"] == "failed"


def test_resuming_on_data_with_another_schema_says_so(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    tmp, _ = trained
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # a copy: the resume writes into its run
    last.parent.mkdir(parents=True)
    shutil.copy(tmp / "out" / "checkpoints" / "last.ckpt", last)
    cfg = compose_cfg(
        "train.yaml", [*TINY_RUN, "data.source.spec.num_users=100", f"ckpt_path={last}"], tmp_path
    )
    with pytest.raises(SystemExit) as e:
        run_task(train, cfg)
    assert "another schema" in str(e.value.code) and "num_users: checkpoint 151 vs data 101" in str(
        e.value.code
    )

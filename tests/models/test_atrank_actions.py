"""The planted multi-behaviour signal needs behaviour types: ATRank with action lookups must beat
the same model with actions masked on generated Taobao data (issue 3's acceptance check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqrank.tasks import train
from tests.conftest import compose_cfg

COMMON = [
    "experiment=atrank_taobao",
    "data=taobao_synthetic",
    "data.target_behaviors=[buy]",
    "data.source.spec.num_users=4000",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "logger=csv",
]


@pytest.mark.slow
def test_action_lookups_beat_masked_actions_on_planted_buys(tmp_path: Path) -> None:
    """Buys follow a cart/fav of the same item or category in a later session; pv is noise.
    Without the action lookup the model cannot tell the carted event among the pvs."""
    got = {}
    for use in (True, False):
        cfg = compose_cfg(
            "train.yaml", [*COMMON, f"model.net.use_actions={use}"], tmp_path / str(use)
        )
        metrics, _ = train(cfg)
        got[use] = metrics["test/pairwise_auc"]
    assert got[True] > got[False] + 0.02, got
    assert got[True] > 0.9, got

"""Config errors fail before any work (no raw file generated, no store, no checkpoint), with one
clean message naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqrank.tasks import ConfigError, check_model_config, instantiate_data, train
from tests.conftest import TINY_DATA, TINY_MODEL, compose_cfg
from tests.reliability.conftest import run_cli

CASES = {  # case -> (overrides, patterns the message must contain)
    "bst_heads_not_dividing_width": (
        ["model.net.num_heads=3"],
        [
            "model.net",
            "num_heads=3 must divide",
            "=16",
            "allowed model.net.num_heads for this width: [1, 2, 4, 8, 16]",
        ],
    ),
    "atrank_heads_not_dividing_width": (
        ["model=atrank", "model.net.num_heads=5"],
        ["model.net", "num_heads=5 must divide", "=16", "[1, 2, 4, 8, 16]"],
    ),
    "unknown_protocol": (
        ["data.protocol=random"],
        ["data.protocol='random'", "['paper', 'loo', 'time']"],
    ),
    "bst_time_buckets_below_1": (
        ["model.net.time_buckets=0"],
        ["model.net", "time_buckets", ">= 1", "time_buckets=0"],
    ),
    "atrank_time_buckets_below_1": (
        ["model=atrank", "model.net.time_buckets=0"],
        ["model.net", "time_buckets=0", ">= 1"],
    ),
    "data_max_len_below_1": (["data.max_len=0"], ["data.max_len=0", "integer >= 1"]),
    "model_max_len_below_1": (
        ["model.net.max_len=0"],
        ["model.net", "max_len", ">= 1", "max_len=0"],
    ),
    "batch_size_below_1": (["data.batch_size=0"], ["data.batch_size=0", "integer >= 1"]),
    "eval_batch_size_below_1": (
        ["data.eval_batch_size=-2"],
        ["data.eval_batch_size=-2", "integer >= 1"],
    ),
    "unknown_bad_line_policy": (
        ["data.on_bad_line=ignore"],
        ["data.on_bad_line='ignore'", "['error', 'skip']"],
    ),
    "atrank_behaviour_groups_on_single_behaviour_data": (
        ["model=atrank", "model.net.group_by=behavior"],
        [
            "model.net.group_by='behavior'",
            "several behaviour types",
            "['review']",
            "allowed here: model.net.group_by='item'",
        ],
    ),
    "target_behaviours_absent_from_data": (
        ["+data.target_behaviors=[buy]"],
        ["data.target_behaviors=['buy']", "['review']"],
    ),
    "misspelt_model_key": (
        ["+model.net.num_head=2"],
        ["model.net", "'num_head'", "allowed model.net keys: [", "'num_heads'"],
    ),
    "missing_resume_checkpoint": (
        ["ckpt_path=nowhere/last.ckpt"],
        ["ckpt_path='nowhere/last.ckpt' does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_fails_before_any_work(case: str, tmp_path: Path) -> None:
    overrides, patterns = CASES[case]
    model = ["model=atrank", "model.net.embed_dim=8"] if "model=atrank" in overrides else TINY_MODEL
    cfg = compose_cfg("train.yaml", [*TINY_DATA, "trainer=cpu", *model, *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    for p in patterns:
        assert p in msg, f"{case}: {p!r} not in {msg!r}"
    assert not (tmp_path / "data").exists(), (
        f"{case}: data work started before the config was checked"
    )
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_behaviour_groups_are_accepted_on_data_with_behaviours(tmp_path: Path) -> None:
    cfg = compose_cfg(
        "train.yaml",
        ["data=taobao_synthetic", "model=atrank", "model.net.group_by=behavior"],
        tmp_path,
    )
    check_model_config(cfg, instantiate_data(cfg))  # no error: pv/cart/fav/buy


def test_cli_config_error_exits_1_with_the_message_alone(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "model=atrank", "model.net.group_by=behavior")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "error: model.net.group_by='behavior'" in proc.stderr
    assert "Traceback" not in out
    assert not (tmp_path / "data").exists()

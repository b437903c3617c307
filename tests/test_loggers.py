"""Logger presets compose; W&B works offline without an account and receives config + metrics."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from seqrank.tasks import run_task, train
from seqrank.utils.loggers import git_info, run_group, run_name, wandb_has_key, wandb_mode
from seqrank.utils.run import instantiate_loggers
from tests.conftest import CONF, ROOT, TINY_DATA, TINY_MODEL, compose_cfg

LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))


@pytest.fixture
def no_wandb_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key, no netrc, no WANDB_MODE; W&B's own folders under tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SWEEP_ID", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


@pytest.mark.parametrize("logger", LOGGERS)
def test_logger_presets_compose_and_instantiate(
    logger: str, tmp_path: Path, no_wandb_account: None
) -> None:
    cfg = compose_cfg("train.yaml", [f"logger={logger}"], tmp_path)
    loggers = instantiate_loggers(cfg.logger)
    assert loggers and len(loggers) == len(cfg.logger)
    if logger == "many_loggers":
        assert sorted(cfg.logger) == ["csv", "tensorboard", "wandb"]
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":  # lazily created: no run has started
            assert lg._wandb_init["mode"] == "offline"
            assert lg._wandb_init["tags"] == ["bst", "synthetic", "dev"]
            assert lg._wandb_init["project"] == "seqrank"


def test_wandb_mode_needs_a_key_to_go_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_wandb_account: None
) -> None:
    assert not wandb_has_key() and wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_has_key() and wandb_mode() == "online"  # as after `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit mode wins
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    assert wandb_mode(offline=True) == "offline" and wandb_mode(offline=False) == "online"


def test_group_and_name_follow_the_multirun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_wandb_account: None
) -> None:
    compose_cfg("train.yaml", [], tmp_path)
    assert run_group("auto") is None and run_name(None) is None  # a single run
    assert run_group("mine") == "mine" and run_group(None) is None
    hc = copy.deepcopy(HydraConfig.instance().cfg)
    OmegaConf.set_readonly(hc.hydra, False)
    hc.hydra.mode = "MULTIRUN"
    hc.hydra.sweep.dir = str(tmp_path / "multiruns" / "bst_arch_2024-01-01_00-00-00")
    hc.hydra.job.name = "train"
    hc.hydra.job.num = 3
    HydraConfig.instance().set_config(hc)
    assert run_group("auto") == "train-bst_arch_2024-01-01_00-00-00"
    assert run_name(None) == "bst_arch_2024-01-01_00-00-00/3"
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert run_group("auto") == "sweep-abc123"


def test_git_info_of_this_checkout() -> None:
    info = git_info(ROOT)
    if (ROOT / ".git").exists():
        assert isinstance(info["sha"], str) and len(info["sha"]) == 40
        assert isinstance(info["dirty"], bool)
    assert git_info(Path("/")) == {"sha": None, "dirty": None}


# -- reading an offline W&B run back -------------------------------------------------------------
def read_wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` transaction log (W&B's LevelDB-style log of protobuf `Record`s:
    a 7-byte file header, 32 KiB blocks, 7-byte record headers crc32/length/type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            records.append(payload)
        elif kind == 2:  # FIRST
            chunks = payload
        elif kind == 3:  # MIDDLE
            chunks += payload
        elif kind == 4:  # LAST
            records.append(chunks + payload)
    return [pb.Record.FromString(r) for r in records]


def wandb_run_contents(run_dir: Path) -> dict[str, Any]:
    """Run metadata, config, history rows, summary and saved files of one offline run."""
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "files": [], "run": None}

    def items(update: Any) -> dict[str, Any]:
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in update}

    for rec in read_wandb_records(log_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update(items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
    return out


def test_wandb_offline_run_holds_config_metrics_and_metadata(
    tmp_path: Path, no_wandb_account: None
) -> None:
    cfg = compose_cfg(
        "train.yaml",
        [
            *TINY_DATA,
            *TINY_MODEL,
            "trainer=cpu",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=5",
            "logger=many_loggers",
            "tags=[unit]",
        ],
        tmp_path,
    )
    value = run_task(train, cfg)  # run_task closes the W&B run at the end of the job
    out = Path(cfg.paths.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["objective"] == value and math.isfinite(value)

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = wandb_run_contents(run_dir)
    assert run["run"].project == "seqrank"
    assert list(run["run"].tags) == ["bst", "synthetic", "unit"]
    assert run["run"].run_group == ""  # a single run has no group
    config = run["config"]
    assert config["cfg"]["model"]["net"]["num_heads"] == 2  # the full resolved config
    assert config["cfg"]["data"]["source"]["spec"]["num_users"] == 150
    assert len(config["data_fingerprint"]) == 64  # sha256 of the data inputs
    assert "sha" in config["git"]
    assert config["num_params"] > 0
    logged = {k for row in run["history"] for k in row}
    for key in (
        "train/loss_epoch",
        "val/auc",
        "val/gauc",
        "val/pairwise_auc",
        "val/logloss",
        "test/auc",
        "test/logloss",
    ):
        assert key in logged, key
    test_auc = next(row["test/auc"] for row in run["history"] if "test/auc" in row)
    assert test_auc == pytest.approx(results["metrics"]["test/auc"], abs=1e-6)
    assert run["summary"]["model/total_params"] == config["num_params"]
    assert (
        "model_summary.txt" in run["files"] and (run_dir / "files" / "model_summary.txt").exists()
    )

    # the other two loggers of many_loggers
    assert (out / "csv" / "metrics.csv").read_text().splitlines()[0].count("val/auc") == 1
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"model_summary" in e.read_bytes() for e in events)
    assert "BST" in (out / "model_summary.txt").read_text()

"""train(cfg) and evaluate(cfg): a straight list of steps, called by the thin Hydra shims."""

from __future__ import annotations

import inspect
import logging
import re
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from seqrank.data.datamodule import SeqDataModule
from seqrank.data.errors import DataError
from seqrank.data.types import Schema
from seqrank.evaluation import gap_closed, reference_metrics
from seqrank.lit.ranking import NonFiniteLossError, RankingModule, SchemaMismatchError
from seqrank.utils.ddp import quiet_non_zero_rank
from seqrank.utils.loggers import finish_loggers, git_info, log_model_summary
from seqrank.utils.resume import ResumeState, checkpoint_step, continue_csv_logs, resume_output_dir
from seqrank.utils.run import (
    instantiate_callbacks,
    instantiate_loggers,
    print_config_tree,
    print_results,
)
from seqrank.utils.sweep import write_job_results

log = logging.getLogger(__name__)
METRICS = ("auc", "gauc", "pairwise_auc", "logloss")


def build_model(cfg: DictConfig, dm: SeqDataModule) -> RankingModule:
    """The Schema sizes the net: `model.net` is a partial completed with it."""
    net = hydra.utils.instantiate(cfg.model.net)(dm.schema)
    return hydra.utils.instantiate(cfg.model, net=net)


class ConfigError(ValueError):
    """A setting, or a pair of settings, that cannot work; raised before any data work, the
    message names the key(s), the value and what is allowed."""


def _unwrap(e: BaseException) -> BaseException:
    """Hydra wraps constructor errors in InstantiationException; the user wants the cause."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def instantiate_data(cfg: DictConfig) -> SeqDataModule:
    """The DataModule; its constructor validates the data config (protocol, sizes, ...)."""
    try:
        return hydra.utils.instantiate(cfg.data)
    except (InstantiationException, ValueError, TypeError) as e:
        cause = _unwrap(e)
        if not isinstance(cause, ValueError | TypeError):
            raise
        raise ConfigError(f"data config ({cfg.data.get('_target_')}): {cause}") from cause


def check_model_config(cfg: DictConfig, dm: SeqDataModule) -> None:
    """Builds the net once on a placeholder Schema, so that a bad hyperparameter (heads not
    dividing the width, time_buckets < 1, ...) or a model the data cannot feed fails before
    any data work, naming the key and what is allowed."""
    names = dm.behavior_names
    net_cfg = cfg.model.net
    target = str(net_cfg.get("_target_", "?"))
    if net_cfg.get("group_by") == "behavior" and len(names) < 2:
        raise ConfigError(
            f"model.net.group_by='behavior' ({target}) needs data with several behaviour types; "
            f"data {dm.name!r} has one ({list(names)}): allowed here: model.net.group_by='item', or "
            "data with behaviours (data=taobao, data=taobao_synthetic)"
        )
    placeholder = Schema(
        name=dm.name,
        num_users=2,
        num_items=2,
        num_cates=2,
        num_behaviors=len(names) + 1,
        behavior_names=names,
        protocol=dm.protocol,
    )
    try:
        hydra.utils.instantiate(net_cfg)(placeholder)
    except (InstantiationException, ValueError, TypeError) as e:
        cause = _unwrap(e)
        if not isinstance(cause, ValueError | TypeError):
            raise
        msg = f"model.net ({target}): {cause}"
        width = re.search(r"num_heads=\S+ must divide the attention width \S*?=(\d+)", str(cause))
        if width:
            w = int(width.group(1))
            msg += f"; allowed model.net.num_heads for this width: {[h for h in range(1, w + 1) if w % h == 0]}"
        if isinstance(cause, TypeError) and "unexpected keyword" in str(cause):
            params = inspect.signature(hydra.utils.get_class(target)).parameters.values()
            msg += (
                f"; allowed model.net keys: {[p.name for p in params if p.kind is p.KEYWORD_ONLY]}"
            )
        raise ConfigError(msg) from cause


def _metric_dict(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def report(dm: SeqDataModule, metrics: dict[str, float], title: str) -> dict[str, float]:
    """Prints the model's val/test metrics beside popularity and oracle; returns the extras."""
    rows: dict[str, dict[str, Any]] = {}
    for stage in ("val", "test"):
        vals = {m: metrics[f"{stage}/{m}"] for m in METRICS if f"{stage}/{m}" in metrics}
        if vals:
            label = (
                "val (= test, protocol paper)"
                if stage == "val" and dm.eval_split("val") == "test"
                else stage
            )
            rows[f"model {label}"] = vals
    extras: dict[str, float] = {}
    for name, vals in reference_metrics(dm.store, "test").items():
        rows[f"{name} test"] = vals
        extras.update({f"test/{name}_{k}": v for k, v in vals.items()})
    key = "test/pairwise_auc"
    if key in metrics and "test/oracle_pairwise_auc" in extras:
        closed = gap_closed(
            metrics[key], extras["test/popularity_pairwise_auc"], extras["test/oracle_pairwise_auc"]
        )
        extras["test/gap_closed"] = closed
        title += f" — model closes {closed:.1%} of the popularity→oracle gap (pairwise_auc)"
    print_results(rows, METRICS, title)
    log.info("%s", data_summary(dm))
    return extras


def data_summary(dm: SeqDataModule) -> str:
    """One line of what the reader and preprocessing dropped or defaulted, from meta.json."""
    meta = dm.store.meta
    reader, prep = meta.get("reader", {}), meta.get("preprocess", {})
    bad = sum((reader.get("bad_lines") or {}).values())
    parts = [
        f"data {dm.name} (protocol {dm.protocol}): {prep.get('events', 0):,} events",
        f"{prep.get('users', 0):,} users, {prep.get('items', 0):,} items",
        f"users dropped as too short: {prep.get('users_dropped_too_short', 0):,}",
        f"bad raw lines skipped: {bad:,}",
    ]
    if "items_without_meta" in reader:
        parts.append(f"items without meta (unknown category): {reader['items_without_meta']:,}")
    if "rows_out_of_window" in reader:
        parts.append(f"rows outside the time window: {reader['rows_out_of_window']:,}")
    return "; ".join(parts)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Trains, tests at the best validation checkpoint, prints and returns the metrics.

    With `ckpt_path` (e.g. `<run>/checkpoints/last.ckpt` of a killed run) training resumes
    where that checkpoint left off, mid-epoch included, inside `<run>`: its checkpoints and
    `metrics.csv` continue as one run.
    """
    resume = cfg.get("ckpt_path") if cfg.get("train", True) else None
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(
                f"ckpt_path={str(resume)!r} does not exist; expected a checkpoint file "
                "such as logs/train/runs/<run>/checkpoints/last.ckpt"
            )
        run_dir = resume_output_dir(resume)
        if run_dir is not None:
            log.info("resuming the run in %s from %s", run_dir, resume)
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    started = time.time()
    log.info("preparing data <%s>", cfg.data.name)
    dm = instantiate_data(cfg)  # validates the data config
    check_model_config(cfg, dm)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model(cfg, dm)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [*instantiate_callbacks(cfg.get("callbacks")), ResumeState()]
    loggers = instantiate_loggers(cfg.get("logger"))
    if resume:
        continue_csv_logs(loggers, checkpoint_step(resume))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    hparams = {
        "cfg": model.run_config,
        "schema": dm.schema.to_dict(),
        "store": str(dm.store.path),
        "data_fingerprint": dm.fingerprint(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "git": git_info(),
    }
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)
    if trainer.loggers:
        log_model_summary(trainer.loggers, model, cfg.paths.output_dir)
    if cfg.get("train", True):
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    train_metrics = _metric_dict(trainer)
    fit_seconds = time.time() - started
    metrics = dict(train_metrics)
    if cfg.get("test", True):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt:
            log.warning("no best checkpoint found; testing the current weights")
        trainer.test(model, datamodule=dm, ckpt_path=ckpt or None, weights_only=True)
        metrics.update(_metric_dict(trainer))
        metrics.update(
            report(dm, metrics, f"{cfg.model.net._target_.rsplit('.', 1)[-1]} on {cfg.data.name}")
        )
        if ckpt:
            metrics["best_ckpt"] = ckpt  # type: ignore[assignment]
        if trainer.is_global_zero and cfg.get("plot_attention", True):
            save_attention_figure(
                model, dm, Path(cfg.paths.output_dir) / "attention.png", trainer.loggers
            )
    metrics["time/train_and_test_s"] = fit_seconds
    log.info("best checkpoint: %s", metrics.get("best_ckpt"))
    return metrics, {"cfg": cfg, "datamodule": dm, "model": model, "trainer": trainer}


def save_attention_figure(
    model: RankingModule, dm: SeqDataModule, path: Path, loggers: list
) -> None:
    """The target's attention over the history for a few test users (PNG; logged as an image
    by loggers that take images)."""
    from seqrank.data.batching import BatchGatherDataset
    from seqrank.viz import plot_target_attention

    test = dm.store.splits["test"]
    # one positive per user for up to 200 users; show the 4 whose histories mix the most behaviours
    pos = np.flatnonzero(np.asarray(test.label[:20_000]) == 1)
    _, first = np.unique(np.asarray(test.user)[pos], return_index=True)
    candidates = pos[np.sort(first)][:200] if len(pos) else np.arange(min(4, len(test)))
    data = BatchGatherDataset(dm.store.events, test, dm.max_len)
    beh = data[candidates].hist_behavior.numpy()
    kinds = np.array([len(np.unique(row[row > 0])) for row in beh])
    batch = data[candidates[np.argsort(-kinds, kind="stable")[:4]]]
    device = next(model.parameters()).device
    plot_target_attention(model.net, batch.to(device), dm.schema, path)
    for lg in loggers:
        if hasattr(lg, "log_image"):
            lg.log_image(key="test/attention", images=[str(path)])
    log.info("attention figure: %s", path)


def load_run_config(ckpt_path: str | Path) -> DictConfig:
    """The composed config a checkpoint was trained with (saved by RankingModule)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "seqrank_config" not in ckpt:
        raise KeyError(f"{path}: no 'seqrank_config' entry; was it written by seqrank's train.py?")
    return OmegaConf.create(ckpt["seqrank_config"])


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Re-tests a checkpoint with the exact data and model config it was trained with."""
    run_cfg = load_run_config(cfg.ckpt_path)
    if cfg.get("data_overrides"):
        run_cfg = OmegaConf.merge(run_cfg, {"data": cfg.data_overrides})
    dm: SeqDataModule = hydra.utils.instantiate(run_cfg.data)
    dm.prepare_data()
    dm.setup("test")
    model = build_model(run_cfg, dm)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    trainer.test(model, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = _metric_dict(trainer)
    metrics.update(
        report(
            dm,
            metrics,
            f"{run_cfg.model.net._target_.rsplit('.', 1)[-1]} on {run_cfg.data.name} (eval)",
        )
    )
    return metrics, {"cfg": run_cfg, "datamodule": dm, "model": model, "trainer": trainer}


def run_task(task, cfg: DictConfig) -> float | None:  # noqa: ANN001
    """Prints the config tree, runs the task, returns `optimized_metric` for sweepers.

    Data errors (missing or malformed raw files), config errors, a non-finite loss and a
    checkpoint of another schema end the run with their message alone (exit code 1), not a traceback from deep inside a parser. Rank 0 writes `results.json` (metrics, overrides, wall
    time; read by the multirun summary) into the output dir, also for a failed run.
    """
    quiet_non_zero_rank()
    out = Path(cfg.paths.output_dir)
    print_config_tree(cfg, save_to=out / "config_tree.log")
    started = time.time()
    try:
        metrics, objs = task(cfg)
    except (DataError, ConfigError, NonFiniteLossError, SchemaMismatchError) as e:
        log.error("%s", e)
        write_job_results(
            out, cfg, status="failed", wall_time_s=time.time() - started, error=str(e)
        )
        raise SystemExit(f"error: {e}") from None
    except Exception as e:
        write_job_results(
            out, cfg, status="failed", wall_time_s=time.time() - started, error=repr(e)
        )
        raise
    finish_loggers(objs["trainer"].loggers)
    name = cfg.get("optimized_metric")
    value = float(metrics[name]) if name and name in metrics else None
    out = Path(cfg.paths.output_dir)  # a resumed run writes into the run it continues
    write_job_results(
        out,
        cfg,
        status="completed",
        wall_time_s=time.time() - started,
        metrics=metrics,
        objective=value,
    )
    return value

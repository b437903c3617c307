"""Instantiators for callbacks/loggers, the rich config tree and the final metrics table."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import rich
import rich.syntax
import rich.table
import rich.tree
from lightning import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiates every `_target_` entry of a callbacks/logger group (None entries skipped)."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"expected a config group mapping names to objects, got {type(cfg).__name__}"
        )
    return [
        hydra.utils.instantiate(c)
        for c in cfg.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return instantiate_group(cfg)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return instantiate_group(cfg)


@rank_zero_only
def print_config_tree(
    cfg: DictConfig,
    order: Sequence[str] = ("data", "model", "callbacks", "logger", "trainer", "paths"),
    save_to: Path | None = None,
) -> None:
    """Prints the composed config as a rich tree (and saves it as text beside the run)."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for f in fields:
        branch = tree.add(f, style="bold", guide_style="dim")
        value = cfg[f]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as fh:
            rich.print(tree, file=fh)


def _fmt(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "-"
    return f"{x:.0f}" if x.is_integer() and abs(x) >= 100 else f"{x:.4f}"


@rank_zero_only
def print_results(rows: dict[str, dict[str, Any]], columns: Sequence[str], title: str) -> None:
    """A rich table: one row per scorer/stage, one column per metric."""
    table = rich.table.Table(title=title)
    table.add_column("")
    for c in columns:
        table.add_column(c, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(_fmt(values.get(c, float("nan"))) for c in columns))
    rich.print(table)

"""Run metadata for loggers: the W&B logger (offline without an account), the git SHA, the
model summary, and closing a run at the end of a job.

`conf/logger/wandb.yaml` builds its logger with `wandb_logger`: offline unless a key is configured
(`WANDB_API_KEY` or `wandb login`), grouped by multirun or W&B sweep, tagged with model and data.
"""

from __future__ import annotations

import logging
import netrc
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning import LightningModule
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import ModelSummary

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


def wandb_has_key() -> bool:
    """True when W&B can authenticate: `WANDB_API_KEY` or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = (
        urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        or "api.wandb.ai"
    )
    path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(offline: bool | None = None) -> str:
    """`offline=True/False` wins; else `WANDB_MODE`; else online only when a key is configured."""
    if offline is not None:
        return "offline" if offline else "online"
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    return "online" if wandb_has_key() else "offline"


def run_group(group: str | None = "auto") -> str | None:
    """`auto`: the W&B sweep id under `wandb agent`, else `<job name>-<multirun folder>` inside a
    Hydra multirun, else None. Any other string is used as given."""
    if group != "auto":
        return group
    if os.environ.get("WANDB_SWEEP_ID"):
        return f"sweep-{os.environ['WANDB_SWEEP_ID']}"
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{hc.job.name}-{Path(hc.sweep.dir).name}"
    return None


def run_name(name: str | None = None) -> str | None:
    """A given name, else `<group>/<job number>` inside a Hydra multirun, else None (W&B picks)."""
    if name or not HydraConfig.initialized():
        return name
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return f"{Path(hc.sweep.dir).name}/{hc.job.num}"
    return None


def _unique(tags: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for t in tags:
        s = str(t)[:64]  # W&B's limit per tag
        if s and s not in out:
            out.append(s)
    return out


def wandb_logger(
    *,
    project: str,
    save_dir: str,
    name: str | None = None,
    group: str | None = "auto",
    tags: Sequence[Any] = (),
    extra_tags: Sequence[Any] = (),
    entity: str | None = None,
    job_type: str | None = None,
    offline: bool | None = None,
    log_model: bool | str = False,
    prefix: str = "",
) -> Logger:
    """A Lightning `WandbLogger` that works with no account.

    Args:
        project: W&B project.
        save_dir: parent of the `wandb/` run folder (the run's Hydra output dir).
        name: run name; None: `<multirun>/<job>` in a multirun, else W&B's random name.
        group: `auto` (see `run_group`), None, or a name.
        tags: run tags (the model and data words).
        extra_tags: more tags (the config's `tags`); duplicates are dropped.
        entity: W&B entity (team or user); None: the account's default.
        job_type: e.g. `train` or `eval`.
        offline: None: offline unless `WANDB_MODE` says otherwise or a key is configured.
        log_model: upload checkpoints as artifacts (online only).
        prefix: prefix of every metric key.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(offline)
    if mode != "online" and log_model:
        log.warning(
            "wandb is %s: log_model=%s ignored (artifacts need online mode)", mode, log_model
        )
        log_model = False
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    log.info("wandb mode: %s", mode)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=run_name(name),
        group=run_group(group),
        tags=_unique([*tags, *extra_tags]),
        entity=entity,
        job_type=job_type,
        log_model=log_model,
        prefix=prefix,
        mode=mode,
    )


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """`{"sha": <HEAD>, "dirty": <uncommitted changes to tracked files>}` of the repository
    holding `path` (default: this package's source), or `{"sha": None}` outside a git checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        # --no-optional-locks: never take the index lock (other processes may be using git)
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


@rank_zero_only
def log_model_summary(
    loggers: Sequence[Logger], model: LightningModule, out_dir: str | Path, max_depth: int = 2
) -> str:
    """Writes `model_summary.txt` beside the run and hands it to loggers that store text
    (TensorBoard: a text entry; W&B: a run file and the parameter counts in the summary)."""
    summary = ModelSummary(model, max_depth=max_depth)
    text = str(summary)
    path = Path(out_dir) / "model_summary.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    for lg in loggers:
        kind = type(lg).__name__
        if kind == "TensorBoardLogger":
            lg.experiment.add_text("model_summary", "```\n" + text + "\n```")
        elif kind == "WandbLogger":
            run = lg.experiment
            run.summary["model/total_params"] = summary.total_parameters
            run.summary["model/trainable_params"] = summary.trainable_parameters
            run.save(str(path), base_path=str(path.parent), policy="now")
    return text


@rank_zero_only
def finish_loggers(loggers: Sequence[Logger]) -> None:
    """Closes a W&B run at the end of a job, so the next job of a multirun starts its own."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()

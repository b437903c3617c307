"""DDP under Hydra: child ranks re-run the *job* (not the sweep) inside the job's own output dir.

Lightning's script launcher starts ranks 1..N-1 by re-running `sys.argv` with
`hydra.run.dir=<hydra.run.dir>`. Inside a multirun that is wrong twice: `sys.argv` holds `-m` and
the whole sweep (each child would start a sweep of its own), and `hydra.run.dir` is not the job's
folder (children would write a second run dir). `HydraDDPStrategy` re-runs exactly the job
instead: the config name, the job's own overrides (one value per swept key), `hydra.mode=RUN`,
`hydra.run.dir=<the job's output dir>` and `hydra.output_subdir=null` (only rank 0 saves .hydra/).

A sequential multirun runs many DDP jobs in one process; `DistributedReset` (a Hydra callback)
tears the process group down after each job and restores the environment variables the launcher
set, so the next job starts its own ranks on a fresh port.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Set by the launcher in the parent process; restored after each job.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that describe the sweep or the run dir, never the job: dropped for children.
_SWEEP_KEYS = (
    "hydra.mode",
    "hydra.run.",
    "hydra.sweep.",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.output_subdir",
    "hydra.job.name",
)

_saved_env: dict[str, str | None] | None = None
_children: list[subprocess.Popen] = []


def _quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command line (and cwd) that re-runs the current Hydra job as rank `local_rank`."""
    import __main__

    hc = HydraConfig.get()
    cwd = hc.runtime.cwd
    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, str(Path(cwd, sys.argv[0]).resolve())]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    for source in hc.runtime.config_sources:
        if source.schema == "file" and source.provider == "main":
            command.append(f"--config-path={source.path}")
        elif source.schema == "file" and source.provider == "command-line":
            command.append(f"--config-dir={source.path}")
    command.append(f"--config-name={hc.job.config_name}")
    command += [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(_SWEEP_KEYS)]
    command += list(hc.overrides.task)
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(hc.runtime.output_dir)}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, cwd


class _HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, with children started by `hydra_job_command`."""

    def _call_children_scripts(self) -> None:
        global _saved_env
        if not HydraConfig.initialized():
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        _saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        self.procs = []
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command, cwd = hydra_job_command(local_rank)
            log.debug("starting rank %d: %s", local_rank, " ".join(command))
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))
        _children.extend(self.procs)
        return None


class HydraDDPStrategy(DDPStrategy):
    """`DDPStrategy` whose child ranks re-run the current Hydra job (see the module docstring).

    Takes DDPStrategy's arguments (`process_group_backend`, `find_unused_parameters`, ...).
    """

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _HydraJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )


def reset_distributed(timeout: float = 120.0) -> None:
    """Ends a finished DDP job in this process: waits for its child ranks, destroys the process
    group and restores the launcher's environment variables (no-op when no job launched ranks)."""
    global _saved_env
    for proc in _children:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("rank process %d still running after the job; terminating it", proc.pid)
            proc.terminate()
    _children.clear()
    if _saved_env is None:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env = None


class DistributedReset(Callback):
    """Hydra callback: `reset_distributed()` after each job, so DDP jobs can follow one another
    in a sequential multirun."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        reset_distributed()


def quiet_non_zero_rank() -> None:
    """In a rank > 0 process, detaches the log-file handlers Hydra set up: the job's log file
    is rank 0's alone (other ranks still log to the console)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()

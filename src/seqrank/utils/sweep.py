"""Summary of a multirun: one row per configuration, mean ± std over seeds, sorted by the objective.

Every job writes `results.json` into its output dir (`seqrank.tasks.run_task`, rank 0). After a
multirun, the Hydra callback `SweepSummary` (registered in conf/hydra/default.yaml) reads them
and writes, into the multirun dir:

    summary.md    the table (markdown), also printed
    summary.csv   the same numbers, mean and std in separate columns
    summary.png   the objective against each swept parameter

Re-create it for any multirun dir: `python -m seqrank.utils.sweep summarize <multirun_dir>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULTS = "results.json"
SEED_KEYS = ("seed",)
# val/test ranking metrics shown in the table (extras such as test/oracle_* are constant)
METRIC_RE = re.compile(r"^(val|test)/(auc|gauc|pairwise_auc|logloss)$")


@dataclass
class Row:
    """One configuration: its swept values and the runs (one per seed) that share them."""

    params: dict[str, str]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r["wall_time_s"] if key == "wall_time_s" else r.get("metrics", {}).get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, key: str) -> float:
        v = self.values(key)
        return sum(v) / len(v) if v else math.nan

    def std(self, key: str) -> float:
        v = self.values(key)
        if len(v) < 2:
            return math.nan
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@dataclass
class Summary:
    """The grouped results of one multirun dir."""

    root: Path
    metric: str
    direction: str
    swept: list[str]
    fixed: dict[str, str]
    seed_keys: tuple[str, ...]
    metrics: list[str]
    rows: list[Row]
    failed: list[dict[str, Any]]
    missing: list[str]


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


@rank_zero_only
def write_job_results(
    out_dir: str | Path,
    cfg: DictConfig,
    *,
    status: str,
    wall_time_s: float,
    metrics: dict[str, Any] | None = None,
    objective: float | None = None,
    error: str | None = None,
) -> Path:
    """Writes `<out_dir>/results.json` (rank 0): status, overrides, objective, metrics, wall time.

    Non-finite numbers are written as null; non-numeric entries (`best_ckpt`) sit beside `metrics`.
    """
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    metrics = metrics or {}
    numbers = {k: _finite(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))}
    data = {
        "status": status,
        "task_name": cfg.get("task_name"),
        "job_num": hc.job.num if hc is not None and hc.mode == RunMode.MULTIRUN else None,
        "overrides": list(hc.overrides.task) if hc is not None else [],
        "optimized_metric": cfg.get("optimized_metric"),
        "objective": _finite(objective) if objective is not None else None,
        "wall_time_s": wall_time_s,
        "metrics": numbers,
        **{k: str(v) for k, v in metrics.items() if k not in numbers},
        "output_dir": str(out_dir),
    }
    if error is not None:
        data["error"] = error
    path = Path(out_dir) / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def parse_override(text: str) -> tuple[str, str]:
    """`+model.net.num_heads=2` -> (`model.net.num_heads`, `2`); `~key` -> (`key`, `~`)."""
    if text.startswith("~"):
        return text.lstrip("~").split("=", 1)[0], "~"
    key, _, value = text.lstrip("+").partition("=")
    return key, value


def load_results(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job's results.json under `root` (one level or nested), and job dirs without one."""
    results, missing = [], []
    for path in sorted(root.rglob(RESULTS), key=lambda p: _natural(p.parent.relative_to(root))):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("unreadable %s: %s", path, e)
            continue
        r["_dir"] = str(path.parent.relative_to(root))
        results.append(r)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        if not (d / RESULTS).exists():
            missing.append(d.name)
    return results, missing


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _direction(metric: str, direction: str | None) -> str:
    if direction in ("max", "maximize"):
        return "max"
    if direction in ("min", "minimize"):
        return "min"
    return "min" if metric.endswith("loss") else "max"


def _sort_value(text: str) -> tuple[int, float | str]:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def summarize_results(
    root: Path,
    results: list[dict[str, Any]],
    *,
    metric: str | None = None,
    direction: str | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
    missing: Sequence[str] = (),
) -> Summary:
    """Groups completed runs by their non-seed overrides and sorts configurations by `metric`."""
    done = [r for r in results if r.get("status", "completed") == "completed"]
    failed = [r for r in results if r.get("status") == "failed"]
    metric = (
        metric
        or next((r.get("optimized_metric") for r in done if r.get("optimized_metric")), None)
        or "val/auc"
    )
    parsed = [dict(parse_override(o) for o in r.get("overrides", [])) for r in done]
    keys = sorted({k for p in parsed for k in p})
    swept = [k for k in keys if k not in seed_keys and len({p.get(k) for p in parsed}) > 1]
    fixed = {
        k: parsed[0][k] for k in keys if k not in seed_keys and k not in swept and k in parsed[0]
    }
    groups: dict[tuple, Row] = {}
    for r, p in zip(done, parsed, strict=True):
        key = tuple(p.get(k, "") for k in swept)
        groups.setdefault(key, Row(params=dict(zip(swept, key, strict=True)))).runs.append(r)
    metrics = sorted(
        {k for r in done for k in r.get("metrics", {}) if METRIC_RE.match(k)}
        | ({metric} if done else set()),
        key=lambda k: (k != metric, not k.startswith("val/"), k),
    )
    sign = -1.0 if _direction(metric, direction) == "max" else 1.0

    def order(row: Row) -> tuple:
        m = row.mean(metric)
        return (
            math.isnan(m),
            sign * m if not math.isnan(m) else 0.0,
            *(_sort_value(row.params[k]) for k in swept),
        )

    rows = sorted(groups.values(), key=order)
    return Summary(
        root=root,
        metric=metric,
        direction=_direction(metric, direction),
        swept=swept,
        fixed=fixed,
        seed_keys=tuple(seed_keys),
        metrics=metrics,
        rows=rows,
        failed=failed,
        missing=list(missing),
    )


def _short(value: str) -> str:
    """A swept value for display: sampled floats (Optuna) to 4 significant digits."""
    try:
        x = float(value)
    except ValueError:
        return value
    return value if x.is_integer() or len(value) <= 8 else f"{x:.4g}"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def to_markdown(s: Summary) -> str:
    """The summary table as markdown, with a header naming the objective and the fixed overrides."""
    lines = [
        f"# Multirun summary: {s.root}",
        "",
        f"{len(s.rows)} configurations, {sum(len(r.runs) for r in s.rows)} runs; sorted by "
        f"`{s.metric}` ({'higher' if s.direction == 'max' else 'lower'} is better); mean ± std over "
        f"{' / '.join(s.seed_keys)} (sample std, blank for one run).",
    ]
    if s.fixed:
        lines += ["", "Fixed overrides: " + " ".join(f"`{k}={v}`" for k, v in s.fixed.items())]
    if s.failed:
        lines += ["", f"Failed jobs: {', '.join(r['_dir'] for r in s.failed)}"]
    if s.missing:
        lines += [
            "",
            f"Jobs without {RESULTS} (running, killed or crashed): {', '.join(s.missing)}",
        ]
    header = ["#", *s.swept, "runs", *s.metrics, "wall time (s)"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for i, row in enumerate(s.rows, 1):
        cells = [
            str(i),
            *(_short(row.params[k]) for k in s.swept),
            str(len(row.runs)),
            *(_pm(row.mean(m), row.std(m)) for m in s.metrics),
            f"{row.mean('wall_time_s'):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(s: Summary, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                *s.swept,
                "runs",
                *(f"{m}_{x}" for m in s.metrics for x in ("mean", "std")),
                "wall_time_s_mean",
                "dirs",
            ]
        )
        for row in s.rows:
            w.writerow(
                [
                    *(row.params[k] for k in s.swept),
                    len(row.runs),
                    *(f"{v:.6g}" for m in s.metrics for v in (row.mean(m), row.std(m))),
                    f"{row.mean('wall_time_s'):.3f}",
                    " ".join(r["_dir"] for r in row.runs),
                ]
            )


def _continuous(levels: list[str]) -> bool:
    """Sampled values (Optuna) get a numeric axis; a grid of a few values gets categories."""
    return len(levels) > 6 and all(_sort_value(v)[0] == 0 for v in levels)


def plot(s: Summary, path: Path) -> bool:
    """One panel per swept parameter: every configuration's mean (± std over seeds) of the
    objective, and the mean over the other parameters per value as a line (grids) or the
    points alone on a numeric axis (sampled values). False when nothing was swept."""
    if not s.swept or not s.rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(s.swept)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], s.swept, strict=True):
        levels = sorted({r.params[key] for r in s.rows}, key=_sort_value)
        numeric = _continuous(levels)
        x_of = {v: (float(v) if numeric else i) for i, v in enumerate(levels)}
        by_level: dict[str, list[float]] = defaultdict(list)
        for j, row in enumerate(s.rows):
            m = row.mean(s.metric)
            if math.isnan(m):
                continue
            sd = row.std(s.metric)
            jitter = (
                0.15 * ((j % 7) / 6 - 0.5) if not numeric and len(s.rows) > len(levels) else 0.0
            )
            ax.errorbar(
                x_of[row.params[key]] + jitter,
                m,
                yerr=0 if math.isnan(sd) else sd,
                fmt="o",
                color="tab:blue",
                alpha=0.45,
                ms=4,
                capsize=2,
            )
            by_level[row.params[key]].append(m)
        if numeric:
            lo, hi = float(levels[0]), float(levels[-1])
            if lo > 0 and hi / lo > 100:
                ax.set_xscale("log")
        else:
            xs = [x_of[v] for v in levels if by_level[v]]
            ys = [sum(by_level[v]) / len(by_level[v]) for v in levels if by_level[v]]
            ax.plot(xs, ys, "-", color="tab:red", lw=2, label="mean over other params")
            ax.set_xticks(range(len(levels)), [_short(v) for v in levels])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(s.metric)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{s.metric} by swept parameter ({s.root.name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summarize(
    root: str | Path,
    *,
    metric: str | None = None,
    direction: str | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
    echo: bool = True,
) -> Summary:
    """Reads `root/*/results.json`, writes summary.{md,csv,png} into `root`, prints the table."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such multirun dir")
    results, missing = load_results(root)
    if not results:
        raise FileNotFoundError(f"{root}: no {RESULTS} in any job dir (is this a multirun dir?)")
    s = summarize_results(
        root, results, metric=metric, direction=direction, seed_keys=seed_keys, missing=missing
    )
    md = to_markdown(s)
    (root / "summary.md").write_text(md)
    write_csv(s, root / "summary.csv")
    plotted = plot(s, root / "summary.png")
    if echo:
        print(md)
        print(f"written: {root / 'summary.md'}, summary.csv" + (", summary.png" if plotted else ""))
    return s


class SweepSummary(Callback):
    """Hydra callback: writes and prints the multirun summary once all jobs have returned.

    A failing summary is logged, never raised: the jobs' results are already on disk.
    """

    def __init__(self, seed_keys: Sequence[str] = SEED_KEYS) -> None:
        self.seed_keys = tuple(seed_keys)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        direction = None
        sweeper_dir = config.hydra.sweeper.get("direction") if "sweeper" in config.hydra else None
        if isinstance(sweeper_dir, str):
            direction = sweeper_dir.lower()
        try:
            summarize(
                config.hydra.sweep.dir,
                metric=config.get("optimized_metric"),
                direction=direction,
                seed_keys=self.seed_keys,
            )
        except Exception as e:  # noqa: BLE001 - a summary must not fail a finished sweep
            log.error("multirun summary failed: %s", e)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m seqrank.utils.sweep", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="(re)write summary.{md,csv,png} of a multirun dir")
    s.add_argument("multirun_dir")
    s.add_argument("--metric", help="objective (default: the jobs' optimized_metric)")
    s.add_argument("--direction", choices=["max", "min"], help="default: min for *loss, else max")
    s.add_argument(
        "--seed-keys",
        default=",".join(SEED_KEYS),
        help="comma-separated overrides averaged over (default: seed)",
    )
    args = p.parse_args(argv)
    summarize(
        args.multirun_dir,
        metric=args.metric,
        direction=args.direction,
        seed_keys=tuple(k for k in args.seed_keys.split(",") if k),
    )


if __name__ == "__main__":
    main()

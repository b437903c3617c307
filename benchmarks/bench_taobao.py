"""Taobao UserBehavior preprocessing at scale: generated files of N rows -> processed store.

For each size, generates a UserBehavior.csv in the real format (timed), then runs the real
preprocessing path (SeqDataModule.prepare_data: streaming CSV checks, window filter, users cut
into ranges of `--chunk-rows` events, per range id remap, sort, `time` protocol splits,
negatives, store arrays appended; atomic rename) in a fresh subprocess and reports its wall time,
rows/s and peak RSS (ru_maxrss of that process right after prepare_data), plus the RSS ratio
between sizes; then the time and RSS of loading the store (setup(), memory-mapped).
`--chunk-rows 0` runs the in-memory path for comparison.

    python benchmarks/bench_taobao.py --rows 10000000 20000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rich.console
from rich.table import Table

CHILD = r"""
import json, resource, sys, time
from seqrank.data.datamodule import SeqDataModule
from seqrank.data.sources.taobao import TaobaoSource
raw, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss():
    # VmHWM: this process's own peak. ru_maxrss would also count the parent's RSS at fork, which
    # Linux carries across exec (a parent that just generated 20M rows inflates it by GBs).
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
dm = SeqDataModule(TaobaoSource(raw_dir=raw), name="bench", processed_dir=out, protocol="time", max_len=50,
                   chunk_rows=rows or None)
dm.prepare_data()
prep_s, prep_rss = time.perf_counter() - t, rss()
t = time.perf_counter()
dm.setup()
print(json.dumps({"seconds": prep_s, "peak_mib": prep_rss, "setup_s": time.perf_counter() - t,
                  "setup_peak_mib": rss(), "events": int(len(dm.store.events.item)),
                  "samples": dm.store.schema.split_sizes}))
"""


def generate(rows: int, out: Path) -> tuple[Path, float]:
    from seqrank.data.synthetic_taobao import SyntheticTaobaoSpec, _spec_tag, generate_taobao

    # the generator's user lengths average ~90 rows with mean_events=100: size users to reach `rows`
    spec = SyntheticTaobaoSpec(
        num_users=max(rows // 88, 10),
        num_items=4_000_000 if rows > 5e6 else 200_000,
        num_cates=9000 if rows > 5e6 else 1000,
        mean_events=100,
        max_events=1000,
    )
    t = time.perf_counter()
    path = (
        out / f"raw_{rows}_{_spec_tag(spec)}"
    )  # a changed generator gives new files, never stale ones
    if not (path / "UserBehavior.csv").exists():
        generate_taobao(path, spec)
    return path, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", nargs="+", type=int, default=[10_000_000, 20_000_000])
    p.add_argument("--work-dir", default="data/bench_taobao")
    p.add_argument(
        "--chunk-rows", type=int, default=2_000_000, help="events per range; 0 = in memory"
    )
    p.add_argument("--keep", action="store_true", help="keep the processed stores")
    a = p.parse_args()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in a.rows:
        raw, gen_s = generate(rows, work)
        csv = raw / "UserBehavior.csv"
        with open(csv, "rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
        out = work / f"processed_{rows}_{time.time_ns()}"
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(raw), str(out), str(a.chunk_rows)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(proc.stderr)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        results.append({"rows": lines, "bytes": csv.stat().st_size, "gen_s": gen_s, **res})
    how = f"out of core, ranges of {a.chunk_rows:,} events" if a.chunk_rows else "in memory"
    t = Table(title=f"Taobao UserBehavior preprocessing (generated files, real path, {how})")
    for c in (
        "rows",
        "CSV MiB",
        "generate s",
        "prepare_data s",
        "rows/s",
        "events kept",
        "prepare peak RSS MiB",
        "RSS vs first",
        "setup s",
        "setup peak RSS MiB",
    ):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(
            f"{r['rows']:,}",
            f"{r['bytes'] / 2**20:.0f}",
            f"{r['gen_s']:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['rows'] / r['seconds']:,.0f}",
            f"{r['events']:,}",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] / results[0]['peak_mib']:.2f}x",
            f"{r['setup_s']:.2f}",
            f"{r['setup_peak_mib']:.0f}",
        )
    rich.console.Console(width=220).print(t)
    print(
        "note: each size runs in a fresh process; RSS is that process's peak (VmHWM: prepare_data, then"
        " after setup(), which memory-maps the store)."
    )


if __name__ == "__main__":
    main()

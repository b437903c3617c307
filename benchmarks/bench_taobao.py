"""Taobao UserBehavior preprocessing at scale: generated files of N rows -> processed store.

For each size, generates a UserBehavior.csv in the real format (timed), then runs the real
preprocessing path (SeqDataModule.prepare_data: streaming CSV scan, window filter, id remap,
sort, `time` protocol splits, negatives, atomic store write) in a fresh subprocess and reports
wall time, rows/s and the subprocess's peak RSS, plus the RSS ratio between sizes.

    python benchmarks/bench_taobao.py --rows 10000000 20000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import rich
from rich.table import Table

CHILD = r"""
import json, sys, time
from seqrank.data.datamodule import SeqDataModule
from seqrank.data.sources.taobao import TaobaoSource
raw, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
dm = SeqDataModule(TaobaoSource(raw_dir=raw), name="bench", processed_dir=out, protocol="time", max_len=50)
dm.prepare_data(); dm.setup()
print(json.dumps({"seconds": time.perf_counter() - t, "events": int(len(dm.store.events.item)),
                  "samples": dm.store.schema.split_sizes}))
"""


def generate(rows: int, out: Path) -> tuple[Path, float]:
    from seqrank.data.synthetic_taobao import SyntheticTaobaoSpec, generate_taobao

    # the generator's user lengths average ~90 rows with mean_events=100: size users to reach `rows`
    spec = SyntheticTaobaoSpec(num_users=max(rows // 88, 10), num_items=4_000_000 if rows > 5e6 else 200_000,
                               num_cates=9000 if rows > 5e6 else 1000, mean_events=100, max_events=1000)
    t = time.perf_counter()
    path = out / f"raw_{rows}"
    if not (path / "UserBehavior.csv").exists():
        generate_taobao(path, spec)
    return path, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=int, default=[10_000_000, 20_000_000])
    p.add_argument("--work-dir", default="data/bench_taobao")
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
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"rows": lines, "bytes": csv.stat().st_size, "gen_s": gen_s, "prep_s": res["seconds"],
                        "events": res["events"], "peak_mib": max(peak, before) / 1024})
    t = Table(title="Taobao UserBehavior preprocessing (generated files, real path)")
    for c in ("rows", "CSV MiB", "generate s", "preprocess s", "rows/s", "events kept", "peak RSS MiB", "RSS vs first"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(f"{r['rows']:,}", f"{r['bytes'] / 2**20:.0f}", f"{r['gen_s']:.1f}", f"{r['prep_s']:.1f}",
                  f"{r['rows'] / r['prep_s']:,.0f}", f"{r['events']:,}", f"{r['peak_mib']:.0f}",
                  f"{r['peak_mib'] / results[0]['peak_mib']:.2f}x")
    rich.print(t)
    print("note: ru_maxrss of children is a running maximum; sizes run in ascending order.")


if __name__ == "__main__":
    main()

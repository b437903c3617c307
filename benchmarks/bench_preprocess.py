"""Amazon preprocessing at full Electronics scale: raw files -> processed store.

Generates Amazon-2014-format files with Electronics' sizes (1,689,188 review lines with review
text, 63,001 meta lines; gzip), then times in fresh subprocesses, with peak RSS:
  seqrank    AmazonSource -> preprocess (loo) -> atomic store write (the real path)
  pandas     a straightforward pandas version of the DIN/ATRank recipe written here: per-line
             parsing into DataFrames, sorted-unique id maps, sort, groupby per user building
             samples with a per-sample negative-sampling loop (as DIN's build_dataset.py does)
and prints the ratio.

    python benchmarks/bench_preprocess.py            # full scale
    python benchmarks/bench_preprocess.py --users 20000 --items 8000   # quick
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

OURS = r"""
import json, sys, time
from seqrank.data.datamodule import SeqDataModule
from seqrank.data.sources.amazon import AmazonSource
t = time.perf_counter()
dm = SeqDataModule(AmazonSource(raw_dir=sys.argv[1], category="Synthetic"), name="bench", processed_dir=sys.argv[2])
dm.prepare_data(); dm.setup()
print(json.dumps({"seconds": time.perf_counter() - t, "samples": dm.store.schema.split_sizes}))
"""

PANDAS = r"""
import ast, gzip, json, random, sys, time
import pandas as pd
t = time.perf_counter()
raw = sys.argv[1]
rows = [json.loads(line) for line in gzip.open(f"{raw}/reviews_Synthetic_5.json.gz", "rt")]
reviews = pd.DataFrame(rows)[["reviewerID", "asin", "unixReviewTime"]]
meta = pd.DataFrame([ast.literal_eval(line) for line in gzip.open(f"{raw}/meta_Synthetic.json.gz", "rt")])
meta = meta[meta["asin"].isin(reviews["asin"].unique())][["asin", "categories"]]
meta["categories"] = meta["categories"].map(lambda x: x[-1][-1])
def build_map(df, col):
    key = sorted(df[col].unique().tolist()); m = dict(zip(key, range(len(key))))
    df[col] = df[col].map(lambda x: m[x]); return m, key
asin_map, asin_key = build_map(meta, "asin")
cate_map, cate_key = build_map(meta, "categories")
revi_map, revi_key = build_map(reviews, "reviewerID")
reviews["asin"] = reviews["asin"].map(lambda x: asin_map.get(x, -1))
reviews = reviews.sort_values(["reviewerID", "unixReviewTime"])
item_count = len(asin_map)
random.seed(1234)
train, val, test = [], [], []
for reviewerID, hist in reviews.groupby("reviewerID"):
    pos_list = hist["asin"].tolist()
    def gen_neg():
        neg = pos_list[0]
        while neg in pos_list:
            neg = random.randint(0, item_count - 1)
        return neg
    neg_list = [gen_neg() for _ in range(len(pos_list))]
    for i in range(1, len(pos_list)):
        h = pos_list[:i]
        rows = [(reviewerID, h, pos_list[i], 1), (reviewerID, h, neg_list[i], 0)]
        (test if i == len(pos_list) - 1 else val if i == len(pos_list) - 2 else train).extend(rows)
print(json.dumps({"seconds": time.perf_counter() - t, "samples": {"train": len(train), "val": len(val), "test": len(test)}}))
"""


def run(code: str, *args: str) -> tuple[dict, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(proc.stdout.strip().splitlines()[-1]), max(peak, before) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=192_403)
    p.add_argument("--items", type=int, default=63_001)
    p.add_argument("--cates", type=int, default=801)
    p.add_argument("--mean-events", type=float, default=1_689_188 / 192_403)
    p.add_argument("--skip-pandas", action="store_true")
    p.add_argument("--work-dir", default="data/bench_preprocess")
    a = p.parse_args()
    from seqrank.data.synthetic import SyntheticAmazonSpec, generate_amazon

    spec = SyntheticAmazonSpec(num_users=a.users, num_items=a.items, num_cates=a.cates,
                               mean_events=a.mean_events, frac_items_without_meta=0.0)
    raw = Path(a.work_dir) / f"raw_{a.users}_{a.items}"
    t = time.perf_counter()
    if not (raw / "reviews_Synthetic_5.json.gz").exists():
        generate_amazon(raw, spec)
    gen_s = time.perf_counter() - t
    lines = sum(1 for _ in __import__("gzip").open(raw / "reviews_Synthetic_5.json.gz", "rb"))
    ours, ours_rss = run(OURS, str(raw), str(Path(a.work_dir) / f"processed_{time.time_ns()}"))
    rows = [("seqrank", ours, ours_rss)]
    if not a.skip_pandas:
        ref, ref_rss = run(PANDAS, str(raw))
        rows.append(("pandas DIN recipe", ref, ref_rss))
    table = Table(title=f"Amazon preprocessing: {lines:,} review lines, {a.items:,} meta lines (generated in {gen_s:.0f}s)")
    for c in ("implementation", "wall s", "peak RSS MiB", "train samples", "speed-up vs pandas"):
        table.add_column(c, justify="right")
    for name, res, rss in rows:
        speed = rows[-1][1]["seconds"] / res["seconds"] if len(rows) > 1 else float("nan")
        table.add_row(name, f"{res['seconds']:.1f}", f"{rss:.0f}", f"{res['samples']['train']:,}", f"{speed:.1f}x")
    rich.print(table)
    print("note: peak RSS is ru_maxrss of the subprocesses (a running maximum, seqrank runs first).")


if __name__ == "__main__":
    main()

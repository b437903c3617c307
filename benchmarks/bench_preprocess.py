"""Amazon preprocessing at full Electronics scale: raw files -> processed store.

Generates Amazon-2014-format files with Electronics' sizes (1,689,188 review lines with review
text, 63,001 meta lines; gzip), then times in fresh subprocesses, with each one's peak RSS:
  seqrank    SeqDataModule(AmazonSource).prepare_data(): reader (polars NDJSON) -> preprocess
             (loo) -> atomic store write; the real path (then setup(), timed apart)
  pandas     the DIN/ATRank recipe (DIN's utils/1_convert_pd.py, 2_remap_id.py,
             build_dataset.py, written out here): `eval` per line into dicts -> pandas
             DataFrame.from_dict, meta kept for reviewed items, sorted-unique id maps applied with
             `map(lambda)`, sort by (user, time), then a Python loop over groupby(reviewerID)
             building (user, hist, target, label) rows with one random negative per position
             (`while neg in pos_list`), shuffled; pickled like the recipe
and prints both times and the ratio.

    python benchmarks/bench_preprocess.py            # full scale
    python benchmarks/bench_preprocess.py --users 20000 --items 8000   # quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rich.console
from rich.table import Table

OURS = r"""
import json, resource, sys, time
from seqrank.data.datamodule import SeqDataModule
from seqrank.data.sources.amazon import AmazonSource
def rss():
    # VmHWM: this process's own peak (ru_maxrss also counts the parent's RSS at fork on Linux)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
dm = SeqDataModule(AmazonSource(raw_dir=sys.argv[1], category="Synthetic"), name="bench", processed_dir=sys.argv[2])
dm.prepare_data()
prep_s, prep_rss = time.perf_counter() - t, rss()
t = time.perf_counter()
dm.setup()
print(json.dumps({"seconds": prep_s, "peak_mib": prep_rss, "setup_s": time.perf_counter() - t,
                  "samples": dm.store.schema.split_sizes}))
"""

# DIN (github.com/zhougr1993/DeepInterestNetwork, utils/), the three scripts in one, paths changed.
PANDAS = r"""
import gzip, json, pickle, random, resource, sys, time
import numpy as np
import pandas as pd
def rss():
    # VmHWM: this process's own peak (ru_maxrss also counts the parent's RSS at fork on Linux)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
raw, out = sys.argv[1], sys.argv[2]

# 1_convert_pd.py
def to_df(file_path):
    with gzip.open(file_path, "rt") as fin:
        df = {}
        i = 0
        for line in fin:
            df[i] = eval(line)
            i += 1
        df = pd.DataFrame.from_dict(df, orient="index")
        return df
reviews_df = to_df(f"{raw}/reviews_Synthetic_5.json.gz")
with open(f"{out}/reviews.pkl", "wb") as f:
    pickle.dump(reviews_df, f, pickle.HIGHEST_PROTOCOL)
meta_df = to_df(f"{raw}/meta_Synthetic.json.gz")
meta_df = meta_df[meta_df["asin"].isin(reviews_df["asin"].unique())]
meta_df = meta_df.reset_index(drop=True)
with open(f"{out}/meta.pkl", "wb") as f:
    pickle.dump(meta_df, f, pickle.HIGHEST_PROTOCOL)

# 2_remap_id.py
reviews_df = reviews_df[["reviewerID", "asin", "unixReviewTime"]]
meta_df = meta_df[["asin", "categories"]]
meta_df["categories"] = meta_df["categories"].map(lambda x: x[-1][-1])
def build_map(df, col_name):
    key = sorted(df[col_name].unique().tolist())
    m = dict(zip(key, range(len(key))))
    df[col_name] = df[col_name].map(lambda x: m[x])
    return m, key
asin_map, asin_key = build_map(meta_df, "asin")
cate_map, cate_key = build_map(meta_df, "categories")
revi_map, revi_key = build_map(reviews_df, "reviewerID")
user_count, item_count, cate_count, example_count = len(revi_map), len(asin_map), len(cate_map), reviews_df.shape[0]
meta_df = meta_df.sort_values("asin")
meta_df = meta_df.reset_index(drop=True)
reviews_df["asin"] = reviews_df["asin"].map(lambda x: asin_map[x])
reviews_df = reviews_df.sort_values(["reviewerID", "unixReviewTime"])
reviews_df = reviews_df.reset_index(drop=True)
reviews_df = reviews_df[["reviewerID", "asin", "unixReviewTime"]]
cate_list = [meta_df["categories"][i] for i in range(len(asin_map))]
cate_list = np.array(cate_list, dtype=np.int32)
with open(f"{out}/remap.pkl", "wb") as f:
    pickle.dump(reviews_df, f, pickle.HIGHEST_PROTOCOL)
    pickle.dump(cate_list, f, pickle.HIGHEST_PROTOCOL)
    pickle.dump((user_count, item_count, cate_count, example_count), f, pickle.HIGHEST_PROTOCOL)
    pickle.dump((asin_key, cate_key, revi_key), f, pickle.HIGHEST_PROTOCOL)

# build_dataset.py
random.seed(1234)
train_set = []
test_set = []
for reviewerID, hist in reviews_df.groupby("reviewerID"):
    pos_list = hist["asin"].tolist()
    def gen_neg():
        neg = pos_list[0]
        while neg in pos_list:
            neg = random.randint(0, item_count - 1)
        return neg
    neg_list = [gen_neg() for i in range(len(pos_list))]
    for i in range(1, len(pos_list)):
        hist = pos_list[:i]
        if i != len(pos_list) - 1:
            train_set.append((reviewerID, hist, pos_list[i], 1))
            train_set.append((reviewerID, hist, neg_list[i], 0))
        else:
            label = (pos_list[i], neg_list[i])
            test_set.append((reviewerID, hist, label))
random.shuffle(train_set)
random.shuffle(test_set)
assert len(test_set) == user_count
with open(f"{out}/dataset.pkl", "wb") as f:
    pickle.dump(train_set, f, pickle.HIGHEST_PROTOCOL)
    pickle.dump(test_set, f, pickle.HIGHEST_PROTOCOL)
    pickle.dump(cate_list, f, pickle.HIGHEST_PROTOCOL)
    pickle.dump((user_count, item_count, cate_count), f, pickle.HIGHEST_PROTOCOL)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mib": rss(),
                  "samples": {"train": len(train_set), "test": 2 * len(test_set)}}))
"""


def run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=192_403)
    p.add_argument("--items", type=int, default=63_001)
    p.add_argument("--cates", type=int, default=801)
    p.add_argument("--mean-events", type=float, default=1_689_188 / 192_403)
    p.add_argument("--skip-pandas", action="store_true")
    p.add_argument("--work-dir", default="data/bench_preprocess")
    a = p.parse_args()
    from seqrank.data.synthetic import SyntheticAmazonSpec, generate_amazon

    spec = SyntheticAmazonSpec(
        num_users=a.users,
        num_items=a.items,
        num_cates=a.cates,
        mean_events=a.mean_events,
        frac_items_without_meta=0.0,
    )
    raw = Path(a.work_dir) / f"raw_{a.users}_{a.items}"
    t = time.perf_counter()
    if not (raw / "reviews_Synthetic_5.json.gz").exists():
        generate_amazon(raw, spec)
    gen_s = time.perf_counter() - t
    with gzip.open(raw / "reviews_Synthetic_5.json.gz", "rb") as fh:
        lines = sum(1 for _ in fh)
    work = Path(a.work_dir) / f"run_{time.time_ns()}"
    work.mkdir(parents=True)
    try:
        rows = [("seqrank (prepare_data)", run(OURS, str(raw), str(work / "processed")))]
        if not a.skip_pandas:
            (work / "din").mkdir()
            rows.append(("pandas DIN/ATRank recipe", run(PANDAS, str(raw), str(work / "din"))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(
        title=f"Amazon preprocessing: {lines:,} review lines, {a.items:,} meta lines (generated in {gen_s:.0f}s)"
    )
    for c in (
        "implementation",
        "wall s",
        "peak RSS MiB",
        "samples (train/val/test)",
        "speed-up vs pandas",
    ):
        table.add_column(c, justify="right")
    ref = rows[-1][1]["seconds"] if len(rows) > 1 else float("nan")
    for name, res in rows:
        sizes = "/".join(f"{res['samples'].get(k, 0):,}" for k in ("train", "val", "test"))
        table.add_row(
            name,
            f"{res['seconds']:.1f}",
            f"{res['peak_mib']:.0f}",
            sizes,
            f"{ref / res['seconds']:.1f}x",
        )
    rich.console.Console(width=220).print(table)
    print(
        f"seqrank setup() (memory-maps the store): {rows[0][1]['setup_s']:.2f}s. Splits differ by protocol: "
        "seqrank loo (val = second-last), DIN train/test (test counted as pos+neg rows)."
    )


if __name__ == "__main__":
    main()

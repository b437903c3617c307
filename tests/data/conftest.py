"""Shared fixtures for the data tests: a tiny synthetic spec, writers of raw Amazon files in
their exact formats, the real shared samples (skipped when absent) and a checker of the split
invariants of DESIGN.md section 5."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from seqrank.data.batching import gather_numpy
from seqrank.data.preprocess import MIN_EVENTS, Processed
from seqrank.data.synthetic import DAY, AmazonOracle, SyntheticAmazonSpec, generate_amazon, simulate

REAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "amazon_electronics"
REAL_REVIEWS = REAL_DIR / "reviews_Electronics_5.json"
PEER_CSV = REAL_DIR / "peer_preprocessed" / "amazon_electronics_sample.csv"

TINY_SPEC = SyntheticAmazonSpec(
    num_users=60, num_items=200, num_cates=10, frac_items_without_meta=0.1, seed=3
)


# -- raw file writers -------------------------------------------------------------------------
def review(user: str, asin: str, t: Any, *, name: str | None = "someone", **extra: Any) -> dict:
    """One review record in the real key order; `name=None` leaves out `reviewerName`."""
    rec: dict[str, Any] = {"reviewerID": user, "asin": asin}
    if name is not None:
        rec["reviewerName"] = name
    rec |= {"helpful": [0, 0], "reviewText": "fine", "overall": 5.0, "summary": "Ok"}
    if t is not None:
        rec["unixReviewTime"] = t
    rec["reviewTime"] = "06 2, 2013"
    rec |= extra
    return rec


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def write_reviews(
    path: Path, lines: Iterable[dict | bytes | str], *, gz: bool | None = None
) -> Path:
    """Strict JSON lines (dicts are json.dumps'ed, bytes/str written verbatim), gzip when `gz`
    (default: when the name ends with .gz)."""
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out += line + b"\n"
    return _write(path, bytes(out), path.suffix == ".gz" if gz is None else gz)


def write_meta(path: Path, lines: Iterable[dict | bytes | str], *, gz: bool | None = None) -> Path:
    """Python-literal lines written with repr() (single quotes), as the real meta files."""
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            line = repr(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out += line + b"\n"
    return _write(path, bytes(out), path.suffix == ".gz" if gz is None else gz)


@pytest.fixture
def raw_writers() -> Any:
    """The writers as a namespace, for tests that want them as a fixture."""

    class W:
        reviews = staticmethod(write_reviews)
        meta = staticmethod(write_meta)
        rec = staticmethod(review)

    return W


# -- synthetic data ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_spec() -> SyntheticAmazonSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """reviews, meta and oracle files of TINY_SPEC, generated once per session (read-only use)."""
    return generate_amazon(tmp_path_factory.mktemp("synthetic"), TINY_SPEC)


def simulated_events(spec: SyntheticAmazonSpec) -> pl.DataFrame:
    """The canonical events table straight from the generator (no files involved)."""
    oracle = AmazonOracle.build(spec)
    ev = simulate(oracle)
    return pl.DataFrame(
        {
            "user_id": [f"u{u:04d}" for u, _, _ in ev],
            "item_id": [str(oracle.asins[i]) for _, i, _ in ev],
            "cate_id": [f"c{int(oracle.item_cate[i])}" for _, i, _ in ev],
            "timestamp": [d * DAY for _, _, d in ev],
            "behavior": [1] * len(ev),
        },
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "cate_id": pl.String,
            "timestamp": pl.Int64,
            "behavior": pl.Int8,
        },
    )


@pytest.fixture(scope="session")
def sim_events() -> pl.DataFrame:
    """Simulated events of TINY_SPEC plus a 1-event user and a 2-event user (too short for loo,
    the 2-event one long enough for paper), appended in reverse time order."""
    base = simulated_events(TINY_SPEC)
    items = base["item_id"].unique().sort().to_list()
    short = pl.DataFrame(
        {
            "user_id": ["zz_one", "zz_two", "zz_two"],
            "item_id": [items[0], items[2], items[1]],
            "cate_id": [
                base.filter(pl.col("item_id") == i)["cate_id"][0]
                for i in (items[0], items[2], items[1])
            ],
            "timestamp": [1_300_000_000, 1_300_100_000, 1_300_000_000],
            "behavior": [1, 1, 1],
        },
        schema=base.schema,
    )
    return pl.concat([base, short])


# -- real shared samples ----------------------------------------------------------------------
@pytest.fixture
def real_reviews() -> Path:
    if not REAL_REVIEWS.exists():
        pytest.skip(f"real Amazon sample not present: {REAL_REVIEWS}")
    return REAL_REVIEWS


@pytest.fixture
def peer_csv() -> Path:
    if not PEER_CSV.exists():
        pytest.skip(f"peer preprocessed CSV not present: {PEER_CSV}")
    return PEER_CSV


# -- split invariants -------------------------------------------------------------------------
def check_split_invariants(p: Processed, events: pl.DataFrame, protocol: str) -> None:
    """Asserts every invariant of the processed arrays and splits for `protocol` against the
    canonical `events` table they came from (DESIGN.md sections 3 and 5)."""
    ev = p.events
    off = np.asarray(ev.user_offsets)
    n = np.diff(off)
    num_users = len(off) - 1

    # id 0 is padding in every vocabulary
    for kind in ("user", "item", "cate"):
        assert p.ids[kind][0] == "", (
            f"ids[{kind}][0] must be the padding '', got {p.ids[kind][0]!r}"
        )
    assert n[0] == 0, "user 0 is padding and must have no events"
    assert (n[1:] >= MIN_EVENTS[protocol]).all(), (
        f"a kept user is shorter than {MIN_EVENTS[protocol]}"
    )
    assert ev.item.min() >= 1 and ev.item.max() < len(p.ids["item"]), "event item ids out of 1..I"
    assert ev.item_cate[0] == 0, "item 0 (padding) must have category 0"
    assert (ev.item_cate[1:] >= 1).all(), "every real item needs a real category id (>= 1)"
    assert (ev.behavior >= 1).all(), "behaviour 0 is padding"

    # events sorted by (user, time), ties in file order, and equal to the input rows
    raw_users = events["user_id"].cast(pl.String).to_list()
    raw_items = events["item_id"].cast(pl.String).to_list()
    raw_cates = events["cate_id"].cast(pl.String).to_list()
    raw_ts = events["timestamp"].to_list()
    by_user: dict[str, list[tuple[int, int]]] = {}
    for row, (u, t) in enumerate(zip(raw_users, raw_ts, strict=True)):
        by_user.setdefault(u, []).append((t, row))
    kept = {u for u, rows in by_user.items() if len(rows) >= MIN_EVENTS[protocol]}
    assert set(p.ids["user"][1:].tolist()) == kept, "kept users differ from the users long enough"
    for u in range(1, num_users):
        raw_u = str(p.ids["user"][u])
        expected = [row for _, row in sorted(by_user[raw_u], key=lambda tr: tr[0])]  # stable
        got_items = p.ids["item"][ev.item[off[u] : off[u + 1]]].tolist()
        got_ts = ev.ts[off[u] : off[u + 1]].tolist()
        assert got_items == [raw_items[r] for r in expected], (
            f"user {raw_u}: items not in (time, file) order"
        )
        assert got_ts == [raw_ts[r] for r in expected], f"user {raw_u}: timestamps not sorted"
        for r in expected:  # item -> category mapping matches the input
            i = int(np.flatnonzero(p.ids["item"] == raw_items[r])[0])
            assert p.ids["cate"][ev.item_cate[i]] == raw_cates[r], (
                f"item {raw_items[r]}: wrong category"
            )

    # sample columns: pairs (positive, negative) at the same (user, pos)
    expected_splits = {"paper": {"train", "test"}, "loo": {"train", "val", "test"}}[protocol]
    assert set(p.splits) == expected_splits, f"{protocol}: splits {sorted(p.splits)}"
    history = [set(ev.item[off[u] : off[u + 1]].tolist()) for u in range(num_users)]
    max_len = int(n.max())
    for split, s in p.splits.items():
        assert len(s) % 2 == 0, f"{split}: odd number of samples {len(s)}"
        lab = np.asarray(s.label)
        assert (lab[0::2] == 1).all() and (lab[1::2] == 0).all(), (
            f"{split}: rows must alternate 1, 0"
        )
        assert (s.user[0::2] == s.user[1::2]).all() and (s.pos[0::2] == s.pos[1::2]).all(), (
            f"{split}: a negative must share (user, pos) with its positive"
        )
        assert (s.user >= 1).all() and (s.target >= 1).all(), f"{split}: padding id used in samples"
        pos_u, pos_p = s.user[0::2].astype(np.int64), s.pos[0::2].astype(np.int64)
        assert (s.target[0::2] == ev.item[off[pos_u] + pos_p]).all(), (
            f"{split}: positive != observed item"
        )
        for u, neg in zip(s.user[1::2].tolist(), s.target[1::2].tolist(), strict=True):
            assert neg not in history[u], f"{split}: negative {neg} is in user {u}'s history"
        # positions per protocol
        lo_hi = {
            ("loo", "train"): (1, -3),
            ("loo", "val"): (-2, -2),
            ("loo", "test"): (-1, -1),
            ("paper", "train"): (1, -2),
            ("paper", "test"): (-1, -1),
        }[(protocol, split)]
        want: list[tuple[int, int]] = []
        for u in range(1, num_users):
            lo = lo_hi[0] if lo_hi[0] > 0 else n[u] + lo_hi[0]
            hi = n[u] + lo_hi[1]
            want += [(u, q) for q in range(max(lo, 1), hi + 1)]
        got = sorted(zip(pos_u.tolist(), pos_p.tolist(), strict=True))
        assert got == sorted(want), f"{protocol}/{split}: target positions differ from the protocol"
        # no future event in any history: gather and compare with the user's past
        g = gather_numpy(ev, s, np.arange(len(s)), max_len)
        for k in range(len(s)):
            u, q = int(s.user[k]), int(s.pos[k])
            m = g["hist_mask"][k]
            assert m.sum() == q, f"{split}[{k}]: history length {m.sum()} != pos {q}"
            abs_hist = off[u] + np.arange(q)
            assert (g["hist_item"][k][m] == ev.item[abs_hist]).all(), (
                f"{split}[{k}]: history is not the past"
            )
            assert (ev.ts[abs_hist] <= ev.ts[off[u] + q]).all(), (
                f"{split}[{k}]: future event in history"
            )
            assert (g["hist_gap"][k][m] == ev.ts[off[u] + q] - ev.ts[abs_hist]).all(), (
                f"{split}[{k}]: gap"
            )


@pytest.fixture
def split_invariants() -> Callable[[Processed, pl.DataFrame, str], None]:
    return check_split_invariants

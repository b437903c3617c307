"""Tianchi UserBehavior: the reader (window filter, bad rows, the real sample), the `loo` and
`time` protocols with target behaviours, the synthetic generator (format, determinism, planted
signal) and its oracle (a distribution, calibrated), and the data module end to end."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from seqrank.data.batching import SampleArrays, gather_numpy
from seqrank.data.datamodule import SeqDataModule, target_behavior_ids
from seqrank.data.errors import BadLines, DataError, MissingDataError
from seqrank.data.preprocess import (
    ALL_PROTOCOLS,
    MIN_TARGETS,
    make_splits,
    preprocess,
    to_event_arrays,
)
from seqrank.data.sources import taobao
from seqrank.data.sources.taobao import (
    BEHAVIORS,
    DAY,
    WINDOW,
    TaobaoSource,
    read_taobao,
    split_times,
)
from seqrank.data.synthetic_taobao import (
    SyntheticTaobaoSource,
    SyntheticTaobaoSpec,
    TaobaoOracle,
    generate_taobao,
)

REAL_CSV = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "real"
    / "taobao_userbehavior"
    / "UserBehavior.csv"
)
TINY = SyntheticTaobaoSpec(
    num_users=150, num_items=3000, num_cates=40, mean_events=40, frac_out_of_window=0.004, seed=5
)
WS, WE = WINDOW
VAL_START, TEST_START = split_times(WINDOW)
CODE = {b: i + 1 for i, b in enumerate(BEHAVIORS)}


def write_rows(path: Path, rows: list) -> Path:
    """Rows as tuples (joined with commas) or raw strings, one per line."""
    path.write_text(
        "".join((r if isinstance(r, str) else ",".join(map(str, r))) + "\n" for r in rows)
    )
    return path


def reference_read(path: Path, window: tuple[int, int] | None = WINDOW) -> pl.DataFrame:
    """The events table by the csv module, row by row: what the streaming reader must return."""
    out = []
    with open(path, newline="") as f:
        for u, i, c, b, t in csv.reader(f):
            if window is None or window[0] <= int(t) < window[1]:
                out.append((int(u), int(i), int(c), int(t), CODE[b]))
    schema = {
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "cate_id": pl.Int64,
        "timestamp": pl.Int64,
        "behavior": pl.Int8,
    }
    return pl.DataFrame(out, schema=schema, orient="row")


def reference_positions(
    p, protocol: str, targets: tuple[int, ...] | None, times: tuple[int, int]
) -> dict:
    """(user, pos) of the positives per split, by the protocol's definition, user by user."""
    ev, off = p.events, p.events.user_offsets
    want: dict[str, list] = {"train": [], "val": [], "test": []}
    for u in range(1, len(off) - 1):
        b, ts = ev.behavior[off[u] : off[u + 1]], ev.ts[off[u] : off[u + 1]]
        elig = [q for q in range(1, len(b)) if targets is None or b[q] in targets]
        if protocol == "time":
            for q in elig:
                split = "test" if ts[q] >= times[1] else "val" if ts[q] >= times[0] else "train"
                want[split].append((u, q))
        else:
            want["test"] += [(u, q) for q in elig[-1:]]
            want["val"] += [(u, q) for q in elig[-2:-1]]
            want["train"] += [(u, q) for q in elig[:-2]]
    return want


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_taobao(tmp_path_factory.mktemp("taobao"), TINY)


@pytest.fixture(scope="module")
def tiny_events(tiny_csv: Path) -> pl.DataFrame:
    return read_taobao(tiny_csv)[0]


@pytest.fixture
def real_csv() -> Path:
    if not REAL_CSV.exists():
        pytest.skip(f"real UserBehavior sample not present: {REAL_CSV}")
    return REAL_CSV


# -- the reader ---------------------------------------------------------------------------------
def test_generated_file_has_the_real_format(tiny_csv: Path) -> None:
    lines = tiny_csv.read_text().splitlines()
    rows = [line.split(",") for line in lines]
    assert all(len(r) == 5 for r in rows) and not lines[0].startswith("user"), "no header, 5 fields"
    assert {r[3] for r in rows} == set(BEHAVIORS)
    users = [r[0] for r in rows]
    blocks = [u for k, u in enumerate(users) if k == 0 or u != users[k - 1]]
    assert blocks == sorted(set(users)), "users contiguous and in lexicographic (string) order"
    assert blocks != sorted(set(users), key=int), "string order differs from numeric order"
    ts = np.array([int(r[4]) for r in rows])
    same_user = np.array(users[1:]) == np.array(users[:-1])
    assert (ts[1:][same_user] > ts[:-1][same_user]).all(), "each user's rows strictly in time order"
    out = ((ts < WS) | (ts >= WE)).sum()
    assert 0 < out < 0.02 * len(ts), f"a few dirty rows outside the window, got {out}"


def test_reader_on_generated_file(tiny_csv: Path) -> None:
    events, rep = read_taobao(tiny_csv)
    ref = reference_read(tiny_csv)
    assert events.columns == ["user_id", "item_id", "cate_id", "timestamp", "behavior"]
    assert events.equals(ref), "streaming reader must return the rows of a plain csv read, in order"
    all_rows = reference_read(tiny_csv, window=None)
    assert rep.rows == all_rows.height and rep.events == events.height
    assert rep.rows_out_of_window == all_rows.height - events.height > 0
    counts = all_rows["behavior"].value_counts()
    assert rep.behaviors == {
        b: int(counts.filter(pl.col("behavior") == CODE[b])["count"].sum()) for b in BEHAVIORS
    }
    assert rep.path == "fast" and rep.bad_lines == {} and rep.users == events["user_id"].n_unique()


def test_all_three_reading_paths_agree(tiny_csv: Path) -> None:
    """The fast typed scan, the line-numbered polars path and the Python loop return the same
    events and counts (the slow paths only run when a file has bad lines)."""
    fast, rep = read_taobao(tiny_csv)
    for path_fn in (taobao._precise, taobao._python):
        bad = BadLines("error")
        events, counts = path_fn(tiny_csv, WINDOW, bad)
        if isinstance(events, pl.LazyFrame):  # the polars paths return the events lazily
            events = events.collect()
        assert events.equals(fast), path_fn.__name__
        assert counts == {
            "rows": rep.rows,
            "out": rep.rows_out_of_window,
            "behaviors": rep.behaviors,
        }


def test_window_filter_drops_and_counts(tmp_path: Path) -> None:
    rows = [
        (1, 10, 100, "pv", WS - 1),
        (1, 11, 100, "pv", WS),
        (1, 12, 101, "buy", WE - 1),
        (1, 13, 101, "cart", WE),
        (2, 10, 100, "fav", WS + 5),
    ]
    path = write_rows(tmp_path / "UserBehavior.csv", rows)
    events, rep = read_taobao(path)
    assert events["timestamp"].to_list() == [WS, WE - 1, WS + 5], (
        "[start, end): start kept, end dropped"
    )
    assert rep.rows == 5 and rep.rows_out_of_window == 2 and rep.events == 3
    assert rep.behaviors == {"pv": 2, "cart": 1, "fav": 1, "buy": 1}, "counted before the filter"
    events, rep = read_taobao(path, window=None)
    assert events.height == 5 and rep.rows_out_of_window == 0
    # ISO strings, naive = Beijing time: a window of the first day only
    events, rep = read_taobao(path, window=("2017-11-25", "2017-11-26T00:00:00+08:00"))
    assert events["timestamp"].to_list() == [WS, WS + 5] and rep.rows_out_of_window == 3
    with pytest.raises(ValueError, match="before end"):
        read_taobao(path, window=(WE, WS))


BAD_ROWS = {
    "four_columns": ("2,20,200,pv", "4 fields"),
    "six_columns": ("2,20,200,pv,1511600000,7", "6 fields"),
    "unknown_behaviour": ("2,20,200,click,1511600000", "unknown behaviour 'click'"),
    "non_integer_timestamp": ("2,20,200,pv,2017-11-26", "timestamp is not an integer"),
    "non_integer_item": ("2,abc,200,pv,1511600000", "item_id is not an integer"),
    "empty_line": ("", "empty line"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_error_names_file_and_line(tmp_path: Path, case: str) -> None:
    line, reason = BAD_ROWS[case]
    good = [(1, 10, 100, "pv", WS + 1), (1, 11, 100, "buy", WS + 2)]
    path = write_rows(tmp_path / "UserBehavior.csv", [good[0], line, good[1], line])
    with pytest.raises(DataError, match=rf"UserBehavior\.csv:2: .*{reason}") as e:
        read_taobao(path)
    assert "on_bad_line=skip" in str(e.value)
    events, rep = read_taobao(path, on_bad_line="skip")
    assert events.rows() == [(1, 10, 100, WS + 1, 1), (1, 11, 100, WS + 2, 4)], (
        "good rows kept in order"
    )
    assert rep.rows == 4 and rep.rows_bad == 2 and rep.bad_lines == {"UserBehavior.csv": 2}
    assert ":2: " in rep.bad_examples[0] and ":4: " in rep.bad_examples[1]
    assert rep.path == "precise"


def test_unsplittable_line_falls_back_to_python(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "UserBehavior.csv", [(1, 10, 100, "pv", WS + 1), "1,1\x1f1,100,pv,1511600000"]
    )
    with pytest.raises(DataError, match=r":2: item_id is not an integer"):
        read_taobao(path)
    events, rep = read_taobao(path, on_bad_line="skip")
    assert events.height == 1 and rep.rows_bad == 1 and rep.path == "python"


def test_missing_and_empty_files(tmp_path: Path) -> None:
    src = TaobaoSource(raw_dir=tmp_path / "raw")
    with pytest.raises(
        MissingDataError,
        match=r"raw/UserBehavior\.csv[\s\S]*python -m seqrank\.data\.download taobao",
    ):
        src.prepare()
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_taobao(tmp_path / "empty.csv")


def test_real_sample(real_csv: Path) -> None:
    events, rep = read_taobao(real_csv, window=None)
    assert (rep.rows, events.height) == (9938, 9938)
    assert (rep.users, rep.items, rep.cates) == (113, 7572, 1095)
    assert rep.behaviors == {"pv": 8988, "cart": 532, "fav": 212, "buy": 206}
    events, rep = read_taobao(real_csv)
    assert (
        rep.rows == 9938
        and rep.rows_out_of_window == 4
        and events.height == 9934
        and rep.bad_lines == {}
    )
    assert rep.behaviors == {"pv": 8988, "cart": 532, "fav": 212, "buy": 206}, (
        "before the window filter"
    )
    assert events.equals(reference_read(real_csv))
    p = preprocess(events, protocol="time", seed=0, split_times=split_times(WINDOW))
    check_no_leak(p, "time")
    assert p.report["users"] + p.report["users_dropped_too_short"] == 113


# -- protocols ----------------------------------------------------------------------------------
def check_no_leak(p, protocol: str) -> None:
    """Every history event is strictly earlier in the user's sequence with ts <= the target's;
    under `time` the splits follow the calendar."""
    ev, off = p.events, p.events.user_offsets
    for split, s in p.splits.items():
        g = gather_numpy(ev, s, np.arange(len(s)), max_len=int(np.diff(off).max()))
        at = off[s.user.astype(np.int64)] + s.pos
        L = g["hist_mask"].shape[1]
        hist_at = at[:, None] - L + np.arange(L)
        m = g["hist_mask"]
        assert (m.sum(1) == s.pos).all(), f"{split}: the history is every earlier event"
        assert (hist_at[m] >= np.repeat(off[s.user.astype(np.int64)], m.sum(1))).all()
        assert (hist_at < at[:, None]).all(), f"{split}: a history event at or after the target"
        assert (
            np.asarray(ev.ts)[np.where(m, hist_at, 0)][m] <= np.repeat(ev.ts[at], m.sum(1))
        ).all()
        if protocol == "time":
            t = ev.ts[at]
            ok = {
                "train": t < VAL_START,
                "val": (t >= VAL_START) & (t < TEST_START),
                "test": t >= TEST_START,
            }[split]
            assert ok.all(), f"time/{split}: a target outside its day"


@pytest.mark.parametrize("targets", [None, ("buy",), ("cart", "buy")])
@pytest.mark.parametrize("protocol", ["loo", "time"])
def test_protocols_follow_their_definition_and_leak_nothing(tiny_events, protocol, targets) -> None:
    ids = target_behavior_ids(targets, BEHAVIORS)
    p = preprocess(
        tiny_events,
        protocol=protocol,
        seed=1,
        target_behaviors=ids,
        split_times=split_times(WINDOW),
    )
    check_no_leak(p, protocol)
    want = reference_positions(p, protocol, ids, split_times(WINDOW))
    ev, off = p.events, p.events.user_offsets
    assert set(p.splits) == {"train", "val", "test"}
    for split, s in p.splits.items():
        got = list(zip(s.user[0::2].tolist(), s.pos[0::2].tolist(), strict=True))
        assert got == want[split], (
            f"{protocol}/{split}: target positions differ from the definition"
        )
        assert (s.label[0::2] == 1).all() and (s.label[1::2] == 0).all()
        beh = ev.behavior[off[s.user.astype(np.int64)] + s.pos]
        if ids is not None:
            assert np.isin(beh, ids).all(), f"{split}: a target outside {targets}"
    # users without enough targets are dropped and counted
    kept = set(p.ids["user"][1:].astype(np.int64).tolist())
    dropped = tiny_events["user_id"].n_unique() - len(kept)
    assert (
        p.report["users_dropped_too_short"] == dropped
        and p.report["min_targets"] == MIN_TARGETS[protocol]
    )
    if protocol == "loo":
        for u in range(1, len(off) - 1):
            b = ev.behavior[off[u] + 1 : off[u + 1]]
            assert (np.isin(b, ids).sum() if ids else len(b)) >= 2, (
                "a kept loo user has val and test targets"
            )


def test_buy_targets_keep_every_behaviour_in_histories(tiny_events) -> None:
    p = preprocess(
        tiny_events, protocol="time", seed=0, target_behaviors=(4,), split_times=split_times(WINDOW)
    )
    s = p.splits["train"]
    g = gather_numpy(p.events, s, np.arange(len(s)), max_len=50)
    assert (g["label"][0::2] == 1).all()
    assert (p.events.behavior[p.events.user_offsets[s.user.astype(np.int64)] + s.pos] == 4).all()
    assert set(np.unique(g["hist_behavior"][g["hist_mask"]]).tolist()) == {1, 2, 3, 4}, (
        "pv/cart/fav/buy in histories"
    )


def test_time_protocol_by_hand() -> None:
    d = lambda day, h=12: WS + day * DAY + h * 3600  # noqa: E731 - day 0 = 2017-11-25 Beijing
    rows = [
        ("a", "i1", "c", d(0), 1),
        ("a", "i2", "c", d(6), 4),
        ("a", "i3", "c", d(7), 4),
        ("a", "i4", "c", d(8), 4),
        ("b", "i1", "c", d(8), 1),  # one event: no target, dropped
        ("c", "i5", "c", d(7, 23), 2),
        ("c", "i2", "c", d(8, 1), 1),
    ]
    rows += [
        ("z", f"j{k}", "c", d(1, k), 1 + 3 * (k == 9)) for k in range(10)
    ]  # items for negatives
    ev = pl.DataFrame(
        rows, schema=["user_id", "item_id", "cate_id", "timestamp", "behavior"], orient="row"
    )
    ev = ev.with_columns(pl.col("behavior").cast(pl.Int8))
    p = preprocess(ev, protocol="time", seed=0, split_times=split_times(WINDOW))
    assert p.report["users_dropped_too_short"] == 1 and p.report["split_times"] == [
        VAL_START,
        TEST_START,
    ]
    pos = {
        k: list(zip(p.ids["user"][v.user[0::2]].tolist(), v.pos[0::2].tolist(), strict=True))
        for k, v in p.splits.items()
    }
    assert pos == {
        "train": [("a", 1)] + [("z", q) for q in range(1, 10)],
        "val": [("a", 2)],
        "test": [("a", 3), ("c", 1)],
    }
    p = preprocess(
        ev, protocol="time", seed=0, target_behaviors=(4,), split_times=split_times(WINDOW)
    )
    assert p.report["users_dropped_too_short"] == 2, "c has no buy, b no event after its first"
    # without split_times: the last two UTC days of the data
    p = preprocess(ev, protocol="time", seed=0)
    last_day = d(8) // DAY * DAY
    assert p.report["split_times"] == [last_day - DAY, last_day]
    with pytest.raises(ValueError, match=r"no samples in split\(s\) \['val'\]"):
        preprocess(ev.filter(pl.col("user_id").is_in(["c", "z"])), protocol="time", seed=0)
    assert "time" in ALL_PROTOCOLS


def test_target_behaviors_none_equals_all(tiny_events) -> None:
    arrays = to_event_arrays(tiny_events)[0]
    for protocol in ("paper", "loo", "time"):
        a = make_splits(arrays, protocol, 3)
        b = make_splits(arrays, protocol, 3, target_behaviors=(1, 2, 3, 4))
        for k in a:
            assert all(
                np.array_equal(getattr(a[k], f), getattr(b[k], f))
                for f in ("user", "pos", "target", "label")
            )


# -- the generator and its oracle ---------------------------------------------------------------
def test_generator_is_deterministic(tmp_path: Path, tiny_csv: Path) -> None:
    again = generate_taobao(tmp_path / "again", TINY)
    assert again.name == "UserBehavior.csv" and again.read_bytes() == tiny_csv.read_bytes()
    other = generate_taobao(tmp_path / "other", dataclasses.replace(TINY, seed=6))
    assert other.read_bytes() != tiny_csv.read_bytes()


def test_planted_signal_cart_fav_predicts_buy(tiny_events) -> None:
    """P(a buy's category was carted/faved by the user in the last 2 days) >> the same for a
    random category drawn by popularity."""
    rng = np.random.default_rng(0)
    arrays = to_event_arrays(tiny_events)[0]
    off, cate, b, ts = (
        arrays.user_offsets,
        arrays.item_cate[arrays.item],
        arrays.behavior,
        arrays.ts,
    )
    hits = base = n = 0
    for u in range(1, len(off) - 1):
        for k in range(off[u], off[u + 1]):
            if b[k] != 4:
                continue
            recent = {
                cate[j] for j in range(off[u], k) if b[j] in (2, 3) and ts[k] - ts[j] <= 2 * DAY
            }
            hits += cate[k] in recent
            base += cate[rng.integers(len(cate))] in recent
            n += 1
    assert n > 100 and hits / n > 0.6 and hits / n > 4 * base / n, (hits, base, n)


def test_oracle_is_a_distribution_over_the_catalogue(tiny_events) -> None:
    oracle = TaobaoOracle.build(TINY)
    p = preprocess(tiny_events, protocol="loo", seed=0)
    seen = set(p.ids["item"][1:].tolist())
    item_raw = np.concatenate(
        [p.ids["item"], [str(i) for i in oracle.item_raw if str(i) not in seen]]
    )
    assert len(item_raw) == TINY.num_items + 1
    cand = np.arange(1, len(item_raw), dtype=np.int32)
    s = p.splits["train"]
    for k in (0, 2 * (len(s) // 4), len(s) - 2):
        ctx = SampleArrays(
            np.full(len(cand), s.user[k]),
            np.full(len(cand), s.pos[k]),
            cand,
            np.zeros(len(cand), np.int8),
        )
        for T in (None, (4,), (1, 2)):
            probs = oracle.score(p.events, item_raw, ctx, target_behaviors=T)
            assert (probs > 0).all() and probs.sum() == pytest.approx(1.0, abs=1e-9), (k, T)
    sc = oracle.score(p.events, p.ids["item"], p.splits["test"])
    assert np.mean(sc[0::2] > sc[1::2]) > 0.7, "positives usually outscore their negatives"
    bad = p.ids["item"].copy()
    bad[1] = "999999999"
    with pytest.raises(ValueError, match="not from this generator"):
        oracle.score(p.events, bad, p.splits["test"])


@pytest.mark.parametrize("targets", [None, (4,)])
def test_oracle_is_calibrated_on_intent_items(tiny_events, targets) -> None:
    """Summed over targets with an active intent (the last cart/fav, within the intent window and
    with no buy since, found here by a plain loop), the oracle's P(target = the intent's item) matches how often it is."""
    oracle = TaobaoOracle.build(TINY)
    p = preprocess(tiny_events, protocol="loo", seed=0, target_behaviors=targets)
    ev, off = p.events, p.events.user_offsets
    users, pos, intent = [], [], []
    for split in p.splits.values():
        for u, q in zip(split.user[0::2].tolist(), split.pos[0::2].tolist(), strict=True):
            at = off[u] + q
            for j in range(at - 1, off[u] - 1, -1):
                if ev.behavior[j] == 4:  # a buy ends the intent
                    break
                if ev.behavior[j] in (2, 3):
                    age = ev.ts[at] - ev.ts[j]
                    if TINY.intent_delay_hours * 3600 <= age <= TINY.intent_hours * 3600:
                        users.append(u), pos.append(q), intent.append(ev.item[j])
                    break
    users, pos, intent = np.array(users), np.array(pos), np.array(intent)
    ctx = SampleArrays(users, pos, intent, np.ones(len(users), np.int8))
    prob = oracle.score(ev, p.ids["item"], ctx, target_behaviors=targets)
    observed = int((ev.item[off[users] + pos] == intent).sum())
    expected, sd = prob.sum(), np.sqrt((prob * (1 - prob)).sum())
    assert len(users) > 50 and abs(observed - expected) < 4 * sd, (observed, expected, sd)


# -- the data module ----------------------------------------------------------------------------
def test_datamodule_end_to_end(tmp_path: Path) -> None:
    spec = dataclasses.asdict(TINY) | {"num_users": 60}
    src = SyntheticTaobaoSource(raw_dir=tmp_path / "raw", spec=spec)
    dm = SeqDataModule(
        src,
        name="tb",
        processed_dir=tmp_path / "proc",
        protocol="time",
        max_len=16,
        target_behaviors=["buy"],
    )
    dm.prepare_data()
    dm.setup()
    sch = dm.schema
    assert sch.num_behaviors == 5 and sch.behavior_names == BEHAVIORS and sch.protocol == "time"
    assert set(dm.store.oracle) == {"train", "val", "test"}
    meta = dm.store.meta
    assert meta["reader"]["rows_out_of_window"] >= 0 and meta["preprocess"]["target_behaviors"] == [
        4
    ]
    batch = next(iter(dm.train_dataloader()))
    assert batch.hist_behavior.max() <= 4 and len(batch) > 0
    assert src.path().name == "UserBehavior.csv"
    every = SeqDataModule(
        src,
        name="tb",
        processed_dir=tmp_path / "proc",
        protocol="time",
        target_behaviors=list(BEHAVIORS),
    )
    assert every.target_behaviors is None and every.fingerprint() != dm.fingerprint()
    with pytest.raises(
        ValueError, match=r"target_behaviors=\['click'\].*'pv', 'cart', 'fav', 'buy'"
    ):
        SeqDataModule(src, name="tb", processed_dir=tmp_path, target_behaviors=["click"])


def test_taobao_source_reads_with_its_window(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "UserBehavior.csv",
        [(7, 1, 1, "pv", WS - 10), (7, 2, 1, "pv", WS + 10), (7, 3, 2, "buy", WS + 20)],
    )
    src = TaobaoSource(raw_dir=tmp_path, window=["2017-11-25T00:00+08:00", WE])
    events, report = src.read()
    assert events.height == 2 and report["rows_out_of_window"] == 1 and src.window == WINDOW
    assert src.split_times() == (WE - 2 * DAY, WE - DAY) and path.name == taobao.FILENAME
    fp = src.fingerprint()
    assert fp["source"] == "taobao" and fp["window"] == WINDOW


# -- out-of-core preprocessing --------------------------------------------------------------------
def store_arrays(path: Path) -> dict[str, np.ndarray]:
    return {f.name: np.load(f) for f in sorted(path.glob("*.npy"))}


def build_stores(src, root: Path, chunk_rows: tuple, **kw) -> dict:
    out = {}
    for rows in chunk_rows:
        dm = SeqDataModule(
            src, name="tb", processed_dir=root / f"rows_{rows}", chunk_rows=rows, **kw
        )
        dm.prepare_data()
        dm.setup()
        out[rows] = dm.store
    return out


@pytest.mark.parametrize(
    ("protocol", "targets"),
    [("time", None), ("time", ["buy"]), ("loo", ["cart", "buy"]), ("paper", None)],
)
def test_chunked_store_equals_the_in_memory_store(
    tmp_path: Path, tiny_csv: Path, protocol, targets
) -> None:
    """Out of core with ranges of 1 or 50 events (users are never split, so most ranges are one
    user) or one range, and in memory (chunk_rows=None): every array and count is identical."""
    src = TaobaoSource(raw_dir=tiny_csv.parent)
    stores = build_stores(
        src, tmp_path, (None, 10**9, 50, 1), protocol=protocol, target_behaviors=targets
    )
    ref = stores[None]
    want = store_arrays(ref.path)
    assert {
        "events.item.npy",
        "user_offsets.npy",
        "item_cate.npy",
        "ids.item.npy",
        "test.target.npy",
    } <= set(want)
    for rows, st in stores.items():
        got = store_arrays(st.path)
        assert list(got) == list(want), rows
        for name, arr in want.items():
            assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), (rows, name)
        assert st.schema == ref.schema, rows
        for key in ("preprocess", "reader", "fingerprint"):
            assert st.meta[key] == ref.meta[key], (rows, key)
        check_no_leak(st, protocol)
    events, rep = read_taobao(tiny_csv)
    assert ref.meta["reader"] == rep.__dict__ | {"window": list(WINDOW)}
    assert len(ref.splits["test"]) > 0 and ref.meta["preprocess"]["events"] <= events.height


def test_chunked_path_keeps_the_bad_line_policy(tmp_path: Path, tiny_csv: Path) -> None:
    """A bad line stops the out-of-core build with file:line (nothing is left behind); under
    `skip` it is counted and the store equals the in-memory one."""
    lines = tiny_csv.read_text().splitlines()
    dirty = tmp_path / "raw" / "UserBehavior.csv"
    dirty.parent.mkdir()
    write_rows(dirty, lines[:2] + ["1,2,3,nope,4"] + lines[2:-1] + ["7,8"] + lines[-1:])
    src = TaobaoSource(raw_dir=dirty.parent)
    dm = SeqDataModule(
        src, name="tb", processed_dir=tmp_path / "proc", protocol="time", chunk_rows=100
    )
    with pytest.raises(DataError, match=r"UserBehavior\.csv:3: unknown behaviour 'nope'"):
        dm.prepare_data()
    assert not any((tmp_path / "proc").glob("tb-*")), "no store, no temp folder left"
    stores = build_stores(src, tmp_path, (None, 100), protocol="time", on_bad_line="skip")
    a, b = (store_arrays(s.path) for s in stores.values())
    assert all(np.array_equal(a[k], b[k]) for k in a) and list(a) == list(b)
    assert stores[100].meta["reader"] == stores[None].meta["reader"]
    assert (
        stores[100].meta["reader"]["rows_bad"] == 2
        and stores[100].meta["reader"]["path"] == "precise"
    )


class _ScannedSynthetic(SyntheticTaobaoSource):
    """The synthetic source with a lazy `scan`: its oracle then runs on the chunked store."""

    def scan(self, on_bad_line: str = "error") -> tuple:
        self.prepare()
        events, report = taobao.scan_taobao(self.path(), on_bad_line=on_bad_line, window=WINDOW)
        return events, report.__dict__


def test_chunked_store_keeps_the_oracle(tmp_path: Path) -> None:
    spec = dataclasses.asdict(TINY) | {"num_users": 40}
    src = _ScannedSynthetic(raw_dir=tmp_path / "raw", spec=spec)
    stores = build_stores(
        src, tmp_path, (None, 30), protocol="time", target_behaviors=["buy", "cart"]
    )
    a, b = (store_arrays(s.path) for s in stores.values())
    assert {"train.oracle.npy", "val.oracle.npy", "test.oracle.npy"} <= set(a) and list(a) == list(
        b
    )
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_chunk_rows_is_validated_and_not_in_the_fingerprint(tmp_path: Path, tiny_csv: Path) -> None:
    src = TaobaoSource(raw_dir=tiny_csv.parent)
    fps = {
        SeqDataModule(src, name="t", processed_dir=tmp_path, chunk_rows=r).fingerprint()
        for r in (None, 1, 10**6)
    }
    assert len(fps) == 1, "the store does not depend on chunk_rows"
    for bad in (0, -5, 2.5, "many"):
        with pytest.raises(ValueError, match=r"data\.chunk_rows"):
            SeqDataModule(src, name="t", processed_dir=tmp_path, chunk_rows=bad)

"""Invariants of `seqrank.data.preprocess` for both protocols (DESIGN.md sections 3 and 5)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from seqrank.data.batching import EventArrays
from seqrank.data.preprocess import (
    MIN_EVENTS,
    PROTOCOLS,
    drop_short_users,
    make_splits,
    negative_draws,
    preprocess,
    sample_negatives,
    to_event_arrays,
)

SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "cate_id": pl.String,
    "timestamp": pl.Int64,
    "behavior": pl.Int8,
}


def events_table(rows: list[tuple[str, str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame([(u, i, c, t, 1) for u, i, c, t in rows], schema=SCHEMA, orient="row")


@pytest.fixture(scope="module", params=PROTOCOLS)
def processed(request: pytest.FixtureRequest, sim_events: pl.DataFrame):
    return request.param, preprocess(sim_events, protocol=request.param, seed=7)


def test_protocols_are_paper_and_loo() -> None:
    assert set(PROTOCOLS) == {"paper", "loo"} and MIN_EVENTS == {"paper": 2, "loo": 3}


def test_split_invariants_on_simulated_events(processed, sim_events, split_invariants) -> None:
    protocol, p = processed
    split_invariants(p, sim_events, protocol)


def test_loo_has_one_val_and_one_test_pair_per_user(processed) -> None:
    protocol, p = processed
    n = np.diff(p.events.user_offsets)
    users = np.arange(1, len(n))
    for split, offset in (("val", 2), ("test", 1)):
        if split not in p.splits:
            assert protocol == "paper" and split == "val", "paper has no validation split"
            continue
        s = p.splits[split]
        assert len(s) == 2 * len(users), f"{protocol}/{split}: one (pos, neg) pair per user"
        assert np.array_equal(np.sort(s.user[0::2]), users), f"{protocol}/{split}: each user once"
        assert (s.pos == n[s.user] - offset).all(), f"{protocol}/{split}: pos must be n-{offset}"
    train = p.splits["train"]
    hi = n[train.user] - (3 if protocol == "loo" else 2)
    assert (train.pos >= 1).all() and (train.pos <= hi).all(), (
        f"{protocol}: train pos outside 1..n-{3 if protocol == 'loo' else 2}"
    )
    expected = int(np.maximum(n[1:] - (3 if protocol == "loo" else 2), 0).sum())
    assert len(train) == 2 * expected, f"{protocol}: every train position exactly once"


def test_short_users_are_dropped_and_counted(processed, sim_events) -> None:
    protocol, p = processed
    dropped = {"loo": 2, "paper": 1}[protocol]  # zz_one (1 event) always, zz_two (2) under loo
    assert p.report["users_dropped_too_short"] == dropped, p.report
    assert p.report["min_events"] == MIN_EVENTS[protocol]
    assert ("zz_two" in p.ids["user"]) == (protocol == "paper")
    assert "zz_one" not in p.ids["user"]
    assert p.report["users"] == sim_events["user_id"].n_unique() - dropped


def test_negatives_reproducible_by_seed_and_differ_across_seeds(sim_events) -> None:
    a = preprocess(sim_events, protocol="loo", seed=11)
    b = preprocess(sim_events, protocol="loo", seed=11)
    c = preprocess(sim_events, protocol="loo", seed=12)
    for split in a.splits:
        assert np.array_equal(a.splits[split].target, b.splits[split].target), f"{split}: same seed"
    neg_a = np.concatenate([s.target[1::2] for s in a.splits.values()])
    neg_c = np.concatenate([s.target[1::2] for s in c.splits.values()])
    assert (neg_a != neg_c).mean() > 0.5, "another seed must give (mostly) other negatives"
    pos_a = np.concatenate([s.target[0::2] for s in a.splits.values()])
    pos_c = np.concatenate([s.target[0::2] for s in c.splits.values()])
    assert np.array_equal(pos_a, pos_c), "positives do not depend on the seed"


def test_ties_keep_file_order_and_sort_by_time() -> None:
    rows = [
        ("b", "i3", "c1", 30),
        ("a", "i1", "c1", 20),
        ("b", "i1", "c1", 10),
        ("a", "i5", "c2", 20),
        ("b", "i9", "c2", 30),
        ("a", "i2", "c2", 5),
        ("a", "i4", "c1", 20),
        ("b", "i7", "c1", 30),
    ]
    ev, ids, _ = to_event_arrays(events_table(rows))
    off = ev.user_offsets
    assert list(ids["user"]) == ["", "a", "b"]
    seq = {
        u: (ids["item"][ev.item[off[k] : off[k + 1]]].tolist(), ev.ts[off[k] : off[k + 1]].tolist())
        for k, u in enumerate(ids["user"])
        if k
    }
    assert seq["a"] == (["i2", "i1", "i5", "i4"], [5, 20, 20, 20]), (
        "ties at t=20 must keep file order"
    )
    assert seq["b"] == (["i1", "i3", "i9", "i7"], [10, 30, 30, 30]), (
        "ties at t=30 must keep file order"
    )


def test_padding_is_id_zero_everywhere(processed) -> None:
    _, p = processed
    for kind in ("user", "item", "cate"):
        assert p.ids[kind][0] == "" and "" not in p.ids[kind][1:].tolist(), kind
    ev = p.events
    assert ev.user_offsets[0] == 0 and ev.user_offsets[1] == 0, "user 0 has no events"
    assert ev.item.min() >= 1 and ev.item_cate[0] == 0 and ev.item_cate[1:].min() >= 1
    for s in p.splits.values():
        assert s.user.min() >= 1 and s.target.min() >= 1 and s.pos.min() >= 1


@pytest.mark.parametrize("bad", ["timed", "", "LOO", None])
def test_unknown_protocol_is_refused(sim_events, bad) -> None:
    for call in (
        lambda: preprocess(sim_events, protocol=bad, seed=0),
        lambda: make_splits(to_event_arrays(sim_events)[0], bad, 0),
    ):
        with pytest.raises(ValueError, match=r"data\.protocol") as e:
            call()
        assert "'paper'" in str(e.value) and "'loo'" in str(e.value), str(e.value)


def test_nobody_long_enough_is_a_clear_error() -> None:
    ev = events_table(
        [
            ("a", "i1", "c", 1),
            ("a", "i2", "c", 2),
            ("b", "i3", "c", 3),
            ("c", "i3", "c", 1),
            ("c", "i4", "c", 2),
        ]
    )
    with pytest.raises(ValueError, match=r"no user has the 3 events .*'loo'.*3 users dropped"):
        preprocess(ev, protocol="loo", seed=0)
    p = preprocess(ev, protocol="paper", seed=0)  # "a" and "c" have the 2 events paper needs
    assert p.report["users_dropped_too_short"] == 1 and len(p.splits["test"]) == 4
    assert len(p.splits["train"]) == 0, "paper trains on positions 1..n-2: none for n = 2"


def test_drop_short_users_keeps_order() -> None:
    rows = [
        ("a", "i1", "c", 3),
        ("b", "i1", "c", 1),
        ("a", "i2", "c", 1),
        ("c", "i3", "c", 1),
        ("a", "i3", "c", 2),
        ("b", "i2", "c", 0),
    ]
    kept, n = drop_short_users(events_table(rows), 3)
    assert n == 2 and kept.rows() == [r + (1,) for r in rows if r[0] == "a"]
    kept, n = drop_short_users(events_table(rows), 1)
    assert n == 0 and kept.height == len(rows)


def test_to_event_arrays_requires_the_canonical_columns() -> None:
    ev = events_table([("a", "i1", "c", 1)]).drop("behavior")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['behavior'\]"):
        to_event_arrays(ev)


def test_unknown_category_id_and_count() -> None:
    ev = events_table(
        [
            ("a", "i1", "<unknown>", 1),
            ("a", "i2", "cam", 2),
            ("a", "i3", "<unknown>", 3),
            ("b", "i4", "cam", 1),
            ("b", "i5", "tv", 2),
            ("b", "i6", "tv", 3),
        ]
    )
    p = preprocess(ev, protocol="loo", seed=0, unknown_cate_name="<unknown>")
    assert p.ids["cate"][p.unknown_cate] == "<unknown>" and p.unknown_cate >= 1
    assert p.report["items_unknown_cate"] == 2
    assert preprocess(ev, protocol="loo", seed=0).unknown_cate == 0, "no name: no unknown id"


def _arrays(histories: list[list[int]], num_items: int) -> EventArrays:
    """Events of users 1.. with the given item histories (user 0 is padding)."""
    item = np.array([i for h in histories for i in h], dtype=np.int32)
    off = np.concatenate([[0, 0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    return EventArrays(
        item=item,
        ts=np.arange(len(item), dtype=np.int64),
        behavior=np.ones(len(item), np.int8),
        user_offsets=off,
        item_cate=np.r_[0, np.ones(num_items, np.int32)],
    )


def test_sample_negatives_excludes_the_whole_history() -> None:
    num_items = 12  # ids 1..12
    hist = [list(range(1, 12)), [3, 5], [12]]  # user 1 lacks only item 12
    ev = _arrays(hist, num_items)
    user = np.repeat(np.array([1, 2, 3]), 200)
    pos = np.tile(np.arange(200), 3)
    neg = sample_negatives(ev, user, pos, num_items + 1, seed=0, split="train")
    assert neg.dtype == np.int32 and neg.min() >= 1 and neg.max() <= num_items
    assert (neg[user == 1] == 12).all(), "the only item user 1 has not seen"
    assert not np.isin(neg[user == 2], [3, 5]).any() and not (neg[user == 3] == 12).any()
    assert set(neg[user == 3].tolist()) == set(range(1, 12)), "uniform over the unseen items"


def test_sample_negatives_gives_up_when_a_user_saw_everything() -> None:
    ev = _arrays([[1, 2, 3]], 3)
    with pytest.raises(RuntimeError, match="every item"):
        sample_negatives(ev, np.array([1]), np.array([1]), 4, seed=0, split="test", max_rounds=20)


def test_negative_draws_are_counter_based_and_uniform() -> None:
    """A draw is a function of (seed, split, user, pos, round) alone: the same key gives the same
    item in any batch or order, another seed/split/round another one; items are uniform."""
    rng = np.random.default_rng(0)
    user = rng.integers(1, 1000, 20_000)
    pos = rng.integers(1, 500, 20_000)
    a = negative_draws(user, pos, 51, seed=3, split=1)
    assert a.min() >= 1 and a.max() <= 50
    perm = rng.permutation(len(user))
    assert np.array_equal(negative_draws(user[perm], pos[perm], 51, seed=3, split=1), a[perm])
    assert np.array_equal(negative_draws(user[:7], pos[:7], 51, seed=3, split=1), a[:7])
    for kw in (
        {"seed": 4, "split": 1},
        {"seed": 3, "split": 2},
        {"seed": 3, "split": 1, "round": 1},
    ):
        assert (negative_draws(user, pos, 51, **kw) != a).mean() > 0.9, kw
    counts = np.bincount(
        negative_draws(np.arange(50_000), np.ones(50_000, int), 51, seed=0, split=1), minlength=51
    )[1:]
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000, "about uniform over 1..50"


def test_negatives_do_not_depend_on_the_other_samples(sim_events) -> None:
    """Each sample's negative is the same when its user is sampled alone (what makes chunked
    preprocessing equal the in-memory one)."""
    p = preprocess(sim_events, protocol="loo", seed=5)
    s = p.splits["train"]
    num_items = len(p.events.item_cate)
    for u in (1, 7, int(s.user[-1])):
        m = s.user[1::2] == u
        neg = sample_negatives(
            p.events, s.user[1::2][m], s.pos[1::2][m], num_items, seed=5, split="train"
        )
        assert np.array_equal(neg, s.target[1::2][m]), u


@pytest.mark.parametrize("corruption", ["neg_in_history", "swapped_events", "val_pos", "unpaired"])
def test_the_invariant_checker_catches_corruptions(
    sim_events, split_invariants, corruption
) -> None:
    """Guards the guard: each corruption of a correct result must fail the shared checker."""
    p = preprocess(sim_events, protocol="loo", seed=7)
    p.events.item = p.events.item.copy()
    s = p.splits["val"]
    if corruption == "neg_in_history":
        u = int(s.user[1])
        s.target[1] = p.events.item[p.events.user_offsets[u]]
    elif corruption == "swapped_events":
        a = int(p.events.user_offsets[1])
        p.events.item[[a, a + 1]] = p.events.item[[a + 1, a]]
    elif corruption == "val_pos":
        s.pos[0:2] -= 1
    else:
        s.label[0:2] = [0, 1]
    with pytest.raises(AssertionError):
        split_invariants(p, sim_events, "loo")

"""Canonical events -> ragged store arrays and per-split samples (DESIGN.md sections 3 and 5).

Protocols:
    paper  DIN/ATRank recipe: train targets at positions 1..n-2, test = last position; no
           validation split (the papers select on test; we reproduce that only under this name).
    loo    like paper, but position n-2 is validation (the default, honest protocol).
Every target position yields its observed item (label 1) and one random negative (label 0),
drawn from a seeded numpy Generator, vectorised, never from the user's whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from seqrank.data.batching import EventArrays, SampleArrays

PROTOCOLS = ("paper", "loo")
MIN_EVENTS = {"paper": 2, "loo": 3}
EVENT_COLUMNS = ("user_id", "item_id", "cate_id", "timestamp", "behavior")


@dataclass
class Processed:
    """Everything `write_store` needs."""

    events: EventArrays
    splits: dict[str, SampleArrays]
    ids: dict[str, np.ndarray]
    unknown_cate: int
    report: dict[str, Any] = field(default_factory=dict)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.protocol={protocol!r}; expected one of {list(PROTOCOLS)}")


def _dense_ids(col: pl.Series) -> tuple[np.ndarray, pl.DataFrame]:
    """Sorted unique raw ids -> 1..n (0 stays padding); returns ids-by-index and a join table."""
    uniq = col.unique().sort()
    table = pl.DataFrame({col.name: uniq, "idx": np.arange(1, len(uniq) + 1, dtype=np.int32)})
    by_index = np.concatenate([[""], uniq.cast(pl.String).to_numpy().astype(str)])
    return by_index, table


def to_event_arrays(events: pl.DataFrame, *, unknown_cate_name: str | None = None) -> tuple[EventArrays, dict[str, np.ndarray], int]:
    """Remaps raw ids to dense ints and sorts by (user, time), keeping file order on ties."""
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events table lacks column(s) {missing}; readers must return {list(EVENT_COLUMNS)}")
    user_ids, users = _dense_ids(events["user_id"])
    item_ids, items = _dense_ids(events["item_id"])
    cate_ids, cates = _dense_ids(events["cate_id"])
    df = (
        events.with_row_index("_row")
        .join(users.rename({"idx": "u"}), on="user_id")
        .join(items.rename({"idx": "i"}), on="item_id")
        .join(cates.rename({"idx": "c"}), on="cate_id")
        .sort(["u", "timestamp", "_row"])
    )
    u = df["u"].to_numpy()
    counts = np.bincount(u, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # An item keeps the category of its first event (raw sources give one category per item).
    first = df.group_by("i").agg(pl.col("c").first())
    item_cate = np.zeros(len(item_ids), dtype=np.int32)
    item_cate[first["i"].to_numpy()] = first["c"].to_numpy()
    arrays = EventArrays(
        item=df["i"].to_numpy().astype(np.int32),
        ts=df["timestamp"].to_numpy().astype(np.int64),
        behavior=df["behavior"].to_numpy().astype(np.int8),
        user_offsets=offsets,
        item_cate=item_cate,
    )
    unknown = 0
    if unknown_cate_name is not None:
        hit = np.flatnonzero(cate_ids == unknown_cate_name)
        unknown = int(hit[0]) if len(hit) else 0
    return arrays, {"user": user_ids, "item": item_ids, "cate": cate_ids}, unknown


def target_positions(lengths: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (user, pos) with lo[u] <= pos <= hi[u], vectorised; users with hi < lo give none."""
    n = np.maximum(hi - lo + 1, 0)
    user = np.repeat(np.arange(len(lengths)), n)
    first = np.repeat(lo, n)
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    return user.astype(np.int32), (first + within).astype(np.int32)


def sample_negatives(
    events: EventArrays, user: np.ndarray, num_items: int, rng: np.random.Generator, max_rounds: int = 1000
) -> np.ndarray:
    """One uniform negative item per entry of `user`, never an item of that user's history.

    Rejection sampling, vectorised: draw for all, redraw only the collisions.
    """
    lengths = np.diff(events.user_offsets)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    seen = np.unique(owner * num_items + events.item)  # sorted (user, item) keys
    neg = rng.integers(1, num_items, size=len(user), dtype=np.int64)
    todo = np.arange(len(user))
    for _ in range(max_rounds):
        keys = user[todo].astype(np.int64) * num_items + neg[todo]
        at = np.searchsorted(seen, keys)
        hit = (at < len(seen)) & (seen[np.minimum(at, len(seen) - 1)] == keys)
        todo = todo[hit]
        if len(todo) == 0:
            return neg.astype(np.int32)
        neg[todo] = rng.integers(1, num_items, size=len(todo), dtype=np.int64)
    raise RuntimeError(
        f"could not draw negatives for {len(todo)} samples in {max_rounds} rounds: "
        "some users have interacted with (almost) every item"
    )


def pair_samples(user: np.ndarray, pos: np.ndarray, events: EventArrays, negatives: np.ndarray) -> SampleArrays:
    """Interleaves each positive with its negative: rows 2k (label 1) and 2k+1 (label 0)."""
    target = events.item[events.user_offsets[user] + pos]
    return SampleArrays(
        user=np.repeat(user, 2).astype(np.int32),
        pos=np.repeat(pos, 2).astype(np.int32),
        target=np.stack([target, negatives], axis=1).reshape(-1).astype(np.int32),
        label=np.tile(np.array([1, 0], dtype=np.int8), len(user)),
    )


def make_splits(events: EventArrays, protocol: str, seed: int) -> dict[str, SampleArrays]:
    """Samples per split for `protocol` (users are assumed long enough, see `drop_short_users`)."""
    check_protocol(protocol)
    n = np.diff(events.user_offsets)
    n[0] = 0  # user 0 is padding
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {"test": (n - 1, n - 1)}
    if protocol == "paper":
        ranges["train"] = (np.ones_like(n), n - 2)
    else:
        ranges["train"] = (np.ones_like(n), n - 3)
        ranges["val"] = (n - 2, n - 2)
    num_items = int(len(events.item_cate))
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val", "test"):
        if split not in ranges:
            continue
        lo, hi = ranges[split]
        lo = np.where(n > 0, np.maximum(lo, 1), 1)
        hi = np.where(n > 0, hi, 0)
        user, pos = target_positions(n, lo, hi)
        out[split] = pair_samples(user, pos, events, sample_negatives(events, user, num_items, rng))
    return out


def drop_short_users(events: pl.DataFrame, min_events: int) -> tuple[pl.DataFrame, int]:
    """Removes users with fewer than `min_events` events; returns the kept events and the count."""
    counts = events.group_by("user_id").len()
    short = counts.filter(pl.col("len") < min_events)
    if short.height == 0:
        return events, 0
    kept = events.join(short.select("user_id"), on="user_id", how="anti", maintain_order="left")
    return kept, short.height


def preprocess(events: pl.DataFrame, *, protocol: str, seed: int, unknown_cate_name: str | None = None) -> Processed:
    """Canonical events -> store arrays for `protocol`, with counts of what was dropped."""
    check_protocol(protocol)
    events, dropped = drop_short_users(events, MIN_EVENTS[protocol])
    if events.height == 0:
        raise ValueError(
            f"no user has the {MIN_EVENTS[protocol]} events that protocol {protocol!r} needs "
            f"({dropped} users dropped)"
        )
    arrays, ids, unknown = to_event_arrays(events, unknown_cate_name=unknown_cate_name)
    splits = make_splits(arrays, protocol, seed)
    report = {
        "users_dropped_too_short": dropped,
        "min_events": MIN_EVENTS[protocol],
        "events": int(len(arrays.item)),
        "users": int(len(ids["user"]) - 1),
        "items": int(len(ids["item"]) - 1),
        "cates": int(len(ids["cate"]) - 1),
        "items_unknown_cate": int((arrays.item_cate[1:] == unknown).sum()) if unknown else 0,
    }
    return Processed(events=arrays, splits=splits, ids=ids, unknown_cate=unknown, report=report)

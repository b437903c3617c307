"""Canonical events -> ragged store arrays and per-split samples (DESIGN.md sections 3 and 5).

Protocols:
    paper  DIN/ATRank recipe: train targets at positions 1..n-2, test = last position; no
           validation split (the papers select on test; we reproduce that only under this name).
    loo    like paper, but position n-2 is validation (the default, honest protocol).
    time   split by time (Taobao): targets at or after `test_start` (the window's last day) are
           test, those in [val_start, test_start) validation, earlier ones train.
A target is an event at position >= 1 whose behaviour is in `target_behaviors` (default: every
behaviour); under paper/loo "position n-1, n-2" read "the last, second-last target". The
history of a target is always every earlier event of the user, of any behaviour. Users with too
few targets for the protocol are dropped and counted.
Every target position yields its observed item (label 1) and one random negative (label 0),
drawn from a seeded numpy Generator, vectorised, never from the user's whole history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from seqrank.data.batching import EventArrays, SampleArrays

PROTOCOLS = ("paper", "loo")  # the per-position protocols
TIME_PROTOCOLS = ("time",)
ALL_PROTOCOLS = PROTOCOLS + TIME_PROTOCOLS
MIN_EVENTS = {"paper": 2, "loo": 3}
MIN_TARGETS = {"paper": 1, "loo": 2, "time": 1}  # targets (positions >= 1) a kept user needs
DAY = 86400
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
    if protocol not in ALL_PROTOCOLS:
        raise ValueError(f"data.protocol={protocol!r}; expected one of {list(ALL_PROTOCOLS)}")


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


def seen_keys(events: EventArrays, num_items: int) -> np.ndarray:
    """Sorted (user * num_items + item) keys of every event (duplicates kept: a lookup table;
    a plain sort is several times faster than np.unique on 100M events)."""
    lengths = np.diff(events.user_offsets)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return np.sort(owner * num_items + events.item)


def sample_negatives(
    events: EventArrays, user: np.ndarray, num_items: int, rng: np.random.Generator, max_rounds: int = 1000,
    *, seen: np.ndarray | None = None,
) -> np.ndarray:
    """One uniform negative item per entry of `user`, never an item of that user's history.

    Rejection sampling, vectorised: draw for all, redraw only the collisions. `seen` is
    `seen_keys(events, num_items)` when the caller already has it.
    """
    if seen is None:
        seen = seen_keys(events, num_items)
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


def default_split_times(ts: np.ndarray) -> tuple[int, int]:
    """(val_start, test_start) when the source names none: the last two UTC days of the data."""
    test_start = int(ts.max()) // DAY * DAY
    return test_start - DAY, test_start


def split_masks(
    events: EventArrays,
    protocol: str,
    *,
    target_behaviors: Sequence[int] | None = None,
    split_times: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per event: its user, its position, and one boolean target mask per split."""
    n = np.diff(events.user_offsets)
    n[0] = 0  # user 0 is padding
    owner = np.repeat(np.arange(len(n), dtype=np.int32), n)
    pos = (np.arange(len(owner), dtype=np.int64) - events.user_offsets[owner]).astype(np.int32)
    target = pos >= 1
    if target_behaviors is not None:
        target &= np.isin(events.behavior, np.asarray(target_behaviors, dtype=events.behavior.dtype))
    if protocol == "time":
        val_start, test_start = split_times if split_times is not None else default_split_times(events.ts)
        ts = np.asarray(events.ts)
        masks = {"train": target & (ts < val_start), "val": target & (ts >= val_start) & (ts < test_start),
                 "test": target & (ts >= test_start)}
        return owner, pos, masks
    # rank of each target from the user's end: 1 = last target, 2 = second-last, ...
    before = np.concatenate([[0], np.cumsum(target)])  # targets before each event index
    rank = before[events.user_offsets[1:]][owner] - before[:-1]
    masks = {"test": target & (rank == 1)}
    if protocol == "paper":
        masks["train"] = target & (rank >= 2)
    else:
        masks["val"] = target & (rank == 2)
        masks["train"] = target & (rank >= 3)
    return owner, pos, masks


def make_splits(
    events: EventArrays,
    protocol: str,
    seed: int,
    *,
    target_behaviors: Sequence[int] | None = None,
    split_times: tuple[int, int] | None = None,
) -> dict[str, SampleArrays]:
    """Samples per split for `protocol` (users are assumed long enough, see `drop_short_users`).

    Args:
        events: the store's events.
        protocol: `paper`, `loo` or `time`.
        seed: seed of the negatives (one Generator, drawn train, val, test in that order).
        target_behaviors: behaviour ids a target may have; None = every behaviour.
        split_times: (val_start, test_start) in seconds for `time`; None = the data's last
            two UTC days.
    """
    check_protocol(protocol)
    owner, pos, masks = split_masks(events, protocol, target_behaviors=target_behaviors, split_times=split_times)
    num_items = int(len(events.item_cate))
    rng = np.random.default_rng(seed)
    seen = seen_keys(events, num_items)
    out = {}
    for split in ("train", "val", "test"):
        if split not in masks:
            continue
        user, p = owner[masks[split]], pos[masks[split]]  # sorted by (user, pos)
        neg = sample_negatives(events, user, num_items, rng, seen=seen)
        out[split] = pair_samples(user, p, events, neg)
    return out


def drop_short_users(events: pl.DataFrame, min_events: int) -> tuple[pl.DataFrame, int]:
    """Removes users with fewer than `min_events` events; returns the kept events and the count."""
    counts = events.group_by("user_id").len()
    short = counts.filter(pl.col("len") < min_events)
    if short.height == 0:
        return events, 0
    kept = events.join(short.select("user_id"), on="user_id", how="anti", maintain_order="left")
    return kept, short.height


def drop_users_without_targets(
    events: pl.DataFrame, min_targets: int, target_behaviors: Sequence[int] | None
) -> tuple[pl.DataFrame, int]:
    """Removes users with fewer than `min_targets` targets (events at position >= 1 whose
    behaviour is a target behaviour); returns the kept events and the count of users removed."""
    if target_behaviors is None:  # every event but the first is a target
        return drop_short_users(events, min_targets + 1)
    wanted = pl.col("behavior").is_in(list(target_behaviors))
    per_user = (
        events.select("user_id", "timestamp", "behavior")
        .with_row_index("_row")
        .group_by("user_id")
        .agg(wanted.sum().alias("targets"),
             wanted.sort_by(["timestamp", "_row"]).first().cast(pl.UInt32).alias("first_is_target"))
    )
    short = per_user.filter(pl.col("targets") - pl.col("first_is_target") < min_targets)
    if short.height == 0:
        return events, 0
    kept = events.join(short.select("user_id"), on="user_id", how="anti", maintain_order="left")
    return kept, short.height


def preprocess(
    events: pl.DataFrame,
    *,
    protocol: str,
    seed: int,
    unknown_cate_name: str | None = None,
    target_behaviors: Sequence[int] | None = None,
    split_times: tuple[int, int] | None = None,
) -> Processed:
    """Canonical events -> store arrays for `protocol`, with counts of what was dropped.

    Args:
        events: the canonical events table of a reader.
        protocol: `paper`, `loo` or `time` (module docstring).
        seed: seed of the negatives.
        unknown_cate_name: the raw category name of items without a category, if any.
        target_behaviors: behaviour ids a target may have; None = every behaviour. Histories
            always hold every behaviour.
        split_times: (val_start, test_start) in seconds for `time`; None = the data's last two
            UTC days.
    """
    check_protocol(protocol)
    if target_behaviors is not None:
        target_behaviors = tuple(sorted({int(b) for b in target_behaviors}))
        if not target_behaviors or min(target_behaviors) < 1:
            raise ValueError(f"target_behaviors={target_behaviors}; expected behaviour ids >= 1")
    need = MIN_TARGETS[protocol]
    events, dropped = drop_users_without_targets(events, need, target_behaviors)
    if events.height == 0:
        what = (f"{need + 1} events" if target_behaviors is None
                else f"{need} target events (behaviours {list(target_behaviors)}) after the first")
        raise ValueError(f"no user has the {what} that protocol {protocol!r} needs ({dropped} users dropped)")
    arrays, ids, unknown = to_event_arrays(events, unknown_cate_name=unknown_cate_name)
    if protocol == "time" and split_times is None:
        split_times = default_split_times(arrays.ts)
    splits = make_splits(arrays, protocol, seed, target_behaviors=target_behaviors, split_times=split_times)
    empty = [k for k, v in splits.items() if len(v) == 0]
    if protocol == "time" and empty:  # paper/loo may leave train empty for 2- or 3-event users
        raise ValueError(
            f"protocol {protocol!r}: no samples in split(s) {empty} (split_times={split_times}, "
            f"events from {int(arrays.ts.min())} to {int(arrays.ts.max())}, target_behaviors={target_behaviors})"
        )
    report = {
        "users_dropped_too_short": dropped,
        "min_events": need + 1,
        "min_targets": need,
        "target_behaviors": list(target_behaviors) if target_behaviors is not None else None,
        "events": int(len(arrays.item)),
        "users": int(len(ids["user"]) - 1),
        "items": int(len(ids["item"]) - 1),
        "cates": int(len(ids["cate"]) - 1),
        "items_unknown_cate": int((arrays.item_cate[1:] == unknown).sum()) if unknown else 0,
    }
    if protocol == "time":
        report["split_times"] = list(split_times)
    return Processed(events=arrays, splits=splits, ids=ids, unknown_cate=unknown, report=report)

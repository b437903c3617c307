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
never an item of the user's whole history. A negative is a counter-based hash of (seed, split,
user, position, round), rejection-sampled against the history: it depends on nothing else, so
the in-memory path and the out-of-core one (`preprocess_chunked`, for logs larger than RAM,
users whole inside chunks) give identical stores whatever the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


def _ids_by_index(uniq: pl.Series) -> np.ndarray:
    """Raw ids as strings by dense id (index 0 = padding, "") from sorted unique raw ids."""
    return np.concatenate([[""], uniq.cast(pl.String).to_numpy().astype(str)])


def _dense_ids(col: pl.Series) -> tuple[np.ndarray, pl.DataFrame]:
    """Sorted unique raw ids -> 1..n (0 stays padding); returns ids-by-index and a join table."""
    uniq = col.unique().sort()
    table = pl.DataFrame({col.name: uniq, "idx": np.arange(1, len(uniq) + 1, dtype=np.int32)})
    return _ids_by_index(uniq), table


def to_event_arrays(
    events: pl.DataFrame, *, unknown_cate_name: str | None = None
) -> tuple[EventArrays, dict[str, np.ndarray], int]:
    """Remaps raw ids to dense ints and sorts by (user, time), keeping file order on ties."""
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"events table lacks column(s) {missing}; readers must return {list(EVENT_COLUMNS)}"
        )
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


def target_positions(
    lengths: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
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


SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # salts of the negatives per split
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic), in place."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _mix_int(x: int) -> int:
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def negative_draws(
    user: np.ndarray, pos: np.ndarray, num_items: int, *, seed: int, split: int, round: int = 0
) -> np.ndarray:
    """Item ids in [1, num_items), a hash of (seed, split, user, pos, round): counter-based, so a
    draw depends on nothing else (not on which other samples are drawn with it).

    Args:
        user: (S,) store user ids (< 2**32).
        pos: (S,) target positions (< 2**32).
        num_items: item vocabulary size, padding included.
        seed: the data seed.
        split: the split's code (`SPLIT_CODES`).
        round: the rejection round (0 first, then 1, 2, ... for collisions).

    Returns:
        (S,) int64 items.
    """
    salt = _mix_int(_mix_int(_mix_int(seed + _GOLDEN) + split * _GOLDEN) + round * _GOLDEN)
    key = (np.asarray(user).astype(np.uint64) << np.uint64(32)) | np.asarray(pos).astype(np.uint64)
    h = _mix(_mix(key ^ np.uint64(salt)) + np.uint64(_mix_int(salt)))  # (S,)
    # Lemire's multiply-shift: the high 32 bits scaled to [0, num_items - 1)
    return 1 + ((h >> np.uint64(32)) * np.uint64(num_items - 1) >> np.uint64(32)).astype(np.int64)


def sample_negatives(
    events: EventArrays,
    user: np.ndarray,
    pos: np.ndarray,
    num_items: int,
    *,
    seed: int,
    split: str | int,
    user_base: int = 0,
    max_rounds: int = 1000,
    seen: np.ndarray | None = None,
) -> np.ndarray:
    """One uniform negative item per (user, pos), never an item of that user's history.

    Rejection sampling, vectorised: draw for all, redraw only the collisions (next round of the
    same hash). `user` indexes `events`; the hash sees `user + user_base`, the store's user id
    (a chunk of the out-of-core path starts at `user_base`). `seen` is
    `seen_keys(events, num_items)` when the caller already has it.
    """
    if seen is None:
        seen = seen_keys(events, num_items)
    code = SPLIT_CODES[split] if isinstance(split, str) else int(split)
    user = np.asarray(user, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    store_user = user + user_base
    neg = negative_draws(store_user, pos, num_items, seed=seed, split=code)
    todo = np.arange(len(user))
    for r in range(1, max_rounds + 1):
        keys = user[todo] * num_items + neg[todo]
        at = np.searchsorted(seen, keys)
        hit = (at < len(seen)) & (seen[np.minimum(at, len(seen) - 1)] == keys)
        todo = todo[hit]
        if len(todo) == 0:
            return neg.astype(np.int32)
        neg[todo] = negative_draws(
            store_user[todo], pos[todo], num_items, seed=seed, split=code, round=r
        )
    raise RuntimeError(
        f"could not draw negatives for {len(todo)} samples in {max_rounds} rounds: "
        "some users have interacted with (almost) every item"
    )


def pair_samples(
    user: np.ndarray, pos: np.ndarray, events: EventArrays, negatives: np.ndarray
) -> SampleArrays:
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
        target &= np.isin(
            events.behavior, np.asarray(target_behaviors, dtype=events.behavior.dtype)
        )
    if protocol == "time":
        val_start, test_start = (
            split_times if split_times is not None else default_split_times(events.ts)
        )
        ts = np.asarray(events.ts)
        masks = {
            "train": target & (ts < val_start),
            "val": target & (ts >= val_start) & (ts < test_start),
            "test": target & (ts >= test_start),
        }
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
        seed: seed of the negatives (`negative_draws`).
        target_behaviors: behaviour ids a target may have; None = every behaviour.
        split_times: (val_start, test_start) in seconds for `time`; None = the data's last
            two UTC days.
    """
    check_protocol(protocol)
    return _splits(
        events,
        protocol,
        seed,
        int(len(events.item_cate)),
        target_behaviors=target_behaviors,
        split_times=split_times,
    )


def _splits(
    events: EventArrays,
    protocol: str,
    seed: int,
    num_items: int,
    *,
    target_behaviors: Sequence[int] | None,
    split_times: tuple[int, int] | None,
    user_base: int = 0,
) -> dict[str, SampleArrays]:
    """Samples per split of the users in `events`; their store ids are `user_base` + index."""
    owner, pos, masks = split_masks(
        events, protocol, target_behaviors=target_behaviors, split_times=split_times
    )
    seen = seen_keys(events, num_items)
    out = {}
    for split in ("train", "val", "test"):
        if split not in masks:
            continue
        user, p = owner[masks[split]], pos[masks[split]]  # sorted by (user, pos)
        neg = sample_negatives(
            events, user, p, num_items, seed=seed, split=split, user_base=user_base, seen=seen
        )
        s = pair_samples(user, p, events, neg)
        if user_base:
            s.user += np.int32(user_base)
        out[split] = s
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
        .agg(
            wanted.sum().alias("targets"),
            wanted.sort_by(["timestamp", "_row"]).first().cast(pl.UInt32).alias("first_is_target"),
        )
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
    target_behaviors = _target_ids(target_behaviors)
    need = MIN_TARGETS[protocol]
    events, dropped = drop_users_without_targets(events, need, target_behaviors)
    if events.height == 0:
        _nobody(protocol, need, target_behaviors, dropped)
    arrays, ids, unknown = to_event_arrays(events, unknown_cate_name=unknown_cate_name)
    if protocol == "time" and split_times is None:
        split_times = default_split_times(arrays.ts)
    splits = make_splits(
        arrays, protocol, seed, target_behaviors=target_behaviors, split_times=split_times
    )
    _check_nonempty(
        protocol,
        {k: len(v) for k, v in splits.items()},
        split_times,
        (int(arrays.ts.min()), int(arrays.ts.max())),
        target_behaviors,
    )
    report = _report(
        protocol,
        need,
        dropped,
        target_behaviors,
        split_times,
        len(arrays.item),
        {k: len(v) for k, v in ids.items()},
        arrays.item_cate,
        unknown,
    )
    return Processed(events=arrays, splits=splits, ids=ids, unknown_cate=unknown, report=report)


def _target_ids(target_behaviors: Sequence[int] | None) -> tuple[int, ...] | None:
    if target_behaviors is None:
        return None
    ids = tuple(sorted({int(b) for b in target_behaviors}))
    if not ids or min(ids) < 1:
        raise ValueError(f"target_behaviors={ids}; expected behaviour ids >= 1")
    return ids


def _nobody(
    protocol: str, need: int, target_behaviors: tuple[int, ...] | None, dropped: int
) -> None:
    what = (
        f"{need + 1} events"
        if target_behaviors is None
        else f"{need} target events (behaviours {list(target_behaviors)}) after the first"
    )
    raise ValueError(
        f"no user has the {what} that protocol {protocol!r} needs ({dropped} users dropped)"
    )


def _check_nonempty(
    protocol: str,
    sizes: dict[str, int],
    split_times: tuple[int, int] | None,
    ts_range: tuple[int, int],
    target_behaviors: tuple[int, ...] | None,
) -> None:
    empty = [k for k, v in sizes.items() if v == 0]
    if protocol == "time" and empty:  # paper/loo may leave train empty for 2- or 3-event users
        raise ValueError(
            f"protocol {protocol!r}: no samples in split(s) {empty} (split_times={split_times}, "
            f"events from {ts_range[0]} to {ts_range[1]}, target_behaviors={target_behaviors})"
        )


def _report(
    protocol: str,
    need: int,
    dropped: int,
    target_behaviors: tuple[int, ...] | None,
    split_times: tuple[int, int] | None,
    events: int,
    vocab_sizes: dict[str, int],
    item_cate: np.ndarray,
    unknown: int,
) -> dict[str, Any]:
    report = {
        "users_dropped_too_short": int(dropped),
        "min_events": need + 1,
        "min_targets": need,
        "target_behaviors": list(target_behaviors) if target_behaviors is not None else None,
        "events": int(events),
        "users": int(vocab_sizes["user"] - 1),
        "items": int(vocab_sizes["item"] - 1),
        "cates": int(vocab_sizes["cate"] - 1),
        "items_unknown_cate": int((item_cate[1:] == unknown).sum()) if unknown else 0,
    }
    if protocol == "time":
        report["split_times"] = [int(t) for t in split_times]
    return report


# -- out of core ----------------------------------------------------------------------------------
class ArraySink(Protocol):
    """Where `preprocess_chunked` writes (a `seqrank.data.store.StoreWriter`)."""

    def append(self, name: str, arr: np.ndarray) -> None: ...

    def save(self, name: str, arr: np.ndarray) -> None: ...


@dataclass
class ChunkedResult:
    """What `preprocess_chunked` learned; the arrays themselves (ids too) went to the sink."""

    vocab_sizes: dict[str, int]  # user, item, cate: vocabulary sizes, padding included
    unknown_cate: int
    split_sizes: dict[str, int]
    max_behavior: int
    chunks: int
    report: dict[str, Any] = field(default_factory=dict)
    input_counts: dict[str, int] = field(default_factory=dict)  # of the events given, before drops


def _user_table(
    lf: pl.LazyFrame, need: int, target_behaviors: tuple[int, ...] | None
) -> pl.DataFrame:
    """One row per user, sorted by raw id: `n` events and `keep` (enough targets), streamed.

    A target is an event at position >= 1: with target behaviours, whether a user's first event
    (smallest (timestamp, row)) is one needs a second, small pass over the users' first instants.
    """
    if target_behaviors is None:
        users = (
            lf.group_by("user_id")
            .agg(pl.len().alias("n"))
            .collect(engine="streaming")
            .sort("user_id")
        )
        return users.with_columns((pl.col("n") - 1 >= need).alias("keep"))
    wanted = pl.col("behavior").is_in(list(target_behaviors))
    users = (
        lf.group_by("user_id")
        .agg(
            pl.len().alias("n"),
            wanted.sum().alias("targets"),
            pl.col("timestamp").min().alias("t0"),
        )
        .collect(engine="streaming")
        .sort("user_id")
    )
    firsts = (
        lf.join(users.lazy().select("user_id", "t0"), on="user_id")
        .filter(pl.col("timestamp") == pl.col("t0"))
        .select("user_id", "_row", "behavior")
        .collect(engine="streaming")  # about one row per user
        .sort("user_id", "_row")
        .group_by("user_id", maintain_order=True)
        .agg(wanted.first().cast(pl.UInt32).alias("first_is_target"))
    )
    users = users.join(firsts, on="user_id", how="left", maintain_order="left")
    return users.select(
        "user_id", "n", (pl.col("targets") - pl.col("first_is_target") >= need).alias("keep")
    )


def _read_range(scratch: Path, chunk: int, columns: list[str] | None = None) -> pl.DataFrame:
    """The events of one user range, as `preprocess_chunked` step 2 wrote them."""
    files = sorted((scratch / f"_chunk={chunk}").glob("*.ipc"))
    if not files:
        raise RuntimeError(
            f"{scratch}: no events for range {chunk} (polars' partition layout changed?)"
        )
    return pl.concat([pl.read_ipc(f, columns=columns) for f in files])


_LUT_MAX = 1 << 26  # integer raw ids below this are mapped by lookup tables (bytes per id: 1 + 4)


class _Vocab:
    """Sorted unique raw ids of one column -> dense ids 1..n; raw integer ids in [0, _LUT_MAX),
    not too sparse, map through a lookup table over the id range (Taobao's ids), others by
    sorted search."""

    def __init__(self, uniq: pl.Series) -> None:
        self.uniq = uniq
        self.lut: np.ndarray | None = None
        small = uniq.dtype.is_integer() and len(uniq) and uniq.min() >= 0
        if small and uniq.max() < min(_LUT_MAX, 8 * len(uniq) + (1 << 20)):
            self.lut = np.zeros(int(uniq.max()) + 1, dtype=np.int32)
            self.lut[uniq.to_numpy()] = np.arange(1, len(uniq) + 1, dtype=np.int32)

    def __call__(self, values: pl.Series) -> np.ndarray:
        if self.lut is not None:
            return self.lut[values.to_numpy()]
        return (self.uniq.search_sorted(values).to_numpy() + 1).astype(np.int32)


def _vocabularies(
    scratch: Path, chunks: np.ndarray
) -> tuple[dict[str, pl.Series], dict[str, int], tuple[int, int]]:
    """Sorted unique raw item and category ids of the kept events, the distinct counts of all
    events, and the kept events' (min, max) timestamp: range by range, presence bitmaps over the
    id range when ids are small non-negative integers, else polars' streaming unique."""
    cols = ("item_id", "cate_id")
    seen = {c: np.zeros(0, dtype=np.uint8) for c in cols}  # bit 1: any event, bit 2: a kept one
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for k in chunks.tolist():
        df = _read_range(scratch, k, [*cols, "timestamp", "_keep"])
        keep = df["_keep"].to_numpy()
        for c in cols:
            s = df[c]
            if not s.dtype.is_integer() or s.min() < 0 or s.max() >= _LUT_MAX:
                return _vocabularies_polars(scratch)
            v = s.to_numpy()
            if v.max() >= len(seen[c]):
                seen[c] = np.concatenate(
                    [seen[c], np.zeros(int(v.max()) + 1 - len(seen[c]), np.uint8)]
                )
            seen[c][v] |= 1
            seen[c][v[keep]] |= 2
        if keep.any():
            ts = df["timestamp"].to_numpy()[keep]
            lo, hi = min(lo, int(ts.min())), max(hi, int(ts.max()))
    vocab = {c: pl.Series(c, np.flatnonzero(seen[c] & 2)) for c in cols}
    return vocab, {c: int(np.count_nonzero(seen[c])) for c in cols}, (lo, hi)


def _vocabularies_polars(
    scratch: Path,
) -> tuple[dict[str, pl.Series], dict[str, int], tuple[int, int]]:
    parts = pl.scan_ipc(str(scratch / "**" / "*.ipc"), hive_partitioning=False)
    kept = parts.filter(pl.col("_keep"))
    item, cate, counts, ts = pl.collect_all(
        [
            kept.select(pl.col("item_id").unique()),
            kept.select(pl.col("cate_id").unique()),
            parts.select(pl.col("item_id").n_unique(), pl.col("cate_id").n_unique()),
            kept.select(
                pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi")
            ),
        ],
        engine="streaming",
    )
    vocab = {"item_id": item.to_series().sort(), "cate_id": cate.to_series().sort()}
    return vocab, counts.row(0, named=True), (int(ts["lo"].item()), int(ts["hi"].item()))


def preprocess_chunked(
    events: pl.LazyFrame,
    sink: ArraySink,
    scratch: Path,
    *,
    protocol: str,
    seed: int,
    chunk_rows: int,
    unknown_cate_name: str | None = None,
    target_behaviors: Sequence[int] | None = None,
    split_times: tuple[int, int] | None = None,
) -> ChunkedResult:
    """`preprocess` for event logs larger than memory: the same store, built chunk by chunk.

    1. A streaming pass counts each user's events (and targets) and decides who is kept.
    2. Users, in raw-id order, are cut into contiguous ranges of about `chunk_rows` events (a user
       is never split), and a streaming pass writes each range's events to `scratch` (IPC).
    3. The id vocabularies (sorted unique raw ids of the kept events) come from those files.
    4. Range by range, in order: sort by (user, time, file row), remap ids, split, negatives
       (chunking-invariant, see `negative_draws`); every array is appended to `sink`.
    Memory is the per-user and per-item tables plus one range; the output equals `preprocess`'s.

    Args:
        events: the canonical events table, lazily (file order).
        sink: receives `events.{item,ts,behavior}`, `user_offsets`, `item_cate`,
            `{split}.{user,pos,target,label}` and `ids.{user,item,cate}`.
        scratch: an empty folder for the ranges' files (the caller removes it).
        chunk_rows: events per range (memory bound; the output does not depend on it).
        protocol, seed, unknown_cate_name, target_behaviors, split_times: as for `preprocess`.
    """
    check_protocol(protocol)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"data.chunk_rows={chunk_rows!r}; expected an integer >= 1")
    target_behaviors = _target_ids(target_behaviors)
    need = MIN_TARGETS[protocol]
    lf = events.select(EVENT_COLUMNS).with_row_index("_row")

    users = _user_table(lf, need, target_behaviors)  # 1.
    keep = users["keep"].to_numpy()
    dropped = int((~keep).sum())
    if not keep.any():
        _nobody(protocol, need, target_behaviors, dropped)
    n = users["n"].to_numpy().astype(np.int64)
    chunk = (np.cumsum(n) - n) // chunk_rows  # 2.
    table = users.select("user_id", pl.Series("_chunk", chunk), pl.Series("_keep", keep))
    # file order kept: a log already grouped by user and time (Taobao's) then sorts in no time
    lf.join(table.lazy(), on="user_id", maintain_order="left").sink_ipc(
        pl.PartitionBy(str(scratch), key="_chunk", include_key=False),
        mkdir=True,
        maintain_order=True,
        engine="streaming",
    )

    chunk_ids = np.unique(chunk)
    vocab, distinct, ts_range = _vocabularies(scratch, chunk_ids)  # 3.
    vocab_user = users.filter(pl.col("keep"))["user_id"]
    vocab_sizes = {
        "user": len(vocab_user) + 1,
        "item": len(vocab["item_id"]) + 1,
        "cate": len(vocab["cate_id"]) + 1,
    }
    unknown = 0
    for kind, raw in (("user", vocab_user), ("item", vocab["item_id"]), ("cate", vocab["cate_id"])):
        by_index = _ids_by_index(raw)  # strings: written now, not held
        sink.save(f"ids.{kind}", by_index)
        if kind == "cate" and unknown_cate_name is not None:
            hit = np.flatnonzero(by_index == unknown_cate_name)
            unknown = int(hit[0]) if len(hit) else 0
        del by_index
    item_of, cate_of = _Vocab(vocab["item_id"]), _Vocab(vocab["cate_id"])
    del vocab, vocab_user
    if protocol == "time" and split_times is None:
        split_times = default_split_times(np.array([ts_range[1]]))
    num_items = vocab_sizes["item"]

    item_cate = np.zeros(num_items, dtype=np.int32)  # 4.
    sink.append("user_offsets", np.zeros(2, dtype=np.int64))  # user 0 (padding) has no events
    sizes: dict[str, int] = {}
    n_users = n_events = max_behavior = 0
    n_ranges = 0
    for k in np.unique(chunk[keep]).tolist():
        df = _read_range(scratch, k).filter(pl.col("_keep")).sort(["user_id", "timestamp", "_row"])
        per_user = df.group_by("user_id", maintain_order=True).len()["len"].to_numpy()
        item, cate = item_of(df["item_id"]), cate_of(df["cate_id"])
        arrays = EventArrays(
            item=item,
            ts=df["timestamp"].to_numpy().astype(np.int64),
            behavior=df["behavior"].to_numpy().astype(np.int8),
            user_offsets=np.concatenate([[0, 0], np.cumsum(per_user)]).astype(np.int64),
            item_cate=item_cate,
        )
        del df
        # an item keeps the category of its first event (in store order), as `to_event_arrays`
        new = np.flatnonzero(item_cate[item] == 0)
        new_items, first = np.unique(item[new], return_index=True)
        item_cate[new_items] = cate[new[first]]
        for f in ("item", "ts", "behavior"):
            sink.append(f"events.{f}", getattr(arrays, f))
        sink.append("user_offsets", arrays.user_offsets[2:] + n_events)
        # local user j (1..) is store user n_users + j: ranges are in raw-id order
        splits = _splits(
            arrays,
            protocol,
            seed,
            num_items,
            target_behaviors=target_behaviors,
            split_times=split_times,
            user_base=n_users,
        )
        for split, s in splits.items():
            for f in ("user", "pos", "target", "label"):
                sink.append(f"{split}.{f}", getattr(s, f))
            sizes[split] = sizes.get(split, 0) + len(s)
        n_users += len(per_user)
        n_events += len(item)
        n_ranges += 1
        max_behavior = max(max_behavior, int(arrays.behavior.max()))
    if n_users != vocab_sizes["user"] - 1 or n_events != int(n[keep].sum()):
        raise RuntimeError(
            f"{scratch}: read {n_users} users / {n_events} events back, expected "
            f"{vocab_sizes['user'] - 1} / {int(n[keep].sum())} (polars' partition layout changed?)"
        )
    sink.save("item_cate", item_cate)
    _check_nonempty(protocol, sizes, split_times, ts_range, target_behaviors)
    report = _report(
        protocol,
        need,
        dropped,
        target_behaviors,
        split_times,
        n_events,
        vocab_sizes,
        item_cate,
        unknown,
    )
    input_counts = {
        "events": int(n.sum()),
        "users": len(users),
        "items": distinct["item_id"],
        "cates": distinct["cate_id"],
    }
    return ChunkedResult(
        vocab_sizes=vocab_sizes,
        unknown_cate=unknown,
        split_sizes=sizes,
        max_behavior=max_behavior,
        chunks=n_ranges,
        report=report,
        input_counts=input_counts,
    )

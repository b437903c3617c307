"""`gather_numpy` against a naive per-sample construction, and `IndexBatchSampler` sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from seqrank.data.batching import (
    BatchGatherDataset,
    DeviceGatherDataset,
    EventArrays,
    IndexBatchSampler,
    SampleArrays,
    gather_numpy,
    to_device,
)
from seqrank.data.types import Batch

FIELDS = (
    "user",
    "hist_item",
    "hist_cate",
    "hist_behavior",
    "hist_gap",
    "hist_mask",
    "target_item",
    "target_cate",
    "label",
    "index",
    "pos",
)


def random_data(
    seed: int, num_users: int = 40, num_items: int = 50, num_cates: int = 7, max_events: int = 30
) -> tuple[EventArrays, SampleArrays]:
    """Ragged events (lengths 1..max_events, sorted times with ties) and random samples."""
    rng = np.random.default_rng(seed)
    lengths = np.r_[0, rng.integers(1, max_events + 1, num_users)]  # user 0 is padding
    off = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(off[-1])
    ts = np.concatenate(
        [np.sort(rng.integers(0, 10**6, k // 2 + 1))[np.arange(k) // 2] for k in lengths]
    )
    events = EventArrays(
        item=rng.integers(1, num_items + 1, n).astype(np.int32),
        ts=ts.astype(np.int64),
        behavior=rng.integers(1, 5, n).astype(np.int8),
        user_offsets=off,
        item_cate=np.r_[0, rng.integers(1, num_cates + 1, num_items)].astype(np.int32),
    )
    s = 500
    user = rng.integers(1, num_users + 1, s)
    pos = rng.integers(0, lengths[user])  # 0..n-1, pos 0 has an empty history
    samples = SampleArrays(
        user=user.astype(np.int32),
        pos=pos.astype(np.int32),
        target=rng.integers(1, num_items + 1, s).astype(np.int32),
        label=rng.integers(0, 2, s).astype(np.int8),
    )
    return events, samples


def naive_gather(ev: EventArrays, s: SampleArrays, idx: np.ndarray, max_len: int) -> dict:
    """One sample at a time, straight from the definition of `Batch`."""
    out: dict[str, list] = {f: [] for f in FIELDS}
    for i in idx.tolist():
        u, p, t = int(s.user[i]), int(s.pos[i]), int(s.target[i])
        start = int(ev.user_offsets[u])
        target_ts = int(ev.ts[start + p])
        hist = list(range(start, start + p))[-max_len:]  # the past only, most recent last
        pad = max_len - len(hist)
        items = [0] * pad + [int(ev.item[k]) for k in hist]
        out["user"].append(u)
        out["hist_item"].append(items)
        out["hist_cate"].append([0] * pad + [int(ev.item_cate[ev.item[k]]) for k in hist])
        out["hist_behavior"].append([0] * pad + [int(ev.behavior[k]) for k in hist])
        out["hist_gap"].append([0] * pad + [target_ts - int(ev.ts[k]) for k in hist])
        out["hist_mask"].append([False] * pad + [True] * len(hist))
        out["target_item"].append(t)
        out["target_cate"].append(int(ev.item_cate[t]))
        out["label"].append(float(s.label[i]))
        out["index"].append(i)
        out["pos"].append(p)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(4))
def test_gather_matches_naive_construction(seed: int) -> None:
    ev, s = random_data(seed)
    rng = np.random.default_rng(100 + seed)
    for max_len in sorted({1, 2, int(rng.integers(3, 15)), 30, int(rng.integers(31, 60))}):
        idx = rng.choice(len(s), size=int(rng.integers(1, 120)), replace=False)
        got = gather_numpy(ev, s, idx, max_len)
        want = naive_gather(ev, s, idx, max_len)
        assert set(got) == set(FIELDS), sorted(got)
        for f in FIELDS:
            assert got[f].shape == want[f].shape, f"{f} shape, max_len={max_len}"
            assert np.array_equal(got[f], want[f]), f"{f} differs from naive, max_len={max_len}"
        lens = np.minimum(s.pos[idx], max_len)
        assert np.array_equal(got["hist_mask"].sum(1), lens), "histories shorter and longer than L"
    assert (s.pos == 0).any() and (s.pos >= 20).any(), "test data: empty and long histories"


def test_gather_dtypes_and_histories_of_both_lengths() -> None:
    ev, s = random_data(9)
    idx = np.arange(len(s))
    g = gather_numpy(ev, s, idx, 8)
    for f in (
        "user",
        "hist_item",
        "hist_cate",
        "hist_behavior",
        "hist_gap",
        "target_item",
        "target_cate",
        "index",
        "pos",
    ):
        assert g[f].dtype == np.int64, f"{f}: {g[f].dtype}"
    assert g["hist_mask"].dtype == bool and g["label"].dtype == np.float32
    assert (
        (g["hist_mask"].sum(1) < 8).any()
        and (g["hist_mask"].sum(1) == 8).any()
        and (s.pos > 8).any()
    )
    assert (g["hist_mask"][s.pos == 0].sum(1) == 0).all(), "pos 0: empty history"
    assert (g["hist_gap"] >= 0).all()
    # left padding: once real, stays real to the right
    m = g["hist_mask"]
    assert (m[:, 1:] >= m[:, :-1]).all(), "histories must be left-padded"


def test_batch_gather_dataset_returns_torch_batch() -> None:
    ev, s = random_data(3)
    ds = BatchGatherDataset(ev, s, max_len=5)
    assert len(ds) == len(s)
    idx = np.array([4, 0, 17])
    b = ds[idx]
    assert isinstance(b, Batch) and len(b) == 3
    want = gather_numpy(ev, s, idx, 5)
    for f in FIELDS:
        t = getattr(b, f)
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), want[f]), f


@pytest.mark.parametrize("seed", range(3))
def test_device_store_gathers_the_same_batches(seed: int) -> None:
    """The device-resident path (torch ops on the store's tensors) equals the numpy one, field
    for field and dtype for dtype (run on CPU here; on a GPU the same code runs there)."""
    ev, s = random_data(seed)
    ds = DeviceGatherDataset(to_device(ev, torch.device("cpu")), s, 1, torch.device("cpu"))
    rng = np.random.default_rng(seed)
    for max_len in (1, 7, 30, 45):
        ds.max_len = max_len
        idx = rng.choice(len(s), size=97, replace=False)
        got, want = ds[idx], BatchGatherDataset(ev, s, max_len)[idx]
        for f in FIELDS:
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and torch.equal(a, b), (f, max_len)
    assert len(ds) == len(s)


def test_dataloader_with_index_batches_covers_the_split() -> None:
    ev, s = random_data(5)
    sampler = IndexBatchSampler(len(s), 64, shuffle=True, seed=1)
    loader = DataLoader(BatchGatherDataset(ev, s, 6), batch_size=None, sampler=sampler)
    seen = torch.cat([b.index for b in loader]).numpy()
    assert len(loader) == len(sampler) == -(-len(s) // 64)
    assert np.array_equal(np.sort(seen), np.arange(len(s))), "every sample once per epoch"


@pytest.mark.parametrize("max_len", [0, -3])
def test_max_len_below_one_is_refused(max_len: int) -> None:
    ev, s = random_data(0)
    with pytest.raises(ValueError, match=r"data\.max_len"):
        BatchGatherDataset(ev, s, max_len)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_refused(batch_size: int) -> None:
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        IndexBatchSampler(10, batch_size, shuffle=True)


# -- samplers ---------------------------------------------------------------------------------
def batches(sampler: IndexBatchSampler) -> list[np.ndarray]:
    out = list(sampler)
    assert len(sampler) == len(out), f"len() {len(sampler)} != {len(out)} yielded batches"
    return out


@pytest.mark.parametrize("n,bs", [(103, 10), (100, 10), (7, 50), (1, 1), (0, 4)])
def test_shuffle_covers_every_index_once_and_differs_per_epoch(n: int, bs: int) -> None:
    sampler = IndexBatchSampler(n, bs, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        out = batches(sampler)
        flat = np.concatenate(out) if out else np.array([], dtype=np.int64)
        assert np.array_equal(np.sort(flat), np.arange(n)), f"epoch {epoch}: not a permutation"
        assert all(len(b) == bs for b in out[:-1]), "only the last batch may be short"
        orders.append(flat)
    if n > 10:
        assert not np.array_equal(orders[0], orders[1]), "the order must change per epoch"
        sampler.set_epoch(0)
        assert np.array_equal(np.concatenate(batches(sampler)), orders[0]), (
            "epoch order reproducible"
        )
        other = IndexBatchSampler(n, bs, shuffle=True, seed=4)
        assert not np.array_equal(np.concatenate(batches(other)), orders[0]), (
            "seed changes the order"
        )


def test_drop_last_drops_only_the_short_batch() -> None:
    sampler = IndexBatchSampler(103, 10, shuffle=True, seed=0, drop_last=True)
    out = batches(sampler)
    assert len(out) == 10 and all(len(b) == 10 for b in out)
    sampler = IndexBatchSampler(103, 10, shuffle=False, drop_last=True)
    assert len(batches(sampler)) == 10


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n,bs", [(100, 7), (101, 10), (2, 4), (5, 1)])
def test_eval_shards_cover_each_index_exactly_once(n: int, bs: int, world_size: int) -> None:
    seen = []
    for rank in range(world_size):
        s = IndexBatchSampler(n, bs, shuffle=False, rank=rank, world_size=world_size)
        out = batches(s)
        seen += [i for b in out for i in b.tolist()]
        if out:
            got = np.concatenate(out)
            assert np.array_equal(got, np.arange(got[0], got[0] + len(got))), "eval keeps order"
    assert sorted(seen) == list(range(n)), (
        f"world {world_size}: each sample exactly once, no padding"
    )


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n,bs", [(100, 7), (101, 10), (2, 4), (10, 3)])
def test_train_shards_have_equal_batch_counts(n: int, bs: int, world_size: int) -> None:
    counts, sizes, seen = [], [], []
    for rank in range(world_size):
        s = IndexBatchSampler(n, bs, shuffle=True, seed=5, rank=rank, world_size=world_size)
        s.set_epoch(2)
        out = batches(s)
        counts.append(len(out))
        sizes.append(sum(len(b) for b in out))
        seen += [i for b in out for i in b.tolist()]
    assert len(set(counts)) == 1, f"batch counts per rank differ: {counts}"
    assert len(set(sizes)) == 1, f"samples per rank differ: {sizes}"
    assert set(seen) == set(range(n)), "every sample is trained on in an epoch"
    assert len(seen) - n < world_size, "at most world_size-1 wrapped repeats"


@pytest.mark.parametrize("consumed", [0, 1, 5, 10])
@pytest.mark.parametrize("world_size", [1, 2])
def test_restored_position_yields_the_rest_of_the_epoch(consumed: int, world_size: int) -> None:
    """A sampler restored from `state_dict()` (as Lightning does on resume) yields exactly the
    batches the uninterrupted epoch had left; a finished epoch resumes at the next one."""
    ref = IndexBatchSampler(
        103, 10, shuffle=True, seed=1, rank=world_size - 1, world_size=world_size
    )
    ref.set_epoch(3)
    full = batches(ref)
    ref.consumed = consumed  # counted by the DataModule as batches are trained on
    state = ref.state_dict()
    assert state == {"epoch": 3, "consumed": consumed, "num_batches": len(full)}
    new = IndexBatchSampler(
        103, 10, shuffle=True, seed=1, rank=world_size - 1, world_size=world_size
    )
    new.load_state_dict(state)  # sets the epoch too: Lightning iterates before set_epoch on resume
    rest = list(new)
    if consumed >= len(full):
        assert new.epoch == 4 and len(rest) == len(full), "a finished epoch goes on with the next"
    else:
        assert len(rest) == len(full) - consumed
        assert all(np.array_equal(a, b) for a, b in zip(rest, full[consumed:], strict=True))
    new.set_epoch(4)
    assert len(list(new)) == len(full), "the skip applies once"


def test_restoring_a_position_of_another_epoch_length_is_refused() -> None:
    state = IndexBatchSampler(103, 10, shuffle=True).state_dict()
    with pytest.raises(ValueError, match=r"11 training batches, this run has 21.*batch_size"):
        IndexBatchSampler(103, 5, shuffle=True).load_state_dict(state)


def test_device_store_with_workers_is_refused(tmp_path) -> None:  # noqa: ANN001
    from seqrank.data.datamodule import SeqDataModule

    with pytest.raises(
        ValueError, match=r"data\.device_store=true .* data\.num_workers=2 must be 0"
    ):
        SeqDataModule(None, name="x", processed_dir=tmp_path, device_store=True, num_workers=2)

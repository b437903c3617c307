"""Sample indices -> `Batch`, gathered for a whole batch at once with numpy fancy indexing.

Histories are never materialised per sample: for sample s with user u and target position p,
the history is events[offsets[u] + p - L : offsets[u] + p], left-padded, built for the whole
batch by one broadcast `start[:, None] + arange(L)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from seqrank.data.types import Batch


@dataclass
class EventArrays:
    """Ragged per-user events, sorted by (user, time); id 0 is padding.

    Attributes:
        item: (N,) item ids.
        ts: (N,) int64 seconds.
        behavior: (N,) behaviour ids.
        user_offsets: (U+1,) events of user u are item[user_offsets[u]:user_offsets[u+1]].
        item_cate: (I,) category of each item id.
    """

    item: np.ndarray
    ts: np.ndarray
    behavior: np.ndarray
    user_offsets: np.ndarray
    item_cate: np.ndarray


@dataclass
class SampleArrays:
    """One split's samples as columns: `user`, `pos` (target index in the user's events),
    `target` (candidate item) and `label` (1 observed, 0 sampled negative)."""

    user: np.ndarray
    pos: np.ndarray
    target: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])


def gather_numpy(
    events: EventArrays, samples: SampleArrays, idx: np.ndarray, max_len: int
) -> dict[str, np.ndarray]:
    """Gathers the batch `idx` into left-padded numpy arrays (see `Batch` for the fields)."""
    idx = np.asarray(idx, dtype=np.int64)
    user = samples.user[idx].astype(np.int64)
    pos = samples.pos[idx].astype(np.int64)
    target = samples.target[idx].astype(np.int64)
    start = events.user_offsets[user] + pos  # (B,) absolute index of the target event
    rel = pos[:, None] - max_len + np.arange(max_len)  # (B, L) position inside the user's events
    mask = rel >= 0
    absi = np.where(mask, start[:, None] - max_len + np.arange(max_len), 0)  # (B, L)
    hist_item = np.where(mask, events.item[absi], 0).astype(np.int64)
    hist_ts = events.ts[absi]
    target_ts = events.ts[start]
    return {
        "user": user,
        "hist_item": hist_item,
        "hist_cate": np.where(mask, events.item_cate[hist_item], 0).astype(np.int64),
        "hist_behavior": np.where(mask, events.behavior[absi], 0).astype(np.int64),
        "hist_gap": np.where(mask, np.maximum(target_ts[:, None] - hist_ts, 0), 0).astype(np.int64),
        "hist_mask": mask,
        "target_item": target,
        "target_cate": events.item_cate[target].astype(np.int64),
        "label": samples.label[idx].astype(np.float32),
        "index": idx,
        "pos": pos,
    }


def to_batch(arrays: dict[str, np.ndarray]) -> Batch:
    return Batch(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


class BatchGatherDataset(torch.utils.data.Dataset):
    """A map-style dataset whose keys are whole index batches; use with `IndexBatchSampler`
    and `DataLoader(batch_size=None)` so no per-sample Python and no default collate run."""

    def __init__(self, events: EventArrays, samples: SampleArrays, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"data.max_len={max_len}; expected an integer >= 1")
        self.events = events
        self.samples = samples
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: np.ndarray) -> Batch:
        return to_batch(gather_numpy(self.events, self.samples, idx, self.max_len))


def gather_torch(
    events: dict[str, torch.Tensor],
    samples: dict[str, torch.Tensor],
    idx: torch.Tensor,
    max_len: int,
) -> Batch:
    """`gather_numpy` with torch ops on tensors of any device (the device-resident store): the
    same arrays, value for value. `events` and `samples` hold the fields of `EventArrays` and
    `SampleArrays` as tensors; idx is (B,) int64 on their device."""
    user = samples["user"][idx].long()
    pos = samples["pos"][idx].long()
    target = samples["target"][idx].long()
    start = events["user_offsets"][user] + pos  # (B,) absolute index of the target event
    steps = torch.arange(max_len, device=idx.device)  # (L,)
    mask = pos[:, None] - max_len + steps >= 0  # (B, L)
    absi = torch.where(mask, start[:, None] - max_len + steps, 0)  # (B, L)
    hist_item = torch.where(mask, events["item"][absi].long(), 0)
    gap = (events["ts"][start][:, None] - events["ts"][absi]).clamp_min(0)
    return Batch(
        user=user,
        hist_item=hist_item,
        hist_cate=torch.where(mask, events["item_cate"][hist_item].long(), 0),
        hist_behavior=torch.where(mask, events["behavior"][absi].long(), 0),
        hist_gap=torch.where(mask, gap.long(), 0),
        hist_mask=mask,
        target_item=target,
        target_cate=events["item_cate"][target].long(),
        label=samples["label"][idx].float(),
        index=idx,
        pos=pos,
    )


def to_device(arrays: EventArrays | SampleArrays, device: torch.device) -> dict[str, torch.Tensor]:
    """Each field of the (memory-mapped) arrays as a tensor on `device`, read once."""
    with warnings.catch_warnings():  # read-only memory maps: the tensors are only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {
            name: torch.from_numpy(np.ascontiguousarray(value)).to(device)
            for name, value in vars(arrays).items()
        }


class DeviceGatherDataset(torch.utils.data.Dataset):
    """`BatchGatherDataset` with the store on `device` (e.g. the GPU): the batch is gathered
    there (`gather_torch`), so only the (B,) indices cross from the host each step."""

    def __init__(
        self,
        events: dict[str, torch.Tensor],
        samples: SampleArrays,
        max_len: int,
        device: torch.device,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"data.max_len={max_len}; expected an integer >= 1")
        self.events = events
        self.samples = to_device(samples, device)
        self.max_len = max_len
        self.device = device

    def __len__(self) -> int:
        return int(self.samples["user"].shape[0])

    def __getitem__(self, idx: np.ndarray) -> Batch:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device, non_blocking=True)
        return gather_torch(self.events, self.samples, index, self.max_len)


class IndexBatchSampler(torch.utils.data.Sampler):
    """Yields index arrays, one per batch; shards batches across distributed ranks itself.

    Training (`shuffle=True`): a seeded permutation per epoch (call `set_epoch`), cut into
    batches; every rank gets the same number of batches (the last ones wrap around, as
    DistributedSampler does). Evaluation (`shuffle=False`): rank r gets the r-th contiguous
    shard with no padding, so every sample is evaluated exactly once across ranks.

    Resumable mid-epoch: `state_dict()` holds the epoch and the batches *consumed* in it
    (`consumed`, counted by the caller as batches are trained on: loaders prefetch, so batches
    yielded are ahead of them); after `load_state_dict()` the next iteration of that epoch
    skips those batches and yields exactly the rest of the uninterrupted epoch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size}; expected an integer >= 1")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch trained on (the caller counts)
        self._skip: tuple[int, int] | None = None  # (epoch, batches) to skip once, after a restore

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "consumed": int(self.consumed), "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores the position: the next `__iter__` of `state["epoch"]` skips the consumed
        batches; a finished epoch resumes at the start of the next one."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if state.get("num_batches", len(self)) != len(self):
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint's epoch had {state['num_batches']} training "
                f"batches, this run has {len(self)} (data.batch_size, the data or the number of "
                "processes changed); resume with the settings it was trained with"
            )
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed = epoch, consumed
        self._skip = (epoch, consumed)

    def _indices(self) -> np.ndarray:
        if not self.shuffle:
            bounds = np.linspace(0, self.n, self.world_size + 1).astype(np.int64)
            return np.arange(bounds[self.rank], bounds[self.rank + 1], dtype=np.int64)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        if self.world_size == 1:
            return perm
        per_rank = -(-self.n // self.world_size)
        perm = np.resize(perm, per_rank * self.world_size)  # wrap to equal shards
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        skip = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                skip = self._skip[1]
            self._skip = None
        self.consumed = skip
        idx = self._indices()
        stop = len(idx) - (len(idx) % self.batch_size if self.drop_last else 0)
        for b in range(skip * self.batch_size, stop, self.batch_size):
            yield idx[b : b + self.batch_size]

    def __len__(self) -> int:
        m = (
            len(self._indices())
            if not self.shuffle
            else (self.n if self.world_size == 1 else -(-self.n // self.world_size))
        )
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

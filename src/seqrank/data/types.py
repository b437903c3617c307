"""The two contracts every part of seqrank shares: the dataset `Schema` and the model `Batch`.

Models import nothing from the data package but these two types; data code never imports
`torch.nn`. Id 0 is padding in every vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Schema:
    """What preprocessing learned about a dataset; alone it sizes a model.

    Attributes:
        name: dataset name (the data config's name).
        num_users: user vocabulary size, padding row 0 included.
        num_items: item vocabulary size, padding row 0 included.
        num_cates: category vocabulary size, padding row 0 included.
        num_behaviors: behaviour vocabulary size, padding row 0 included
            (Amazon has one real behaviour, so 2; Taobao pv/cart/fav/buy, so 5).
        behavior_names: names of behaviours 1..num_behaviors-1.
        protocol: split protocol (`paper`, `loo` or `time`).
        split_sizes: number of samples per split.
        unknown_cate: id of the explicit "unknown category" (items without meta), or 0 if none.
    """

    name: str
    num_users: int
    num_items: int
    num_cates: int
    num_behaviors: int
    behavior_names: tuple[str, ...]
    protocol: str
    split_sizes: dict[str, int] = field(default_factory=dict)
    unknown_cate: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["behavior_names"] = list(self.behavior_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Schema: unknown keys {unknown}; expected a subset of {sorted(known)}"
            )
        d = dict(d)
        d["behavior_names"] = tuple(d.get("behavior_names", ()))
        return cls(**d)


@dataclass
class Batch:
    """One batch of ranking samples; Lightning moves it to the device as a dataclass.

    Histories are left-padded: position L-1 is the most recent event before the target.

    Attributes:
        user: (B,) user ids.
        hist_item: (B, L) item ids of the history, 0 where padded.
        hist_cate: (B, L) category ids of the history, 0 where padded.
        hist_behavior: (B, L) behaviour ids of the history, 0 where padded.
        hist_gap: (B, L) int64 seconds from each history event to the target time (>= 0).
        hist_mask: (B, L) bool, True where a real event is.
        target_item: (B,) candidate item ids.
        target_cate: (B,) candidate category ids.
        label: (B,) float 1.0 for the observed item, 0.0 for a sampled negative.
        index: (B,) int64 sample index in its split (metrics use it to count every sample
            exactly once, also when a distributed sampler repeats samples).
        pos: (B,) int64 index of the target inside the user's events, or None; a positive and
            its sampled negative share (user, pos), which pairs them for `pairwise_auc`.
    """

    user: Tensor
    hist_item: Tensor
    hist_cate: Tensor
    hist_behavior: Tensor
    hist_gap: Tensor
    hist_mask: Tensor
    target_item: Tensor
    target_cate: Tensor
    label: Tensor
    index: Tensor
    pos: Tensor | None = None

    def __len__(self) -> int:
        return int(self.target_item.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
            }
        )

    def replace(self, **changes: Tensor) -> Batch:
        return dataclasses.replace(self, **changes)

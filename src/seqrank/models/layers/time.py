"""Time-gap positions: log2 buckets of the gap to the target, and their embedding.

BST (Chen et al., 2019) uses pos(v_i) = t(v_t) - t(v_i) as the position of an event; ATRank
bucketises the same gap on a log scale. Gaps span seconds to years, so buckets grow as powers
of two: bucket k holds gaps of [2^k - 1, 2^(k+1) - 1) units.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


# eager under torch.compile: inductor (torch 2.13, CPU) emits C++ that does not compile for
# the vectorised int32 -> int64 conversion of frexp's exponent; the op is tiny
@torch.compiler.disable
def log2_time_bucket(
    gap_seconds: Tensor, num_buckets: int, unit_seconds: float = 86400.0
) -> Tensor:
    """Bucketise time gaps on a log2 scale.

    With g = gap / unit + 1 (negative gaps count as 0, so g >= 1), the bucket is floor(log2 g):
    g in [1, 2) -> 0, [2, 4) -> 1, [4, 8) -> 2, ... The last bucket, num_buckets - 1, collects
    every gap of at least 2^(num_buckets-1) - 1 units.

    Args:
        gap_seconds: (...) gaps in seconds, any integer or floating dtype.
        num_buckets: number of buckets, >= 1.
        unit_seconds: length of one unit in seconds (a day by default), > 0.

    Returns:
        (...) int64 bucket ids in [0, num_buckets).

    Raises:
        ValueError: if num_buckets < 1 or unit_seconds <= 0.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got num_buckets={num_buckets}")
    if not unit_seconds > 0:
        raise ValueError(f"unit_seconds must be > 0, got unit_seconds={unit_seconds}")
    # float64 keeps integer-second gaps exact at bucket edges (MPS has no float64)
    dtype = torch.float32 if gap_seconds.device.type == "mps" else torch.float64
    g = gap_seconds.to(dtype).clamp_min(0.0) / unit_seconds + 1.0  # (...) >= 1
    # cap before frexp so that inf and huge gaps land in the last bucket, not in garbage
    g = g.clamp_max(2.0 ** min(num_buckets, 100))  # (...)
    # frexp: g = m * 2^e with m in [0.5, 1), so floor(log2 g) = e - 1, exact at powers of two
    _, exponent = torch.frexp(g)
    bucket = exponent.long() - 1  # (...)
    return bucket.clamp(0, num_buckets - 1)  # explicit overflow: last bucket means ">= 2^(n-1)"


class TimeBucketEmbedding(nn.Module):
    """Embed a time gap through its log2 bucket.

    Args:
        num_buckets: number of log2 buckets (rows of the table), >= 1.
        dim: embedding width.
        unit_seconds: length of one unit in seconds (a day by default).
    """

    def __init__(self, num_buckets: int, dim: int, unit_seconds: float = 86400.0) -> None:
        super().__init__()
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got num_buckets={num_buckets}")
        self.num_buckets = num_buckets
        self.unit_seconds = unit_seconds
        self.embedding = nn.Embedding(num_buckets, dim)

    def forward(self, gap_seconds: Tensor) -> Tensor:
        """Args:
            gap_seconds: (...) gaps in seconds.

        Returns:
            (..., dim) embeddings.
        """
        bucket = log2_time_bucket(gap_seconds, self.num_buckets, self.unit_seconds)  # (...)
        return self.embedding(bucket)  # (..., dim)

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, unit_seconds={self.unit_seconds}"

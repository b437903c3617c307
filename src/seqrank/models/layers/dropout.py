"""Dropout whose keep mask comes from `torch.rand`: the same distribution as `nn.Dropout`,
without the element-wise `bernoulli_` that costs ~15% of a BST training step on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dropout(nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    On CPU the mask is `rand >= p` (torch's vectorised uniform generator, ~2x faster than
    `F.dropout`'s `bernoulli_`); elsewhere it is `F.dropout` (a fused kernel on CUDA). Either
    way the mask is Bernoulli(1 - p) per element; only the random stream differs.

    Args:
        p: drop probability in [0, 1).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got p={p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: (...) any shape.

        Returns:
            (...) x with dropped elements zeroed (training) or x itself (eval, p = 0).
        """
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.rand_like(x) >= self.p  # (...) bool, P(keep) = 1 - p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"

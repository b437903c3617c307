"""Dropout whose keep mask comes from 16 random bits per element, drawn by numpy's SFC64.

On CPU, torch's generators are the slowest part of a BST training step after the GEMMs:
`bernoulli_` (what `F.dropout` uses) and `rand` run at 100-200M elements/s on this class of
machine, and dropout on the (B, H, L, L) attention weights needs 5M of them per step at batch
256 and history 50. SFC64 (numpy) fills 64 bits at a time, ~10x faster; each 64-bit word gives
four 16-bit draws. The seed of each call is one draw from torch's default generator, so
`torch.manual_seed` (and the RNG state a checkpoint restores) still fixes every mask.

The drop probability is rounded to a multiple of 1/65536 (0.2 -> 0.1999969) and the kept
elements are scaled by 1 / (1 - that rounded p), so the output's expectation is exactly the
input, as with `nn.Dropout`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SEED_HIGH = 2**62


def random_bits16(shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Uniform int16 draws of the given shape (each bit pattern has probability 2^-16).

    The stream is seeded by one draw from torch's default CPU generator.
    """
    n = int(np.prod(shape)) if len(shape) else 1
    seed = int(torch.randint(_SEED_HIGH, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # (ceil(n / 4),) uint64
    return torch.from_numpy(words.view(np.int16)[:n]).view(shape)


def keep_threshold(p: float) -> tuple[int, float]:
    """The int16 threshold t (keep where bits >= t) and the scale 1 / (1 - p') of kept elements,
    with p' = round(p * 65536) / 65536 the probability that an element is dropped."""
    dropped = round(p * 65536)
    return dropped - 32768, 65536.0 / (65536 - dropped)


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """A (shape) tensor of 0 (dropped, probability p) and 1 (kept) in `dtype`."""
    threshold, _ = keep_threshold(p)
    return torch.ge(random_bits16(shape), threshold, out=torch.empty(shape, dtype=dtype))


class _MaskedScale(torch.autograd.Function):
    """y = x * mask * scale with the (0/1) mask saved for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.addcmul(x.new_zeros(()), x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        (mask,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout; eager on CPU with the 16-bit keep mask above, else `F.dropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor's own RNG
        return F.dropout(x, p, training=True)
    _, scale = keep_threshold(p)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.dtype), scale)


class Dropout(nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    On CPU the mask comes from `keep_mask` (16 random bits per element, ~10x faster than
    `F.dropout`'s `bernoulli_`); elsewhere it is `F.dropout` (a fused kernel on CUDA). Either
    way the mask is Bernoulli(1 - p) per element (on CPU p rounded to a multiple of 1/65536);
    only the random stream differs.

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
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"

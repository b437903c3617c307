"""Multi-head self-attention over a padded sequence (Vaswani et al., 2017)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank.models.layers.dropout import Dropout


class MultiHeadSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a key-padding mask.

    Sequences whose keys are all padding attend to nothing and output zeros (not NaN).

    Args:
        d_model: attention width D (input and output).
        num_heads: number of heads H; must divide d_model.
        dropout: dropout on the attention weights (training only).
        bias: whether the projections have biases.

    Raises:
        ValueError: if num_heads does not divide d_model, or dropout is outside [0, 1).
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float = 0.0, *, bias: bool = True
    ) -> None:
        super().__init__()
        if num_heads < 1 or d_model % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must divide the attention width d_model={d_model}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.dropout = dropout
        self.drop = Dropout(dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend every position to the valid positions of its sequence.

        Args:
            x: (B, L, D) inputs.
            mask: (B, L) bool, True where a key is valid (may be attended); None = all valid.
            return_weights: also return the attention weights, computed explicitly.

        Returns:
            (B, L, D) outputs; with return_weights, also the (B, H, L, L) weights (rows of
            sequences without a valid key are zeros).
        """
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, L, D/H)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        # a sequence with no valid key would softmax over all -inf -> NaN: let it attend to
        # everything, then zero its output below
        has_key = mask.any(dim=-1)  # (B,)
        attend = (mask | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, L)
        p = self.dropout if self.training else 0.0
        # with dropout, torch's CPU SDPA is this same math path but draws its mask with the
        # slower bernoulli_ (see layers/dropout.py)
        if return_weights or (p > 0 and x.device.type == "cpu"):
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)  # (B, H, L, L)
            scores = scores.float().masked_fill(~attend, float("-inf"))
            weights = scores.softmax(dim=-1).to(v.dtype)  # (B, H, L, L)
            y = self.drop(weights) @ v  # (B, H, L, D/H)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attend, dropout_p=p
            )  # (B, H, L, D/H)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        y = self.out(y) * has_key[:, None, None].to(y.dtype)  # (B, L, D), zeros without keys
        if return_weights:
            return y, weights * has_key[:, None, None, None].to(weights.dtype)
        return y

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"

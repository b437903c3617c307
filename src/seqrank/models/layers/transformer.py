"""Post-norm Transformer encoder as in BST (Chen et al., 2019, eqs. 5-6).

S' = LayerNorm(S + Dropout(MH(S)));  F = LayerNorm(S' + Dropout(FFN(S'))),
with a point-wise FFN of Linear -> LeakyReLU -> Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seqrank.models.layers.attention import MultiHeadSelfAttention
from seqrank.models.layers.dropout import Dropout
from seqrank.models.layers.mlp import make_activation
from seqrank.models.layers.ragged import to_positions


class TransformerBlock(nn.Module):
    """One post-norm self-attention block.

    Args:
        d_model: width D.
        num_heads: attention heads; must divide d_model.
        ffn_dim: hidden width of the point-wise feed-forward network.
        dropout: dropout on attention weights and on both residual branches.
        activation: FFN activation name (the paper uses LeakyReLU).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        ffn_dim: int,
        dropout: float,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.attn = MultiHeadSelfAttention(d_model, num_heads, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), make_activation(activation), nn.Linear(ffn_dim, d_model)
        )
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Args:
            x: (B, L, D) inputs.
            mask: (B, L) bool, True at valid positions; None = all valid.
            return_weights: also return the (B, H, L, L) attention weights.

        Returns:
            (B, L, D) outputs (padded positions are not zeroed here), and the weights if asked.
        """
        a = self.attn(x, mask, return_weights=return_weights)
        a, weights = a if return_weights else (a, None)  # (B, L, D), (B, H, L, L)
        x = self.norm1(x + self.drop(a))  # eq. 5
        x = self.norm2(x + self.drop(self.ffn(x)))  # eq. 6
        return (x, weights) if return_weights else x

    def forward_groups(
        self,
        x: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """`forward` of length groups, tokens flat (`MultiHeadSelfAttention.forward_groups`):
        everything but the attention runs once over all (T, D) tokens, or with `real` over the
        (R, D) valid ones only."""
        x = self.norm1(x + self.drop(self.attn.forward_groups(x, masks, real, offsets)))  # eq. 5
        return self.norm2(x + self.drop(self.ffn(x)))  # eq. 6


class TransformerEncoder(nn.Module):
    """A stack of `TransformerBlock`s; outputs at padded positions are zeros.

    Args:
        num_layers: number of blocks (0 = identity, up to the zeroing of padding).
        d_model: width D.
        num_heads: attention heads; must divide d_model.
        ffn_dim: FFN hidden width.
        dropout: dropout rate of every block.
        activation: FFN activation name.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        *,
        ffn_dim: int,
        dropout: float,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got num_layers={num_layers}")
        self.layers = nn.ModuleList(
            TransformerBlock(
                d_model, num_heads, ffn_dim=ffn_dim, dropout=dropout, activation=activation
            )
            for _ in range(num_layers)
        )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Args:
            x: (B, L, D) inputs.
            mask: (B, L) bool, True at valid positions; None = all valid.
            return_weights: also return a list with each layer's (B, H, L, L) weights.

        Returns:
            (B, L, D) outputs, zero where mask is False; and the weights if asked.
        """
        weights = []
        for layer in self.layers:
            if return_weights:
                x, w = layer(x, mask, return_weights=True)
                weights.append(w)
            else:
                x = layer(x, mask)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)  # (B, L, D)
        return (x, weights) if return_weights else x

    def forward_groups(
        self,
        x: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """`forward` of several groups of sequences (length groups) at once.

        Args:
            x: (T, D) the tokens of every group, group after group, each group's (n, L)
                positions row-major; T = the sum of the masks' sizes. With `real`: (R, D), the
                valid tokens only (every layer but the attention then runs on R rows).
            masks: per group, its (n, L) bool mask of valid positions.
            real: (R,) int64 positions of x's rows among the T (`ragged.real_positions`), or
                None when x holds all T positions.
            offsets: `ragged.sequence_offsets(masks)` when x holds exactly the valid tokens
                (`MultiHeadSelfAttention.forward_groups`), else None.

        Returns:
            (T, D) outputs, zero where padded: `forward` of each group, flattened.
        """
        for layer in self.layers:
            x = layer.forward_groups(x, masks, real, offsets)
        if real is not None:
            return to_positions(x, real, sum(m.numel() for m in masks))  # (T, D)
        valid = torch.cat([m.reshape(-1) for m in masks])  # (T,)
        return x * valid[:, None].to(x.dtype)  # (T, D)

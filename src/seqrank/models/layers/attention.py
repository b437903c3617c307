"""Multi-head scaled dot-product attention over padded sequences (Vaswani et al., 2017).

`attention` is the core both models use: softmax over the valid keys, dropout on the weights,
weights times values. On CPU it runs as one autograd function that walks the heads and, for long
histories or large batches, chunks of samples, and does every (L, L) step of a head - scores,
mask, softmax, dropout, the product with the values, and in the backward pass their
gradients - while the head's scores are in cache, reading and writing the heads in place. Written op by op, each of those steps is a pass over the whole (B, H, L, L) tensor in
memory (21 MB at batch 256, history 50): ten such passes cost more than the attention's
matrix products, and about as much as the rest of the Transformer. Elsewhere (CUDA, and under
`torch.compile`) it is `F.scaled_dot_product_attention`, whose fused kernels include dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank.models.layers.dropout import dropout as apply_dropout
from seqrank.models.layers.dropout import keep_threshold, random_bits16

# scores of one head per chunk of the CPU path: 2^20 floats = 4 MiB (fewer, larger chunks
# measured faster than L2-sized ones: per-op overhead outweighs the cache misses)
CHUNK_SCORES = 1 << 20
# per-head score matrices up to this size go through plain ops over all heads at once: the
# kernel's per-head calls would cost more than the work
TINY_SCORES = 64


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor,
    query_mask: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head, over the valid keys, with dropout on the weights.

    Rows (queries) without a valid key, and queries where `query_mask` is False, get all-zero
    weights and a zero output (never NaN).

    Args:
        q: (B, Lq, H, d) queries, any strides (e.g. a view of a packed projection).
        k: (B, Lk, H, d) keys.
        v: (B, Lk, H, d) values.
        key_mask: (B, Lk) bool, True where a key may be attended.
        query_mask: (B, Lq) bool, True at real queries; None = all real.
        dropout: drop probability of the attention weights (pass 0 outside training).

    Returns:
        (B, Lq, H * d) outputs, heads concatenated.
    """
    B, Lq, H, d = q.shape
    scale = 1.0 / math.sqrt(d)
    has_key = key_mask.any(dim=1)  # (B,)
    attend = key_mask | ~has_key[:, None]  # (B, Lk): a row without keys attends to all...
    row_valid = has_key[:, None].expand(B, Lq)  # (B, Lq) ...and is zeroed
    if query_mask is not None:
        row_valid = row_valid & query_mask
    if q.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled: inductor fuses SDPA
        if Lq * k.shape[1] <= TINY_SCORES:  # e.g. one query (ATRank's target): a few ops for all heads
            weights = attention_weights(q, k, key_mask, query_mask)  # (B, H, Lq, Lk)
            y = apply_dropout(weights, dropout) @ v.transpose(1, 2)  # (B, H, Lq, d)
            return y.transpose(1, 2).reshape(B, Lq, H * d)
        rows = None if bool(row_valid.all()) else row_valid
        return _ChunkedAttention.apply(q, k, v, attend, rows, dropout, scale)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attend[:, None, None, :],
        dropout_p=dropout,
        scale=scale,
    )  # (B, H, Lq, d)
    y = y * row_valid[:, None, :, None].to(y.dtype)  # (B, H, Lq, d)
    return y.transpose(1, 2).reshape(B, Lq, H * d)


def attention_weights(
    q: Tensor, k: Tensor, key_mask: Tensor, query_mask: Tensor | None = None
) -> Tensor:
    """The weights `attention` applies (before dropout), computed explicitly, for plots.

    Args:
        q, k, key_mask, query_mask: as in `attention`.

    Returns:
        (B, H, Lq, Lk) weights; zero on masked keys, on padded queries and on rows without a
        valid key.
    """
    d = q.shape[-1]
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(d)  # (B, H, Lq, Lk)
    has_key = key_mask.any(dim=1)  # (B,)
    attend = (key_mask | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # half -> float
    weights = scores.masked_fill(~attend, float("-inf")).softmax(dim=-1)
    valid = has_key[:, None, None, None]  # (B, 1, 1, 1)
    if query_mask is not None:
        valid = valid & query_mask[:, None, :, None]  # (B, 1, Lq, 1)
    return (weights * valid).to(q.dtype)


class _ChunkedAttention(torch.autograd.Function):
    """The CPU path of `attention`: head by head, a chunk of samples at a time.

    Each head's queries, keys and values are read in place from the (B, L, H, d) inputs (a
    strided batch of (L, d) matrices is what `bmm` takes), and its outputs and gradients are
    written in place into (B, L, H, d) results: no copies that reorder heads. Saved for
    backward: q, k, v, the softmax weights P (H, B, Lq, Lk) and, with dropout, the 16-bit
    draws of the keep mask (H, B, Lq, Lk).
    """

    @staticmethod
    def forward(  # noqa: ANN001, PLR0913
        ctx, q: Tensor, k: Tensor, v: Tensor, attend: Tensor, rows: Tensor | None, p: float, scale: float
    ) -> Tensor:
        B, Lq, H, d = q.shape
        Lk = k.shape[1]
        out = q.new_empty(B, Lq, H, d)
        P = q.new_empty(H, B, Lq, Lk)
        masked = ~attend[:, None, :]  # (B, 1, Lk)
        row_scale = None if rows is None else rows[:, :, None].to(q.dtype)  # (B, Lq, 1)
        bits = random_bits16((H, B, Lq, Lk)) if p > 0 else None
        threshold, keep_scale = keep_threshold(p) if p > 0 else (0, 1.0)
        step = max(1, CHUNK_SCORES // (Lq * Lk))
        scores = q.new_empty(min(step, B), Lq, Lk)
        kept = q.new_empty(min(step, B), Lq, Lk) if p > 0 else None
        for i in range(0, B, step):
            j = min(i + step, B)
            b = j - i
            for h in range(H):
                s = scores[:b].baddbmm_(q[i:j, :, h], k[i:j, :, h].transpose(1, 2), beta=0, alpha=scale)
                s.masked_fill_(masked[i:j], float("-inf"))  # (b, Lq, Lk)
                w = torch.ops.aten._softmax.out(s, -1, False, out=P[h, i:j])  # (b, Lq, Lk)
                if row_scale is not None:
                    w.mul_(row_scale[i:j])
                if bits is not None:  # keep where bits >= threshold; the scale goes on the output
                    w = torch.ge(bits[h, i:j], threshold, out=kept[:b]).mul_(w)
                torch.mul(torch.bmm(w, v[i:j, :, h]), keep_scale, out=out[i:j, :, h])  # (b, Lq, d)
        ctx.save_for_backward(q, k, v, P, bits)
        ctx.threshold, ctx.keep_scale, ctx.scale, ctx.step = threshold, keep_scale, scale, step
        return out.view(B, Lq, H * d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v, P, bits = ctx.saved_tensors
        B, Lq, H, d = q.shape
        Lk = k.shape[1]
        g = grad.reshape(B, Lq, H, d)
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
        step, scale, keep_scale = ctx.step, ctx.scale, ctx.keep_scale
        dw_buf = q.new_empty(min(step, B), Lq, Lk)
        kept = q.new_empty(min(step, B), Lq, Lk) if bits is not None else None
        for i in range(0, B, step):
            j = min(i + step, B)
            b = j - i
            for h in range(H):
                gh = g[i:j, :, h]  # (b, Lq, d)
                w = P[h, i:j]  # (b, Lq, Lk)
                # gradient of the dropped weights, the dropout scale folded in
                dw = dw_buf[:b].baddbmm_(gh, v[i:j, :, h].transpose(1, 2), beta=0, alpha=keep_scale)
                if bits is not None:
                    m = torch.ge(bits[h, i:j], ctx.threshold, out=kept[:b])  # (b, Lq, Lk) 0/1
                    dv_h = torch.bmm(m.mul(w).transpose(1, 2), gh)  # (b, Lk, d)
                    dw.mul_(m)
                else:
                    dv_h = torch.bmm(w.transpose(1, 2), gh)  # (b, Lk, d)
                torch.mul(dv_h, keep_scale, out=dv[i:j, :, h])
                # softmax backward; zero where P is zero (masked keys, zeroed rows)
                ds = torch.ops.aten._softmax_backward_data(dw, w, -1, w.dtype)  # (b, Lq, Lk)
                torch.mul(torch.bmm(ds, k[i:j, :, h]), scale, out=dq[i:j, :, h])
                torch.mul(torch.bmm(ds.transpose(1, 2), q[i:j, :, h]), scale, out=dk[i:j, :, h])
        return dq, dk, dv, None, None, None, None


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
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).unbind(2)  # 3 x (B, L, H, D/H) views
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        p = self.dropout if self.training else 0.0
        if return_weights:
            weights = attention_weights(q, k, mask)  # (B, H, L, L)
            y = apply_dropout(weights, p) @ v.transpose(1, 2)  # (B, H, L, D/H)
            y = y.transpose(1, 2).reshape(B, L, D)
        else:
            y = attention(q, k, v, mask, dropout=p)  # (B, L, D), zero rows without keys
        y = self.out(y)  # (B, L, D)
        has_key = mask.any(dim=-1)  # (B,)
        # zeros without keys; on CPU the check is free and BST's target is always a key
        if x.device.type != "cpu" or torch.compiler.is_compiling() or not bool(has_key.all()):
            y = y * has_key[:, None, None].to(y.dtype)  # (B, L, D)
        return (y, weights) if return_weights else y

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"

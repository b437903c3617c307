"""Multi-head scaled dot-product attention over padded sequences (Vaswani et al., 2017).

`attention` is the core both models use: softmax over the valid keys, dropout on the weights,
weights times values. On CPU, in float32 and float64 (and for bfloat16/float16 inputs, CPU
autocast's, on float32 copies), it runs as one fused C++ call per pass
(`seqrank/kernels.py`, `seqrank/csrc/attention.cpp`): for every (sample, head) the scores, key mask, softmax,
dropout and product with the values - and in the backward call their gradients - with the
head's q, k, v and scores in L1 cache, ReLU (ATRank's activated Q/K/V) applied on load. Written
op by op, each of those steps is a pass over the whole (B, H, L, L) tensor in memory and an op
call with its overhead; at these sizes (16-wide heads, histories of 5-50) the calls and passes,
not the FLOPs, are the cost. Where the kernel is not built (no compiler, or
`SEQRANK_FUSED_ATTENTION=0`), two Python kernels do the same: one autograd function that walks
the heads and chunks of samples with each head's scores in cache, and, for small attention (all
heads' scores together at most `TINY_TOTAL` entries), plain ops over all heads. Elsewhere (CUDA,
and under `torch.compile`) it is `F.scaled_dot_product_attention`, whose fused kernels include
dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrank import kernels
from seqrank.models.layers.dropout import dropout as apply_dropout
from seqrank.models.layers.dropout import keep_threshold, random_bits16
from seqrank.models.layers.ragged import to_positions

# scores of one head per chunk of the CPU path: 2^20 floats = 4 MiB (fewer, larger chunks
# measured faster than L2-sized ones: per-op overhead outweighs the cache misses)
CHUNK_SCORES = 1 << 20
# attention whose scores, all heads together, have at most this many entries (2^21 floats =
# 8 MiB) goes through plain ops over all heads at once: a few calls, whose passes over the
# scores and copies of k and v (to batch the heads) are cheap at that size, where the kernel
# makes ~10 calls per head. Measured per training step (2-core CPU, paper settings): on length
# groups' short histories (Electronics-like lengths, batch 256) the plain ops were 3-7% faster
# for BST and ATRank than with a 1 MiB bound; on full histories of 50 (scores of 20-80 MiB)
# the kernel is 10-35% faster than plain ops.
TINY_TOTAL = 1 << 21
# the fused C++ kernel (`seqrank/kernels.py`, `seqrank/csrc/attention.cpp`) runs CPU attention in float32 and
# float64 when it is built (else the Python kernels above, which are also its reference in the
# tests); measured fwd + bwd of one self-attention (batch 256, 8 heads of 16, 2 threads):
# history 20: 8.2 ms vs 17.8 (Python kernels); history 50: 25.4 ms vs 41.5; 64 x 5: 0.35 vs 1.0
# Half-precision inputs (CPU autocast: bfloat16 / float16 projections) run through the float32
# kernel on float32 copies, the output cast back: one pass over the projection each way, where
# the Python kernels would run a dozen ops per group in half precision.
FUSED = True
_FUSED_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_EMPTY_BITS = torch.empty(0, dtype=torch.int16)
_EMPTY_BOOL = torch.empty(0, dtype=torch.bool)


def _tiny(B: int, H: int, Lq: int, Lk: int) -> bool:
    return B * H * Lq * Lk <= TINY_TOTAL


def _fused_kernel(x: Tensor):  # noqa: ANN202
    """The fused C++ kernel for a CPU float32/float64 input, or a half one (run in float32),
    when `FUSED` and it is built."""
    ok = FUSED and (x.dtype in _FUSED_DTYPES or x.dtype in _HALF_DTYPES)
    return kernels.load("attention") if ok else None


def _kernel_dtype(*xs: Tensor) -> tuple[Tensor, ...]:
    """The inputs as the kernel takes them: half ones as float32 copies (the same tensor once
    for the same input)."""
    if xs[0].dtype not in _HALF_DTYPES:
        return xs
    first = xs[0].float()
    return (first, *(first if x is xs[0] else x.float() for x in xs[1:]))


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
    if (
        q.device.type == "cpu" and not torch.compiler.is_compiling()
    ):  # compiled: inductor fuses SDPA
        ext = _fused_kernel(q)
        if ext is not None:  # k and v packed for the kernel: one small copy
            rows = None if bool(row_valid.all()) else row_valid
            q32, k32, v32 = _kernel_dtype(q, k, v)
            kv = torch.stack([k32, v32], dim=2)  # (B, Lk, 2, H, d)
            y = _FusedAttention.apply(
                q32[:, :, None], kv, attend, rows, dropout, scale, False, False, ext
            )
            return y.to(q.dtype)
        if _tiny(B, H, Lq, k.shape[1]):  # e.g. one query (ATRank's target): a few ops for all heads
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


def self_attention(
    qkv: Tensor,
    key_mask: Tensor,
    query_mask: Tensor | None = None,
    dropout: float = 0.0,
    *,
    relu: bool = False,
) -> Tensor:
    """`attention` of a sequence to itself, from one packed projection.

    Args:
        qkv: (B, L, 3, H, d) queries, keys and values (e.g. a view of one (B, L, 3D) Linear
            output); with `relu`, before the activation.
        key_mask, query_mask, dropout: as in `attention`.
        relu: apply ReLU to q, k and v first (ATRank's activated Q/K/V denses); on CPU inside
            the kernel, without passes over the whole projection.

    Returns:
        (B, L, H * d) outputs, heads concatenated.
    """
    return _packed_attention(qkv, qkv, key_mask, query_mask, dropout, relu)


def cross_attention(
    q: Tensor,
    kv: Tensor,
    key_mask: Tensor,
    query_mask: Tensor | None = None,
    dropout: float = 0.0,
    *,
    relu: bool = False,
) -> Tensor:
    """`attention` of queries to a sequence, from one packed key/value projection.

    Args:
        q: (B, Lq, H, d) queries (with `relu`, before the activation).
        kv: (B, Lk, 2, H, d) keys and values (e.g. a view of one (B, Lk, 2D) Linear output);
            with `relu`, before the activation.
        key_mask, query_mask, dropout: as in `attention`.
        relu: apply ReLU to q, k and v first; on CPU inside the kernel.

    Returns:
        (B, Lq, H * d) outputs, heads concatenated.
    """
    return _packed_attention(q[:, :, None], kv, key_mask, query_mask, dropout, relu)


def _packed_attention(
    q_src: Tensor,
    kv_src: Tensor,
    key_mask: Tensor,
    query_mask: Tensor | None,
    dropout: float,
    relu: bool,
) -> Tensor:
    """q = q_src[:, :, 0], k = kv_src[:, :, -2], v = kv_src[:, :, -1] ((B, L, S, H, d) each)."""
    B, Lq, _, H, d = q_src.shape
    Lk = kv_src.shape[1]
    cpu = q_src.device.type == "cpu" and not torch.compiler.is_compiling()
    ext = _fused_kernel(q_src) if cpu else None
    if ext is None and (not cpu or _tiny(B, H, Lq, Lk)):
        if relu:
            q_src, kv_src = (
                (F.relu(q_src), F.relu(kv_src)) if q_src is not kv_src else (F.relu(q_src),) * 2
            )
        return attention(
            q_src[:, :, 0], kv_src[:, :, -2], kv_src[:, :, -1], key_mask, query_mask, dropout
        )
    has_key = key_mask.any(dim=1)  # (B,)
    row_valid = has_key[:, None].expand(B, Lq)  # (B, Lq): rows without keys are zeroed
    if query_mask is not None:
        row_valid = row_valid & query_mask
    attend = key_mask | ~has_key[:, None]  # (B, Lk)
    rows = None if bool(row_valid.all()) else row_valid
    if ext is not None:
        q32, kv32 = _kernel_dtype(q_src, kv_src)
        y = _FusedAttention.apply(
            q32, kv32, attend, rows, dropout, 1.0 / math.sqrt(d), relu, q32 is kv32, ext
        )
        return y.to(q_src.dtype)
    return _PackedAttention.apply(
        q_src, kv_src, attend, rows, dropout, 1.0 / math.sqrt(d), relu, q_src is kv_src
    )


def ragged_kernel(x: Tensor):  # noqa: ANN201
    """The fused kernel when `ragged_self_attention` / `ragged_cross_attention` can run on `x`
    (a CPU float or half tensor, the kernel built, not under torch.compile), else None: the
    callers then lay their tokens out padded for `self_attention` / `cross_attention`."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return _fused_kernel(x)


def _check_offsets(offsets: Tensor, name: str) -> Tensor:
    """The offsets as the kernel takes them (which checks their values: from 0 to the rows, not
    decreasing)."""
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or len(offsets) < 1:
        raise ValueError(
            f"{name} must be a (B + 1,) int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}"
        )
    return offsets.contiguous()


def ragged_self_attention(
    qkv: Tensor, offsets: Tensor, dropout: float = 0.0, *, relu: bool = False
) -> Tensor:
    """`self_attention` of sequences of different lengths stored one after another, without
    padding: sequence b is rows offsets[b]..offsets[b+1], and every one of its tokens is a
    query and a key (the tokens are the sequence's valid positions). Needs `ragged_kernel`.

    Args:
        qkv: (R, 3, H, d) queries, keys and values of the R tokens (e.g. a view of one (R, 3D)
            Linear output); with `relu`, before the activation.
        offsets: (B + 1,) int64, 0 = offsets[0] <= ... <= offsets[B] = R.
        dropout: drop probability of the attention weights.
        relu: apply ReLU to q, k and v first (inside the kernel).

    Returns:
        (R, H * d) outputs, heads concatenated.
    """
    ext = ragged_kernel(qkv)
    if ext is None:
        raise RuntimeError("ragged attention needs the fused CPU kernel (`ragged_kernel`)")
    offsets = _check_offsets(offsets, "offsets")
    (q32,) = _kernel_dtype(qkv)
    d = qkv.shape[-1]
    y = _RaggedAttention.apply(
        q32, q32, offsets, offsets, dropout, 1.0 / math.sqrt(d), relu, True, ext
    )
    return y.to(qkv.dtype)


def ragged_cross_attention(
    q: Tensor,
    kv: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    dropout: float = 0.0,
    *,
    relu: bool = False,
) -> Tensor:
    """`cross_attention` of ragged queries to ragged keys: sample b's queries are rows
    q_offsets[b]..q_offsets[b+1] of q and attend to every key in rows k_offsets[b]..k_offsets[b+1]
    of kv; queries of a sample without keys get a zero output. Needs `ragged_kernel`.

    Args:
        q: (Rq, H, d) queries (with `relu`, before the activation).
        kv: (Rk, 2, H, d) keys and values (with `relu`, before the activation).
        q_offsets, k_offsets: (B + 1,) int64 row offsets into q and kv.
        dropout, relu: as in `ragged_self_attention`.

    Returns:
        (Rq, H * d) outputs, heads concatenated.
    """
    ext = ragged_kernel(q)
    if ext is None:
        raise RuntimeError("ragged attention needs the fused CPU kernel (`ragged_kernel`)")
    if len(q_offsets) != len(k_offsets):
        raise ValueError(
            f"q_offsets ({len(q_offsets)}) and k_offsets ({len(k_offsets)}) differ in samples"
        )
    q_offsets = _check_offsets(q_offsets, "q_offsets")
    k_offsets = _check_offsets(k_offsets, "k_offsets")
    q32, kv32 = _kernel_dtype(q, kv)
    y = _RaggedAttention.apply(
        q32[:, None],
        kv32,
        q_offsets,
        k_offsets,
        dropout,
        1.0 / math.sqrt(q.shape[-1]),
        relu,
        False,
        ext,
    )
    return y.to(q.dtype)


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


def _attention_forward(
    ctx,
    heads,
    shape: tuple[int, int, int, int, int],
    like: Tensor,  # noqa: ANN001
    attend: Tensor,
    rows: Tensor | None,
    p: float,
    scale: float,
) -> Tensor:
    """The forward loop of the CPU kernels: `heads(i, j, h)` gives head h's (q, k, v) of samples
    i:j (views or small copies); saves the softmax weights P and the dropout draws on ctx."""
    B, Lq, Lk, H, d = shape
    out = like.new_empty(B, Lq, H, d)
    P = like.new_empty(H, B, Lq, Lk)
    masked = ~attend[:, None, :]  # (B, 1, Lk)
    row_scale = None if rows is None else rows[:, :, None].to(like.dtype)  # (B, Lq, 1)
    bits = random_bits16((H, B, Lq, Lk)) if p > 0 else None
    threshold, keep_scale = keep_threshold(p) if p > 0 else (0, 1.0)
    step = max(1, CHUNK_SCORES // (Lq * Lk))
    scores = like.new_empty(min(step, B), Lq, Lk)
    kept = like.new_empty(min(step, B), Lq, Lk) if p > 0 else None
    for i in range(0, B, step):
        j = min(i + step, B)
        b = j - i
        for h in range(H):
            q, k, v = heads(i, j, h)  # (b, Lq, d), (b, Lk, d), (b, Lk, d)
            s = scores[:b].baddbmm_(q, k.transpose(1, 2), beta=0, alpha=scale)
            s.masked_fill_(masked[i:j], float("-inf"))  # (b, Lq, Lk)
            w = torch.ops.aten._softmax.out(s, -1, False, out=P[h, i:j])  # (b, Lq, Lk)
            if row_scale is not None:
                w.mul_(row_scale[i:j])
            if bits is not None:  # keep where bits >= threshold; the scale goes on the output
                w = torch.ge(bits[h, i:j], threshold, out=kept[:b]).mul_(w)
            torch.mul(torch.bmm(w, v), keep_scale, out=out[i:j, :, h])  # (b, Lq, d)
    ctx.P, ctx.bits = P, bits
    ctx.threshold, ctx.keep_scale, ctx.scale, ctx.step = threshold, keep_scale, scale, step
    return out.view(B, Lq, H * d)


def _attention_backward(ctx, grad: Tensor, heads, write) -> None:  # noqa: ANN001
    """The backward loop: `write(i, j, h, dq, dk, dv)` stores head h's input gradients of
    samples i:j (each (b, L, d), dq and dk with the score scale applied)."""
    P, bits = ctx.P, ctx.bits
    H, B, Lq, Lk = P.shape
    g = grad.reshape(B, Lq, H, -1)
    step, scale, keep_scale = ctx.step, ctx.scale, ctx.keep_scale
    dw_buf = grad.new_empty(min(step, B), Lq, Lk)
    kept = grad.new_empty(min(step, B), Lq, Lk) if bits is not None else None
    for i in range(0, B, step):
        j = min(i + step, B)
        b = j - i
        for h in range(H):
            q, k, v = heads(i, j, h)
            gh = g[i:j, :, h]  # (b, Lq, d)
            w = P[h, i:j]  # (b, Lq, Lk)
            # gradient of the dropped weights, the dropout scale folded in
            dw = dw_buf[:b].baddbmm_(gh, v.transpose(1, 2), beta=0, alpha=keep_scale)
            if bits is not None:
                m = torch.ge(bits[h, i:j], ctx.threshold, out=kept[:b])  # (b, Lq, Lk) 0/1
                dv = torch.bmm(m.mul(w).transpose(1, 2), gh).mul_(keep_scale)  # (b, Lk, d)
                dw.mul_(m)
            else:
                dv = torch.bmm(w.transpose(1, 2), gh)  # (b, Lk, d)
            # softmax backward; zero where P is zero (masked keys, zeroed rows)
            ds = torch.ops.aten._softmax_backward_data(dw, w, -1, w.dtype)  # (b, Lq, Lk)
            dq = torch.bmm(ds, k).mul_(scale)  # (b, Lq, d)
            dk = torch.bmm(ds.transpose(1, 2), q).mul_(scale)  # (b, Lk, d)
            write(i, j, h, dq, dk, dv)


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
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attend: Tensor,
        rows: Tensor | None,
        p: float,
        scale: float,
    ) -> Tensor:
        B, Lq, H, d = q.shape
        ctx.save_for_backward(q, k, v)

        def heads(i: int, j: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
            return q[i:j, :, h], k[i:j, :, h], v[i:j, :, h]

        return _attention_forward(ctx, heads, (B, Lq, k.shape[1], H, d), q, attend, rows, p, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v = ctx.saved_tensors
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))

        def heads(i: int, j: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
            return q[i:j, :, h], k[i:j, :, h], v[i:j, :, h]

        def write(i: int, j: int, h: int, *grads: Tensor) -> None:
            for out, gr in zip((dq, dk, dv), grads, strict=True):
                out[i:j, :, h].copy_(gr)

        _attention_backward(ctx, grad, heads, write)
        return dq, dk, dv, None, None, None, None


class _PackedAttention(torch.autograd.Function):
    """The CPU path of `self_attention` and `cross_attention`: `_ChunkedAttention`'s loops over
    packed projections (q = q_src[:, :, 0], k = kv_src[:, :, -2], v = kv_src[:, :, -1]; for
    self-attention both are one (B, L, 3, H, d) tensor), with the gradients written into packed
    tensors (unbinding q, k and v would stack their gradients again: a copy of the whole
    projection) and, with `relu`, the activation applied per head and chunk inside the loop
    (ReLU and its backward op by op are two more passes over each projection, ATRank has two
    per block). Saved for backward: the (pre-activation) projections, P and the draws.
    """

    @staticmethod
    def forward(  # noqa: ANN001, PLR0913
        ctx,
        q_src: Tensor,
        kv_src: Tensor,
        attend: Tensor,
        rows: Tensor | None,
        p: float,
        scale: float,
        relu: bool,
        same: bool,
    ) -> Tensor:
        B, Lq, _, H, d = q_src.shape
        ctx.save_for_backward(q_src, kv_src)
        ctx.relu, ctx.same = relu, same
        heads = _packed_heads(q_src, kv_src, relu)
        return _attention_forward(
            ctx, heads, (B, Lq, kv_src.shape[1], H, d), q_src, attend, rows, p, scale
        )

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q_src, kv_src = ctx.saved_tensors
        # slots no head reads (none in the usual layouts) get zero gradient
        dkv = (
            torch.empty_like(kv_src)
            if kv_src.shape[2] == (3 if ctx.same else 2)
            else torch.zeros_like(kv_src)
        )
        dq = (
            dkv
            if ctx.same
            else (torch.empty_like(q_src) if q_src.shape[2] == 1 else torch.zeros_like(q_src))
        )
        slots = ((dq, q_src, 0), (dkv, kv_src, -2), (dkv, kv_src, -1))

        def write(i: int, j: int, h: int, *grads: Tensor) -> None:
            for (out, src, n), gr in zip(slots, grads, strict=True):
                if ctx.relu:  # the ReLU's backward: zero where the pre-activation is <= 0
                    gr = gr.mul_(src[i:j, :, n, h] > 0)
                out[i:j, :, n, h].copy_(gr)

        _attention_backward(ctx, grad, _packed_heads(q_src, kv_src, ctx.relu), write)
        return (
            dkv if ctx.same else dq,
            None if ctx.same else dkv,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class _FusedAttention(torch.autograd.Function):
    """The CPU path of `self_attention`, `cross_attention` and `attention` when the fused
    kernel is built (`seqrank/kernels.py`): one C++ call for the forward and one for the backward, each
    walking every (sample, head) with its q, k, v, scores and gradients in L1 cache, ReLU applied
    on load. Same packed layouts and saved tensors as `_PackedAttention` (P and the dropout draws
    are (B, H, Lq, Lk) here, sample-major).
    """

    @staticmethod
    def forward(  # noqa: ANN001, PLR0913
        ctx,
        q_src: Tensor,
        kv_src: Tensor,
        attend: Tensor,
        rows: Tensor | None,
        p: float,
        scale: float,
        relu: bool,
        same: bool,
        ext,
    ) -> Tensor:
        B, Lq, _, H, d = q_src.shape
        Lk = kv_src.shape[1]
        bits = random_bits16((B, H, Lq, Lk)) if p > 0 else _EMPTY_BITS
        threshold, keep_scale = keep_threshold(p) if p > 0 else (0, 1.0)
        rows_t = _EMPTY_BOOL if rows is None else rows.contiguous()
        q, k, v = q_src[:, :, 0], kv_src[:, :, -2], kv_src[:, :, -1]  # (B, L, H, d) views
        out, P = ext.forward(
            q, k, v, attend.contiguous(), rows_t, bits, threshold, keep_scale, scale, relu
        )
        ctx.save_for_backward(q_src, kv_src, P, bits)
        ctx.args = (threshold, keep_scale, scale, relu, same, ext)
        return out.view(B, Lq, H * d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q_src, kv_src, P, bits = ctx.saved_tensors
        threshold, keep_scale, scale, relu, same, ext = ctx.args
        B, Lq, _, H, d = q_src.shape
        dq, dkv = _packed_grads(q_src, kv_src, same, slot=2)
        ext.backward(
            grad.contiguous().view(B, Lq, H, d),
            q_src[:, :, 0],
            kv_src[:, :, -2],
            kv_src[:, :, -1],
            P,
            bits,
            threshold,
            keep_scale,
            scale,
            relu,
            dq[:, :, 0],
            dkv[:, :, -2],
            dkv[:, :, -1],
        )
        return dkv if same else dq, None if same else dkv, None, None, None, None, None, None, None


def _packed_grads(q_src: Tensor, kv_src: Tensor, same: bool, slot: int) -> tuple[Tensor, Tensor]:
    """Gradient buffers of packed projections for the fused kernel's backward (`slot`: the
    axis of the q/k/v slots): every slot is written (k and v, and q when packed with them), or
    zero-filled first."""
    covered = kv_src.shape[slot] == (3 if same else 2)
    dkv = torch.empty_like(kv_src) if covered else torch.zeros_like(kv_src)
    if same:
        return dkv, dkv
    return (torch.empty_like(q_src) if q_src.shape[slot] == 1 else torch.zeros_like(q_src)), dkv


class _RaggedAttention(torch.autograd.Function):
    """`_FusedAttention` over ragged samples (`ragged_self_attention`, `ragged_cross_attention`):
    the samples' rows one after another, (R, S, H, d) packed projections, sample b's queries at
    rows q_offsets[b]..q_offsets[b+1] and its keys at k_offsets[b]..k_offsets[b+1]; P and the
    dropout draws flat, one (H, Lq_b, Lk_b) block per sample."""

    @staticmethod
    def forward(  # noqa: ANN001, PLR0913
        ctx,
        q_src: Tensor,
        kv_src: Tensor,
        q_offsets: Tensor,
        k_offsets: Tensor,
        p: float,
        scale: float,
        relu: bool,
        same: bool,
        ext,
    ) -> Tensor:
        Rq, _, H, d = q_src.shape
        if p > 0:
            n = H * int(torch.dot(q_offsets.diff(), k_offsets.diff()))
            bits = random_bits16((n,))
        else:
            bits = _EMPTY_BITS
        threshold, keep_scale = keep_threshold(p) if p > 0 else (0, 1.0)
        q, k, v = q_src[:, 0], kv_src[:, -2], kv_src[:, -1]  # (R, H, d) views
        out, P = ext.forward_ragged(
            q, k, v, q_offsets, k_offsets, bits, threshold, keep_scale, scale, relu
        )
        ctx.save_for_backward(q_src, kv_src, q_offsets, k_offsets, P, bits)
        ctx.args = (threshold, keep_scale, scale, relu, same, ext)
        return out.view(Rq, H * d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q_src, kv_src, q_offsets, k_offsets, P, bits = ctx.saved_tensors
        threshold, keep_scale, scale, relu, same, ext = ctx.args
        Rq, _, H, d = q_src.shape
        dq, dkv = _packed_grads(q_src, kv_src, same, slot=1)
        ext.backward_ragged(
            grad.contiguous().view(Rq, H, d),
            q_src[:, 0],
            kv_src[:, -2],
            kv_src[:, -1],
            q_offsets,
            k_offsets,
            P,
            bits,
            threshold,
            keep_scale,
            scale,
            relu,
            dq[:, 0],
            dkv[:, -2],
            dkv[:, -1],
        )
        return dkv if same else dq, None if same else dkv, None, None, None, None, None, None, None


def _packed_heads(q_src: Tensor, kv_src: Tensor, relu: bool):  # noqa: ANN202
    """(i, j, h) -> head h's q, k, v of samples i:j from packed projections: strided views, or
    small ReLU'd copies."""

    def heads(i: int, j: int, h: int) -> tuple[Tensor, ...]:
        views = (q_src[i:j, :, 0, h], kv_src[i:j, :, -2, h], kv_src[i:j, :, -1, h])  # (b, L, d)
        return tuple(torch.relu(x) for x in views) if relu else views

    return heads


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
        qkv = self.qkv(x).view(B, L, 3, H, D // H)  # (B, L, 3, H, D/H)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        p = self.dropout if self.training else 0.0
        if return_weights:
            q, k, v = qkv.unbind(2)  # 3 x (B, L, H, D/H) views
            weights = attention_weights(q, k, mask)  # (B, H, L, L)
            y = apply_dropout(weights, p) @ v.transpose(1, 2)  # (B, H, L, D/H)
            y = y.transpose(1, 2).reshape(B, L, D)
        else:
            y = self_attention(qkv, mask, dropout=p)  # (B, L, D), zero rows without keys
        y = self.out(y)  # (B, L, D)
        has_key = mask.any(dim=-1)  # (B,)
        # zeros without keys; on CPU the check is free and BST's target is always a key
        if x.device.type != "cpu" or torch.compiler.is_compiling() or not bool(has_key.all()):
            y = y * has_key[:, None, None].to(y.dtype)  # (B, L, D)
        return (y, weights) if return_weights else y

    def forward_groups(
        self,
        x: Tensor,
        masks: Sequence[Tensor],
        real: Tensor | None = None,
        offsets: Tensor | None = None,
    ) -> Tensor:
        """`forward` of several groups of sequences (length groups), their tokens flat: the
        projections run once over every token; the attention on CPU with the fused kernel over
        the valid tokens alone, each sequence's one after another (`ragged_self_attention`: no
        padding at all), elsewhere group by group on the groups' padded layout.

        Args:
            x: (T, D) the tokens of every group, group after group, each group's (n, L)
                positions row-major; T = the sum of the masks' sizes. With `real`: (R, D), the
                valid tokens only (the masks' true positions, in that order).
            masks: per group, its (n, L) bool mask (True where a key is valid).
            real: (R,) int64 positions of x's rows among the T (`ragged.real_positions`), or
                None when x holds all T positions.
            offsets: `ragged.sequence_offsets(masks)` when x holds exactly the valid tokens
                (with `real`, or when every position is valid): then, where the fused CPU kernel
                runs, the attention goes over each sequence's tokens one after another.

        Returns:
            (T, D) outputs, as `forward` gives them for each group; with `real`, (R, D): those
            of the valid tokens.
        """
        D = self.d_model
        H = self.num_heads
        p = self.dropout if self.training else 0.0
        if offsets is not None and ragged_kernel(x) is not None:  # x: valid tokens, own keys
            y = ragged_self_attention(self.qkv(x).view(-1, 3, H, D // H), offsets, p)  # (T or R, D)
            return self.out(y)
        qkv = to_positions(self.qkv(x), real, sum(m.numel() for m in masks))  # (T, 3D)
        parts = qkv.split([m.numel() for m in masks])  # (n * L, 3D) per group
        y = torch.cat(
            [
                self_attention(part.view(*m.shape, 3, H, D // H), m, dropout=p).reshape(-1, D)
                for part, m in zip(parts, masks, strict=True)
            ]
        )  # (T, D)
        if real is not None:
            y = y.index_select(0, real)  # (R, D)
        y = self.out(y)  # (T or R, D)
        has_key = [m.any(dim=1, keepdim=True).expand(m.shape) for m in masks]  # (n, L) each
        if x.device.type != "cpu" or not all(bool(h.all()) for h in has_key):
            keep = torch.cat([h.reshape(-1) for h in has_key])  # (T,)
            keep = keep if real is None else keep[real]  # (T or R,)
            y = y * keep[:, None].to(y.dtype)  # (T or R, D)
        return y

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, dropout={self.dropout}"

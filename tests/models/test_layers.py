"""Tests for seqrank.models.layers: numeric checks against hand values and references."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from seqrank.models.layers import (
    MLP,
    Dropout,
    MultiHeadSelfAttention,
    TimeBucketEmbedding,
    TransformerBlock,
    TransformerEncoder,
    log2_time_bucket,
)
from seqrank.models.layers import attention as attention_module
from seqrank.models.layers.attention import (
    attention,
    attention_weights,
    cross_attention,
    self_attention,
)
from seqrank.models.layers.dropout import keep_threshold, random_bits16
from tests.models.conftest import require_fused

DAY = 86400


# --- log2_time_bucket ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gap_days", "bucket"),
    [
        (0, 0),  # g = 1
        (0.5, 0),  # fractional day, g = 1.5
        (0.999, 0),
        (1, 1),  # g = 2: exact power of two opens bucket 1
        (2.5, 1),  # g = 3.5
        (3, 2),  # g = 4
        (6.99, 2),
        (7, 3),  # g = 8
        (1022, 9),  # g = 1023
        (1023, 10),  # g = 1024
        (2046, 10),
        (2047, 11),  # g = 2048: the last of 12 buckets
        (10**9, 11),  # huge overflow clamps to the last bucket
        (-5, 0),  # negative gaps count as 0
    ],
)
def test_log2_time_bucket_hand_values(gap_days: float, bucket: int) -> None:
    gap = torch.tensor([gap_days * DAY], dtype=torch.float64)
    assert log2_time_bucket(gap, 12).tolist() == [bucket]


def test_log2_time_bucket_int64_seconds_at_edges() -> None:
    edges = [(2**k - 1) * DAY for k in range(1, 12)]
    gap = torch.tensor([e - 1 for e in edges] + edges + [0, 1, -(10**12), 2**62])  # int64
    out = log2_time_bucket(gap, 12)
    assert out.dtype == torch.int64
    assert out.tolist() == list(range(11)) + list(range(1, 12)) + [0, 0, 0, 11]


def test_log2_time_bucket_units_shape_and_inf() -> None:
    gap = torch.tensor([[0.0, 1.0], [3.0, float("inf")]])
    assert log2_time_bucket(gap, 4, unit_seconds=1.0).tolist() == [[0, 1], [2, 3]]
    assert log2_time_bucket(gap, 1).tolist() == [[0, 0], [0, 0]]


def test_log2_time_bucket_rejects_zero_buckets() -> None:
    with pytest.raises(ValueError, match="num_buckets must be >= 1"):
        log2_time_bucket(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="num_buckets"):
        TimeBucketEmbedding(0, 8)


def test_time_bucket_embedding_looks_up_the_bucket() -> None:
    torch.manual_seed(0)
    emb = TimeBucketEmbedding(5, 3)
    gap = torch.tensor([[0, 3 * DAY], [10**10, DAY]])
    out = emb(gap)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out, emb.embedding.weight[torch.tensor([[0, 2], [4, 1]])])


# --- attention ------------------------------------------------------------------------------


def _naive_attention(
    attn: MultiHeadSelfAttention, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Loop-per-head reference with an explicit masked softmax."""
    B, L, D = x.shape
    H, d = attn.num_heads, D // attn.num_heads
    Wq, Wk, Wv = attn.qkv.weight.split(D, dim=0)
    bq, bk, bv = attn.qkv.bias.split(D)
    q, k, v = x @ Wq.T + bq, x @ Wk.T + bk, x @ Wv.T + bv
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)  # (B, L, L)
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        w = torch.exp(s - s.amax(-1, keepdim=True))
        heads.append((w / w.sum(-1, keepdim=True)) @ v[..., sl])
    return torch.cat(heads, dim=-1) @ attn.out.weight.T + attn.out.bias


@pytest.mark.parametrize("return_weights", [False, True])
def test_attention_matches_naive_reference(attention_path: str, return_weights: bool) -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4, 0.3).eval()
    x = torch.randn(3, 6, 16)
    mask = torch.tensor([[True] * 6, [False, False, True, True, False, True], [False] * 5 + [True]])
    out = attn(x, mask, return_weights=return_weights)
    if return_weights:
        out, weights = out
        assert weights.shape == (3, 4, 6, 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 6))
        assert (weights[1][..., ~mask[1]] == 0).all()
    torch.testing.assert_close(out, _naive_attention(attn, x, mask), atol=1e-5, rtol=1e-5)


def test_attention_fully_padded_row_is_zero_and_finite_under_bf16_autocast(
    attention_path: str,
) -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, 0.0)
    x = torch.randn(3, 5, 32) * 30
    mask = torch.tensor([[False] * 5, [True] * 5, [False, False, False, True, True]])
    for return_weights in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, mask, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all()
        if weights is not None:
            assert torch.isfinite(weights).all() and (weights[0] == 0).all()
    out = attn(x, mask)  # fp32 too
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_attention_without_mask_attends_everywhere() -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(8, 2).eval()
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(attn(x), attn(x, torch.ones(2, 4, dtype=torch.bool)))


def test_attention_heads_must_divide_width() -> None:
    with pytest.raises(
        ValueError, match=r"num_heads=3 must divide the attention width d_model=128"
    ):
        MultiHeadSelfAttention(128, 3)


# --- transformer, mlp -------------------------------------------------------------------------


def test_transformer_block_is_post_norm_as_in_the_paper() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, ffn_dim=16, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    s = block.norm1(x + block.attn(x, mask))  # eq. 5
    ffn = block.ffn[2](torch.nn.functional.leaky_relu(block.ffn[0](s)))
    torch.testing.assert_close(block(x, mask), block.norm2(s + ffn))  # eq. 6


def test_encoder_zeroes_padding_and_ignores_padded_inputs() -> None:
    torch.manual_seed(0)
    enc = TransformerEncoder(2, 8, 2, ffn_dim=16, dropout=0.1).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [False] * 5])
    out, weights = enc(x, mask, return_weights=True)
    assert out.shape == (2, 5, 8) and len(weights) == 2 and weights[0].shape == (2, 2, 5, 5)
    assert (out[~mask] == 0).all() and torch.isfinite(out).all()
    scrambled = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    torch.testing.assert_close(enc(scrambled, mask), out)


@pytest.mark.parametrize("dense_rows", [True, False])
def test_encoder_forward_groups_is_forward_of_each_group(
    attention_path: str, dense_rows: bool
) -> None:
    """Length groups with their tokens flat: every group's outputs and every gradient equal
    the encoder run on each group alone (the zeroing of rows without keys included)."""
    torch.manual_seed(0)
    enc = TransformerEncoder(2, 8, 2, ffn_dim=16, dropout=0.0).double()
    shapes = [(3, 6), (4, 2), (2, 1)]
    xs = [torch.randn(n, L, 8, dtype=torch.float64) for n, L in shapes]
    masks = [torch.rand(n, L) < 0.7 for n, L in shapes]
    for m in masks:
        m[:, -1] = dense_rows  # dense_rows: every row has a key (BST: the target)
    masks[0][1] = False  # a row without any key: zero outputs
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).requires_grad_()
    weight = torch.randn(flat.shape, dtype=torch.float64)
    out = enc.forward_groups(flat, masks)
    (out * weight).sum().backward()
    got = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    x_ref = [x.clone().requires_grad_() for x in xs]
    ref = torch.cat([enc(x, m).reshape(-1, 8) for x, m in zip(x_ref, masks, strict=True)])
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert (out[torch.cat([m.reshape(-1) for m in masks]) == 0] == 0).all()
    torch.testing.assert_close(
        flat.grad, torch.cat([x.grad.reshape(-1, 8) for x in x_ref]), rtol=0, atol=1e-12
    )
    for n, p in enc.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-12, msg=n)
    # the attention alone (its zeros for rows without keys are visible only here)
    attn = enc.layers[0].attn
    with torch.no_grad():
        ref = torch.cat([attn(x, m).reshape(-1, 8) for x, m in zip(xs, masks, strict=True)])
        torch.testing.assert_close(attn.forward_groups(flat, masks), ref, rtol=0, atol=1e-12)


def test_mlp_shapes_and_validation() -> None:
    mlp = MLP(10, (32, 16), dropout=0.1)
    assert mlp(torch.randn(4, 10)).shape == (4, 1)
    assert MLP(10, (), out_dim=3)(torch.randn(4, 10)).shape == (4, 3)
    assert isinstance(mlp.net[1], torch.nn.LeakyReLU)
    with pytest.raises(ValueError, match="activation='swish'"):
        MLP(10, (4,), activation="swish")


def test_dropout_keeps_1_minus_p_scaled_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(200, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    # p is rounded to 13107 / 65536; kept elements are scaled by 1 / (1 - that)
    scale = 65536 / (65536 - 13107)
    assert keep_threshold(0.2) == (13107 - 32768, scale)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    (g,) = torch.autograd.grad(y, x, torch.full_like(y, 2.0))
    torch.testing.assert_close(g, kept.float() * 2 * scale)  # the same mask, the same scale
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_dropout_masks_follow_torch_manual_seed() -> None:
    drop = Dropout(0.5)
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(drop(x), a)


def test_random_bits16_are_uniform_in_every_lane() -> None:
    torch.manual_seed(0)
    bits = random_bits16((1 << 18, 4)).long()  # four int16 lanes of each 64-bit word
    for lane in range(4):
        top = (bits[:, lane] + 32768) >> 12  # 16 buckets of the high 4 bits
        counts = torch.bincount(top, minlength=16).double()
        chi2 = (((counts - counts.mean()) ** 2) / counts.mean()).sum().item()
        assert chi2 < 45.0, (lane, chi2)  # 15 dof: P(chi2 > 45) < 1e-4
        low = bits[:, lane] & 1
        assert abs(low.double().mean().item() - 0.5) < 0.01


# --- the CPU attention kernel ------------------------------------------------------------------


def _select_path(monkeypatch: pytest.MonkeyPatch, path: int | str | None) -> None:
    """ "fused": the C++ kernel; an int: the Python kernel with chunks of that many scores;
    None: the plain ops over all heads."""
    if path == "fused":
        require_fused()
        monkeypatch.setattr(attention_module, "FUSED", True)
        return
    monkeypatch.setattr(attention_module, "FUSED", False)
    monkeypatch.setattr(attention_module, "CHUNK_SCORES", path or 1 << 20)
    monkeypatch.setattr(attention_module, "TINY_TOTAL", 10**9 if path is None else 0)


def _head_major(path: int | str | None) -> bool:
    """How the path lays out its dropout draws: the Python kernel head-major (H, B, Lq, Lk),
    the plain ops and the C++ kernel sample-major (B, H, Lq, Lk)."""
    return isinstance(path, int)


def _explicit_attention(q, k, v, key_mask, query_mask, p, seed, head_major=True):  # noqa: ANN001, ANN202
    """attention() written op by op: explicit weights, the same keep mask (seeded)."""
    w = attention_weights(q, k, key_mask, query_mask)  # (B, H, Lq, Lk)
    if p > 0:
        torch.manual_seed(seed)
        threshold, scale = keep_threshold(p)
        B, H, Lq, Lk = w.shape
        # the kernel draws the mask head-major; the path for tiny score matrices sample-major
        bits = (
            random_bits16((H, B, Lq, Lk)).transpose(0, 1) if head_major else random_bits16(w.shape)
        )
        w = w * (bits >= threshold).to(w.dtype) * scale
    B, Lq, H, d = q.shape
    return (w @ v.transpose(1, 2)).transpose(1, 2).reshape(B, Lq, H * d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    "chunk", [1 << 20, 7, None, "fused"]
)  # one chunk / one sample per chunk / tiny path / C++
@pytest.mark.parametrize("with_query_mask", [False, True])
def test_chunked_attention_equals_explicit_math(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    p: float,
    chunk: int | str | None,
    with_query_mask: bool,
) -> None:
    _select_path(monkeypatch, chunk)
    torch.manual_seed(0)
    B, Lq, Lk, H, d = 13, 5, 9, 4, 3
    qkv = torch.randn(B, Lq, 3, H, d, dtype=dtype, requires_grad=True)  # q as a strided view
    q = qkv.unbind(2)[0]
    k = torch.randn(B, Lk, H, d, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Lk, H, d, dtype=dtype, requires_grad=True)
    key_mask = torch.rand(B, Lk) > 0.4
    key_mask[0], key_mask[1] = False, True  # a row without keys, a row with all
    query_mask = torch.rand(B, Lq) > 0.2 if with_query_mask else None
    torch.manual_seed(5)
    y = attention(q, k, v, key_mask, query_mask, p)
    expected = _explicit_attention(
        q, k, v, key_mask, query_mask, p, seed=5, head_major=_head_major(chunk)
    )
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(y, expected, **tol)
    assert (y[0] == 0).all()
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (qkv, k, v), g)
    expected_grads = torch.autograd.grad(expected, (qkv, k, v), g)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.slow
def test_compiled_encoder_trains_with_dropout() -> None:
    """Under torch.compile the CPU kernels step aside for SDPA and F.dropout (inductor's RNG)."""
    torch.manual_seed(0)
    enc = TransformerEncoder(1, 16, 4, ffn_dim=16, dropout=0.2).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0] = False  # a sequence without keys
    y = torch.compile(enc)(x, mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and (y[0] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("path", [50, "fused"])  # the Python kernel in several chunks / C++
def test_chunked_attention_gradcheck(monkeypatch: pytest.MonkeyPatch, path: int | str) -> None:
    _select_path(monkeypatch, path)
    torch.manual_seed(0)
    q = torch.randn(6, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    key_mask = torch.rand(6, 5) > 0.3
    key_mask[2] = False
    query_mask = torch.rand(6, 4) > 0.3
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, key_mask, query_mask), (q, k, v)
    )


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(
    "chunk", [1 << 20, 7, None, "fused"]
)  # one chunk / one sample per chunk / tiny path / C++
def test_packed_self_attention_equals_explicit_math(
    monkeypatch: pytest.MonkeyPatch, relu: bool, p: float, chunk: int | str | None
) -> None:
    """`self_attention` on one packed (B, L, 3, H, d) projection (ReLU fused on CPU) against the
    op-by-op math on relu(qkv).unbind(2): outputs and the packed gradient."""
    _select_path(monkeypatch, chunk)
    torch.manual_seed(0)
    B, L, H, d = 13, 6, 4, 3
    qkv = torch.randn(B, L, 3, H, d, dtype=torch.float64, requires_grad=True)
    key_mask = torch.rand(B, L) > 0.4
    key_mask[0], key_mask[1] = False, True  # a row without keys, a row with all
    query_mask = key_mask & (torch.rand(B, L) > 0.2)
    torch.manual_seed(5)
    y = self_attention(qkv, key_mask, query_mask, p, relu=relu)
    q, k, v = (torch.relu(qkv) if relu else qkv).unbind(2)
    expected = _explicit_attention(
        q, k, v, key_mask, query_mask, p, seed=5, head_major=_head_major(chunk)
    )
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    assert (y[0] == 0).all()
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, qkv, g)
    (want,) = torch.autograd.grad(expected, qkv, g)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", [50, "fused"])  # the Python kernel in several chunks / C++
def test_packed_self_attention_gradcheck(monkeypatch: pytest.MonkeyPatch, path: int | str) -> None:
    _select_path(monkeypatch, path)
    torch.manual_seed(0)
    qkv = torch.randn(6, 5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    key_mask = torch.rand(6, 5) > 0.3
    key_mask[2] = False
    for relu in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, relu=relu: self_attention(x, key_mask, key_mask, relu=relu), (qkv,)
        )


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize(
    "path", [20, None, "fused"]
)  # Python kernel, several chunks / tiny path / C++
def test_packed_cross_attention_equals_explicit_math(
    monkeypatch: pytest.MonkeyPatch, relu: bool, p: float, Lq: int, path: int | str | None
) -> None:
    """`cross_attention` (ATRank's target stage: queries against one packed key/value
    projection) against the op-by-op math: outputs, and the gradients of q and of the packed kv."""
    _select_path(monkeypatch, path)
    torch.manual_seed(0)
    B, Lk, H, d = 11, 7, 4, 3
    q = torch.randn(B, Lq, H, d, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, Lk, 2, H, d, dtype=torch.float64, requires_grad=True)
    key_mask = torch.rand(B, Lk) > 0.4
    key_mask[0], key_mask[1] = False, True
    torch.manual_seed(5)
    y = cross_attention(q, kv, key_mask, None, p, relu=relu)
    act = torch.relu if relu else (lambda t: t)
    k, v = act(kv).unbind(2)
    expected = _explicit_attention(
        act(q), k, v, key_mask, None, p, seed=5, head_major=_head_major(path)
    )
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(y)
    for got, want in zip(
        torch.autograd.grad(y, (q, kv), g), torch.autograd.grad(expected, (q, kv), g), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# --- the fused C++ kernel: its vectorised float32 path, its build and fallback ---------------


@pytest.mark.parametrize("d", [8, 16, 32, 64, 12])  # vectorised widths, and one that is not
@pytest.mark.parametrize("Lk", [1, 8, 13, 50])  # keys padded to a multiple of 8 inside
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_float32_matches_float64_math(
    monkeypatch: pytest.MonkeyPatch, d: int, Lk: int, p: float, relu: bool
) -> None:
    """The float32 kernel (8-wide vectors, its own exp) against the op-by-op math in float64 on
    the same inputs: outputs and the packed gradients to float32 accuracy, zero rows exact."""
    _select_path(monkeypatch, "fused")
    torch.manual_seed(0)
    B, H = 9, 2
    qkv = torch.randn(B, Lk, 3, H, d, dtype=torch.float64) * 2  # scores of a few units
    key_mask = torch.rand(B, Lk) > 0.3
    key_mask[0], key_mask[1] = False, True  # a row without keys, a row with all
    query_mask = key_mask & (torch.rand(B, Lk) > 0.2)
    x32 = qkv.float().requires_grad_()
    torch.manual_seed(5)
    y = self_attention(x32, key_mask, query_mask, p, relu=relu)
    x64 = qkv.requires_grad_()
    q, k, v = (torch.relu(x64) if relu else x64).unbind(2)
    expected = _explicit_attention(q, k, v, key_mask, query_mask, p, seed=5, head_major=False)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=1e-4)
    assert (y[0] == 0).all() and (y[~query_mask] == 0).all()
    g = torch.randn(y.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, x32, g.float())
    (want,) = torch.autograd.grad(expected, x64, g)
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=1e-4)


def test_fused_softmax_is_exact_for_extreme_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores far apart (one key dominates by 1e4) and all equal: weights one-hot and uniform,
    no NaN or overflow from the kernel's exp."""
    _select_path(monkeypatch, "fused")
    B, L, H, d = 2, 9, 1, 8
    q = torch.zeros(B, 1, H, d)
    q[0, 0, 0, 0] = 100.0
    kv = torch.zeros(B, L, 2, H, d)
    kv[0, 3, 0, 0, 0] = 1000.0  # sample 0: key 3 scores 1e5 / sqrt(8), the others 0
    kv[:, :, 1, 0, 0] = torch.arange(L, dtype=torch.float32)  # value = the key's index
    y = cross_attention(q, kv, torch.ones(B, L, dtype=torch.bool))
    assert y[0, 0, 0].item() == 3.0  # all weight on key 3
    torch.testing.assert_close(y[1, 0, 0], torch.tensor((L - 1) / 2))  # uniform: the mean index


def test_fused_kernel_is_the_default_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernel built, float32 CPU attention goes through it (not the Python kernels),
    and `SEQRANK_FUSED_ATTENTION=0` switches it off."""
    require_fused()
    calls = []
    real = attention_module._FusedAttention.apply
    monkeypatch.setattr(
        attention_module._FusedAttention, "apply", lambda *a: calls.append(1) or real(*a)
    )
    qkv = torch.randn(4, 6, 3, 2, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    self_attention(qkv, mask)
    attention(*qkv.unbind(2), mask)
    assert len(calls) == 2
    monkeypatch.setenv("SEQRANK_FUSED_ATTENTION", "0")
    self_attention(qkv, mask)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", ["self", "cross", "separate"])
def test_fused_half_inputs_run_the_float32_kernel(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, packed: str
) -> None:
    """Half-precision inputs (CPU autocast's projections) go through the kernel on float32
    copies: the output is the float32 kernel's on the upcast inputs, cast back; the gradient
    reaches the half input in its dtype, the float32 kernel's gradient cast down."""
    require_fused()
    monkeypatch.setattr(attention_module, "FUSED", True)
    calls = []
    real = attention_module._FusedAttention.apply
    monkeypatch.setattr(
        attention_module._FusedAttention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a)
    )
    torch.manual_seed(0)
    B, L, H, d = 5, 7, 2, 8
    mask = torch.rand(B, L) > 0.3
    mask[0] = False  # a row without keys
    x = (torch.randn(B, L, 3, H, d) * 2).to(dtype)

    def run(t: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)  # the same dropout draws for both dtypes
        if packed == "self":
            return self_attention(t, mask, mask, 0.2, relu=True)
        if packed == "cross":
            return cross_attention(t[:, :, 0], t[:, :, 1:], mask, None, 0.2, relu=True)
        return attention(*t.unbind(2), mask, mask, 0.2)

    half, full = x.clone().requires_grad_(), x.float().requires_grad_()
    y, want = run(half), run(full)
    assert calls == [torch.float32, torch.float32]  # the kernel, in float32, both times
    assert y.dtype == dtype
    assert torch.equal(y, want.to(dtype))
    g = torch.randn(y.shape).to(dtype)
    (got,) = torch.autograd.grad(y, half, g)
    (ref,) = torch.autograd.grad(want, full, g.float())
    assert got.dtype == dtype
    assert torch.equal(got, ref.to(dtype))


def test_fused_build_failure_warns_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A kernel that cannot be built (here: a compiler that does not exist) gives one warning
    naming the build directory, and attention runs through the Python kernels, same results."""
    from seqrank import kernels

    monkeypatch.setenv("SEQRANK_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(attention_module, "FUSED", True)
    qkv = torch.randn(3, 5, 3, 2, 8, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    with pytest.warns(
        RuntimeWarning, match="attention C.. kernel could not be built in .*attention-"
    ):
        y = self_attention(qkv, mask, mask)
    assert kernels._state["attention"] is None
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(y, _explicit_attention(q, k, v, mask, mask, 0.0, seed=0))


def test_fused_build_dir_is_keyed_by_cpu_torch_and_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """-march=native binaries must not be shared across CPUs: another CPU id, torch version or
    source (text or path: one directory per checkout) gives another cache directory; the same
    inputs the same one."""
    from seqrank import kernels

    monkeypatch.setenv("SEQRANK_EXTENSIONS_DIR", str(tmp_path))
    first = kernels.build_dir("attention")
    assert first.parent == tmp_path and first == kernels.build_dir("attention")
    assert kernels.build_dir("adam").name.startswith("adam-")
    monkeypatch.setattr(kernels, "_cpu_id", lambda: "another cpu")
    assert kernels.build_dir("attention") != first
    monkeypatch.undo()
    monkeypatch.setenv("SEQRANK_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.build_dir("attention") == first
    checkout = tmp_path / "another checkout"  # the same source text at another path
    checkout.mkdir()
    (checkout / "attention.cpp").write_text((kernels.CSRC / "attention.cpp").read_text())
    monkeypatch.setattr(kernels, "CSRC", checkout)
    assert kernels.build_dir("attention") != first


@pytest.mark.parametrize("path", [20, "fused"])
def test_packed_attention_unread_slot_gets_zero_gradient(
    monkeypatch: pytest.MonkeyPatch, path: int | str
) -> None:
    """Keys and values read from slots 1 and 2 of a 3-slot projection whose slot 0 is not the
    queries: slot 0's gradient is exactly zero (never uninitialised memory)."""
    _select_path(monkeypatch, path)
    torch.manual_seed(0)
    q = torch.randn(4, 1, 1, 2, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(4, 6, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    y = attention_module._packed_attention(q, kv, mask, None, 0.0, True)
    y.sum().backward()
    assert (kv.grad[:, :, 0] == 0).all()
    k, v = torch.relu(kv[:, :, 1]), torch.relu(kv[:, :, 2])
    expected = _explicit_attention(torch.relu(q[:, :, 0]), k, v, mask, None, 0.0, seed=0)
    torch.testing.assert_close(y, expected)


# --- the ragged kernel: sequences one after another, no padding ------------------------------


def _ragged_reference(q, kv, q_lengths, k_lengths, p, bits):  # noqa: ANN001, ANN202
    """Each sample alone, op by op: softmax(q k^T / sqrt(d)) over all its keys, its block of the
    flat draws as the keep mask, times v; zero outputs where it has no keys."""
    threshold, keep_scale = keep_threshold(p) if p > 0 else (0, 1.0)
    H, d = q.shape[1], q.shape[2]
    outs, qs, ks, drawn = [], 0, 0, 0
    for lq, lk in zip(q_lengths, k_lengths, strict=True):
        qb = q[qs : qs + lq].transpose(0, 1)  # (H, lq, d)
        kb, vb = (kv[ks : ks + lk, i].transpose(0, 1) for i in (0, 1))  # (H, lk, d)
        if lk == 0:
            outs.append(q.new_zeros(lq, H * d))
        else:
            w = (qb @ kb.transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (H, lq, lk)
            if p > 0:
                block = bits[drawn : drawn + H * lq * lk].view(H, lq, lk)
                w = w * (block >= threshold).to(w.dtype) * keep_scale
            outs.append((w @ vb).transpose(0, 1).reshape(lq, H * d))
        qs, ks, drawn = qs + lq, ks + lk, drawn + H * lq * lk
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [16, 12])  # the vectorised float32 path, and a width that is not
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("relu", [False, True])
# cross: one query a sample or so (the per-head path), or several (the head-lanes path when the
# heads are a multiple of 8, as self-attention)
@pytest.mark.parametrize("kind", ["self", "cross", "cross_many"])
@pytest.mark.parametrize("H", [2, 8, 16])  # per-head vectors; 8 heads a vector (one / two groups)
def test_ragged_attention_is_each_sample_alone(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    d: int,
    p: float,
    relu: bool,
    kind: str,
    H: int,
) -> None:
    """Sequences of lengths 0 to 19 one after another (keys padded to multiples of 8 inside the
    per-head path, samples without keys or without queries): outputs and gradients of q, k and v
    equal each sample's attention computed alone, with its block of the flat dropout draws."""
    _check_ragged_each_sample_alone(monkeypatch, dtype, d, p, relu, kind, H)


@pytest.mark.parametrize("d", [8, 32, 64])
@pytest.mark.parametrize("kind", ["self", "cross_many"])
def test_ragged_head_lanes_widths(monkeypatch: pytest.MonkeyPatch, d: int, kind: str) -> None:
    """The head-lanes path at its other head widths (one, four and eight 8 x 8 blocks a token)."""
    _check_ragged_each_sample_alone(monkeypatch, torch.float32, d, 0.3, True, kind, 8)


@pytest.mark.parametrize(
    ("kind", "H", "dtype", "lanes"),
    [
        ("self", 8, torch.float32, True),
        ("self", 16, torch.float32, True),
        ("cross_many", 8, torch.float32, True),
        ("self", 2, torch.float32, False),  # heads not a multiple of 8
        ("self", 8, torch.float64, False),  # float32 only
        ("cross", 8, torch.float32, False),  # about one query a sample: the per-head loops
    ],
)
def test_ragged_kernel_takes_head_lanes_where_it_should(
    kind: str, H: int, dtype: torch.dtype, lanes: bool
) -> None:
    """The fast path is the one taken: the weights P the kernel keeps for its backward are laid
    out (Lq, Lk, 8) per group of 8 heads in each sample's block on the head-lanes path, (H, Lq,
    Lk) on the per-head one - whichever, they are each sample's softmax weights."""
    require_fused()
    torch.manual_seed(0)
    d = 16
    k_lengths = [3, 0, 19, 1, 8, 9, 0, 5]
    q_lengths = {
        "self": k_lengths,
        "cross": [1, 2, 1, 0, 3, 1, 1, 1],
        "cross_many": [4, 2, 6, 0, 3, 5, 1, 2],
    }[kind]
    k_offsets = torch.tensor([0, *itertools.accumulate(k_lengths)])
    q_offsets = torch.tensor([0, *itertools.accumulate(q_lengths)])
    kv = torch.randn(sum(k_lengths), 2, H, d, dtype=dtype)
    q = kv[:, 0] if kind == "self" else torch.randn(sum(q_lengths), H, d, dtype=dtype)
    ext = attention_module.ragged_kernel(q)
    _, P = ext.forward_ragged(
        q, kv[:, 0], kv[:, 1], q_offsets, q_offsets if kind == "self" else k_offsets,
        torch.empty(0, dtype=torch.int16), 0, 1.0, 1.0 / math.sqrt(d), False,
    )  # fmt: skip
    assert P.numel() == H * sum(a * b for a, b in zip(q_lengths, k_lengths, strict=True))
    at, qs, ks = 0, 0, 0
    for lq, lk in zip(q_lengths, k_lengths, strict=True):
        qb = q[qs : qs + lq].transpose(0, 1).double()  # (H, lq, d)
        kb = kv[ks : ks + lk, 0].transpose(0, 1).double()  # (H, lk, d)
        want = (qb @ kb.transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (H, lq, lk)
        block = P[at : at + H * lq * lk].double()
        if lanes:  # (groups, lq, lk, 8 heads)
            got = block.view(H // 8, lq, lk, 8).permute(0, 3, 1, 2).reshape(H, lq, lk)
        else:
            got = block.view(H, lq, lk)
        torch.testing.assert_close(
            got, want, atol=2e-6 if dtype == torch.float32 else 1e-12, rtol=0
        )
        at, qs, ks = at + H * lq * lk, qs + lq, ks + lk


def _check_ragged_each_sample_alone(  # noqa: PLR0913
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    d: int,
    p: float,
    relu: bool,
    kind: str,
    H: int,
) -> None:
    require_fused()
    monkeypatch.setattr(attention_module, "FUSED", True)
    drawn = []
    real_bits = attention_module.random_bits16
    monkeypatch.setattr(
        attention_module, "random_bits16", lambda s: drawn.append(real_bits(s)) or drawn[-1]
    )
    torch.manual_seed(0)
    k_lengths = [3, 0, 19, 1, 8, 9, 0, 5]
    q_lengths = {
        "self": k_lengths,
        "cross": [1, 2, 1, 0, 3, 1, 1, 1],
        "cross_many": [4, 2, 6, 0, 3, 5, 1, 2],
    }[kind]
    k_offsets = torch.tensor([0, *itertools.accumulate(k_lengths)])
    q_offsets = torch.tensor([0, *itertools.accumulate(q_lengths)])
    kv = (torch.randn(sum(k_lengths), 3, H, d, dtype=dtype) * 2).requires_grad_()
    q = (
        kv[:, 0]
        if kind == "self"
        else (torch.randn(sum(q_lengths), H, d, dtype=dtype) * 2).requires_grad_()
    )
    if kind == "self":
        y = attention_module.ragged_self_attention(kv, k_offsets, p, relu=relu)
        inputs = (kv,)
    else:
        y = attention_module.ragged_cross_attention(
            q, kv[:, 1:], q_offsets, k_offsets, p, relu=relu
        )
        inputs = (q, kv)
    assert len(drawn) == (p > 0)
    assert p == 0 or drawn[0].numel() == H * sum(
        a * b for a, b in zip(q_lengths, k_lengths, strict=True)
    )
    act = torch.relu if relu else (lambda t: t)
    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    rq, rkv = (
        (ref_inputs[0][:, 0], ref_inputs[0][:, 1:])
        if kind == "self"
        else (ref_inputs[0], ref_inputs[1][:, 1:])
    )
    expected = _ragged_reference(
        act(rq), act(rkv), q_lengths, k_lengths, p, drawn[0] if p else None
    )
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    assert y.dtype == dtype and y.shape == (sum(q_lengths), H * d)
    torch.testing.assert_close(y.double(), expected, **tol)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, inputs, g.to(dtype))
    want = torch.autograd.grad(expected, ref_inputs, g)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 5e-5, "rtol": 1e-4}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, **tol)


def test_ragged_attention_rejects_bad_offsets() -> None:
    """Offsets of the wrong dtype, or not running from 0 to the rows: an error naming them."""
    require_fused()
    qkv = torch.randn(5, 3, 2, 8)
    with pytest.raises(ValueError, match=r"offsets must be a \(B \+ 1,\) int64 tensor"):
        attention_module.ragged_self_attention(qkv, torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="offsets must run from 0 to the rows of q"):
        attention_module.ragged_self_attention(qkv, torch.tensor([0, 2, 4]))
    with pytest.raises(RuntimeError, match="offsets must not decrease"):
        attention_module.ragged_self_attention(qkv, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="differ in samples"):
        attention_module.ragged_cross_attention(
            torch.randn(2, 2, 8), qkv[:, 1:], torch.tensor([0, 1, 2]), torch.tensor([0, 5])
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ragged_half_inputs_run_the_float32_kernel(dtype: torch.dtype) -> None:
    """As the padded path: half inputs through the float32 kernel, cast back, gradients too."""
    require_fused()
    torch.manual_seed(0)
    x = (torch.randn(9, 3, 2, 8) * 2).to(dtype)
    offsets = torch.tensor([0, 4, 4, 9])
    half, full = x.clone().requires_grad_(), x.float().requires_grad_()
    y = attention_module.ragged_self_attention(half, offsets, relu=True)
    want = attention_module.ragged_self_attention(full, offsets, relu=True)
    assert y.dtype == dtype and torch.equal(y, want.to(dtype))
    g = torch.randn(y.shape).to(dtype)
    (got,) = torch.autograd.grad(y, half, g)
    (ref,) = torch.autograd.grad(want, full, g.float())
    assert got.dtype == dtype and torch.equal(got, ref.to(dtype))


def test_ragged_kernel_is_cpu_and_fused_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ragged path exists where the fused kernel runs; elsewhere callers pad (None)."""
    require_fused()
    x = torch.randn(3, 4)
    assert attention_module.ragged_kernel(x) is not None
    monkeypatch.setenv("SEQRANK_FUSED_ATTENTION", "0")
    assert attention_module.ragged_kernel(x) is None
    with pytest.raises(RuntimeError, match="needs the fused CPU kernel"):
        attention_module.ragged_self_attention(torch.randn(2, 3, 1, 8), torch.tensor([0, 2]))

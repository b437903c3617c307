"""Random valid batches for model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from seqrank.data.types import Batch, Schema
from tests.kernels import require_kernel


def make_batch(
    schema: Schema,
    B: int = 8,
    L: int = 10,
    seed: int = 0,
    *,
    lengths: torch.Tensor | None = None,
    max_gap_days: float = 1000.0,
) -> Batch:
    """A random valid left-padded `Batch`.

    History lengths are uniform in 0..L, with row 0 forced empty and row 1 forced full (when
    B >= 2); padded positions hold id 0, behaviour 0 and gap 0; gaps are int64 seconds >= 0 and
    shrink towards the most recent event (position L-1).

    Args:
        schema: sizes the id ranges (ids are drawn from 1..size-1).
        B: batch size.
        L: padded history length.
        seed: seed of a private generator (the global RNG is untouched).
        lengths: (B,) history lengths to use instead of random ones.
        max_gap_days: rough upper end of the gaps.
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        if B >= 2 and L >= 1:
            lengths[0], lengths[1] = 0, L
    mask = torch.arange(L)[None, :] >= (L - lengths)[:, None]  # (B, L), left-padded

    def ids(size: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(1, max(size, 2), shape, generator=g)

    hist_item = ids(schema.num_items, (B, L)) * mask
    hist_cate = ids(schema.num_cates, (B, L)) * mask
    hist_behavior = ids(schema.num_behaviors, (B, L)) * mask
    # increments from the target backwards in time: position L-1 is the most recent event
    steps = torch.rand(B, L, generator=g, dtype=torch.float64) ** 3 * (
        max_gap_days * 86400 / max(L, 1)
    )
    gaps = steps.flip(1).cumsum(1).flip(1).long()  # (B, L) non-increasing along L
    hist_gap = gaps * mask
    return Batch(
        user=ids(schema.num_users, (B,)),
        hist_item=hist_item,
        hist_cate=hist_cate,
        hist_behavior=hist_behavior,
        hist_gap=hist_gap,
        hist_mask=mask,
        target_item=ids(schema.num_items, (B,)),
        target_cate=ids(schema.num_cates, (B,)),
        label=torch.randint(0, 2, (B,), generator=g).float(),
        index=torch.arange(B),
    )


@pytest.fixture(name="make_batch")
def make_batch_fixture() -> Callable[..., Batch]:
    """The `make_batch` factory, as a fixture."""
    return make_batch


@pytest.fixture
def schema() -> Schema:
    """A small Amazon-like schema (one behaviour kind)."""
    return Schema(
        name="t",
        num_users=50,
        num_items=100,
        num_cates=10,
        num_behaviors=2,
        behavior_names=("review",),
        protocol="loo",
    )


@pytest.fixture
def taobao_schema() -> Schema:
    """A small Taobao-like schema (pv/cart/fav/buy)."""
    return Schema(
        name="tb",
        num_users=50,
        num_items=100,
        num_cates=10,
        num_behaviors=5,
        behavior_names=("pv", "cart", "fav", "buy"),
        protocol="time",
    )


def require_fused():  # noqa: ANN201
    """The fused C++ attention kernel (`tests/conftest.py: require_kernel`)."""
    return require_kernel("attention")


@pytest.fixture(params=["fused", "kernel", "plain ops"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through each CPU attention path: the fused C++ kernel, the Python kernel
    that walks heads (every size) or the plain ops over all heads (every size); by default the
    fused kernel, or where it is not built the size decides (`_tiny`)."""
    from seqrank.models.layers import attention

    if request.param == "fused":
        require_fused()
        monkeypatch.setattr(attention, "FUSED", True)
    else:
        monkeypatch.setattr(attention, "FUSED", False)
        monkeypatch.setattr(attention, "TINY_TOTAL", 0 if request.param == "kernel" else 1 << 62)
    return request.param

"""Length groups (seqrank.models.layers.ragged): the plan, the right-aligned first layer, and
BST / ATRank computing the same outputs and gradients with and without groups."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqrank import kernels
from seqrank.models.atrank import ATRank
from seqrank.models.bst import BST
from seqrank.models.layers.ragged import (
    batch_groups,
    history_spans,
    inverse_permutation,
    plan_groups,
    right_aligned_linear,
    sequence_offsets,
    whole_batch,
)
from tests.models.conftest import require_fused


def _cost(
    spans: np.ndarray, groups: list[tuple[np.ndarray, int]], group_cost: float, extra: int
) -> float:
    return sum(len(rows) * (length + extra) + group_cost for rows, length in groups)


def _brute_force(spans: np.ndarray, max_groups: int, group_cost: float, extra: int) -> float:
    """Cheapest split into at most max_groups runs of the sorted distinct lengths."""
    values = np.unique(spans)[::-1]
    best = float("inf")
    for g in range(1, min(max_groups, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), g - 1):
            bounds = (0, *cuts, len(values))
            cost = 0.0
            for i, j in itertools.pairwise(bounds):
                n = int(np.isin(spans, values[i:j]).sum())
                cost += n * (values[i] + extra) + group_cost
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_covers_every_row_once_and_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spans = np.minimum(rng.pareto(1.5, size=200).astype(np.int64) + 1, 30)
    for max_groups, group_cost, extra in ((1, 0, 0), (2, 10, 1), (3, 50, 0), (4, 5, 1)):
        groups = plan_groups(spans, max_groups, group_cost, extra)
        rows = np.concatenate([r for r, _ in groups])
        assert sorted(rows.tolist()) == list(range(len(spans)))  # each row exactly once
        assert len(groups) <= max_groups
        lengths = [length for _, length in groups]
        assert lengths == sorted(lengths, reverse=True)  # longest first
        for r, length in groups:
            assert (spans[r] <= length).all() and length == spans[r].max()
        assert _cost(spans, groups, group_cost, extra) == pytest.approx(
            _brute_force(spans, max_groups, group_cost, extra)
        )


def test_plan_extremes() -> None:
    spans = np.array([1, 1, 2, 5, 5, 9])
    assert [length for _, length in plan_groups(spans, 8, 0)] == [9, 5, 2, 1]  # free groups
    assert [length for _, length in plan_groups(spans, 8, 1e9)] == [9]  # one group
    assert plan_groups(np.array([3]), 4, 0)[0][1] == 3


def test_history_spans_cover_every_real_event() -> None:
    mask = torch.tensor(
        [[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool
    )
    assert history_spans(mask).tolist() == [2, 1, 4, 1, 4]


def test_inverse_permutation() -> None:
    order = torch.tensor([3, 0, 4, 1, 2])
    inv = inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(5)) and torch.equal(inv[order], torch.arange(5))


def test_right_aligned_linear_is_the_zero_padded_product() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    xs = [
        torch.randn(n, k, dtype=torch.float64, requires_grad=True)
        for n, k in ((3, 12), (4, 7), (2, 3))
    ]
    got = right_aligned_linear(xs, w, b)  # (9, 5)
    padded = torch.cat([F.pad(x, (12 - x.shape[1], 0)) for x in xs])  # zeros on the left
    torch.testing.assert_close(got, F.linear(padded, w, b), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda w, b, *xs: right_aligned_linear(list(xs), w, b), (w, b, *xs)
    )
    # columns no input reaches (narrower inputs only) get zero weight gradient
    right_aligned_linear(xs[1:], w, None).sum().backward()
    assert torch.all(w.grad[:, :5] == 0) and torch.all(w.grad[:, 5:] != 0)
    with pytest.raises(ValueError, match="exceeds"):
        right_aligned_linear([torch.randn(2, 13, dtype=torch.float64)], w, b)


def _skewed_lengths(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(B, generator=g) ** 4 * (L + 1)).long().clamp(max=L)  # mostly short
    lengths[:3] = torch.tensor([0, 1, L])
    return lengths


def _same_outputs_and_gradients(model, batch, **loss_kwargs) -> None:  # noqa: ANN001
    """The model with length groups (every split allowed: group_cost 0) against length_groups=0."""
    padded = copy.deepcopy(model)
    padded.length_groups = 0
    model.group_cost = 0
    assert batch_groups(batch, model.max_len, model.length_groups, 0) is not None  # really split
    weights = torch.arange(len(batch), dtype=torch.float64)
    for m in (model, padded):
        y = m(batch)
        loss = (y * weights).sum() + (m.regularization() if hasattr(m, "regularization") else 0)
        loss.backward()
        m.logits = y.detach()
    torch.testing.assert_close(model.logits, padded.logits, rtol=0, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), padded.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        got, want = (g.coalesce().to_dense() if g.is_sparse else g for g in (p.grad, q.grad))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pooling": "concat"},
        {"pooling": "concat", "use_user": True, "num_layers": 2},
        {"pooling": "mean", "use_user": True},
        {"pooling": "target"},
        {"pooling": "concat", "use_user": True, "sparse_embeddings": True},
    ],
)
def test_bst_groups_compute_the_padded_function(
    attention_path, taobao_schema, make_batch, kwargs
) -> None:
    torch.manual_seed(0)
    model = BST(
        taobao_schema,
        embed_dim=8,
        num_heads=2,
        max_len=10,
        mlp_dims=(32, 16),
        dropout=0.0,
        length_groups=3,
        **kwargs,
    ).double()
    batch = make_batch(taobao_schema, B=48, L=12, seed=3, lengths=_skewed_lengths(48, 12, 1))
    _same_outputs_and_gradients(model, batch)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"group_by": "behavior"}, {"time_mode": "add"}, {"use_actions": False, "num_layers": 2}],
)
def test_atrank_groups_compute_the_padded_function(
    attention_path, taobao_schema, make_batch, kwargs
) -> None:
    torch.manual_seed(0)
    model = ATRank(
        taobao_schema, embed_dim=8, num_heads=2, max_len=10, length_groups=4, **kwargs
    ).double()
    batch = make_batch(taobao_schema, B=48, L=12, seed=3, lengths=_skewed_lengths(48, 12, 2))
    _same_outputs_and_gradients(model, batch)


def _small(cls, schema):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    if cls is BST:
        return BST(
            schema,
            embed_dim=8,
            num_heads=2,
            max_len=10,
            mlp_dims=(32, 16),
            dropout=0.0,
            length_groups=4,
        )
    return ATRank(schema, embed_dim=8, num_heads=2, max_len=10, length_groups=4)


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_groups_skip_holes_and_empty_batches(
    attention_path, taobao_schema, make_batch, cls
) -> None:
    """Positions masked inside a history (holes) and batches whose histories are all empty give
    the padded path's outputs and gradients too (the groups' dense layers see valid tokens
    only)."""
    batch = make_batch(taobao_schema, B=48, L=12, seed=5, lengths=_skewed_lengths(48, 12, 3))
    draws = torch.rand(batch.hist_mask.shape, generator=torch.Generator().manual_seed(0))
    holes = batch.hist_mask & (draws < 0.3)
    holes[:, -1] = False  # keep each history's last event: spans stay as they were
    assert holes.any()
    with_holes = batch.replace(hist_mask=batch.hist_mask & ~holes)
    _same_outputs_and_gradients(_small(cls, taobao_schema).double(), with_holes)
    empty = make_batch(taobao_schema, B=16, L=12, seed=6, lengths=torch.zeros(16, dtype=torch.long))
    _same_outputs_and_gradients(_small(cls, taobao_schema).double(), empty)


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_groups_run_dense_layers_on_valid_tokens_only(taobao_schema, make_batch, cls) -> None:
    """The feed-forward of a grouped batch sees one row per valid token (BST: each behaviour
    and the target; ATRank: each behaviour), not one per group position (a group's sequences
    are padded to its longest)."""
    model = _small(cls, taobao_schema)
    model.group_cost = 0
    batch = make_batch(taobao_schema, B=48, L=12, seed=3, lengths=_skewed_lengths(48, 12, 2))
    groups, _ = batch_groups(batch, model.max_len, model.length_groups, 0, extra=int(cls is BST))
    positions = sum(sub.hist_item[:, -model.max_len :].numel() for sub, _ in groups)
    valid = int(batch.hist_mask[:, -model.max_len :].sum())
    if cls is BST:  # the target is a token of every sequence
        positions, valid = positions + len(batch), valid + len(batch)
    assert valid < positions
    ffn = model.encoder.layers[0].ffn[0] if cls is BST else model.self_blocks[0].ffn.inner
    rows = []
    hook = ffn.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    model(batch)
    hook.remove()
    assert rows == [valid]


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_default_groups_split_a_skewed_batch_and_not_a_full_one(schema, make_batch, cls) -> None:
    """With the default group cost, a large batch of mostly short histories is split, one of
    full histories is not (groups only where they pay)."""
    model = cls(schema, max_len=50)
    short = make_batch(schema, B=1024, L=50, seed=0, lengths=_skewed_lengths(1024, 50, 0))
    split = batch_groups(short, 50, model.length_groups, model.group_cost)
    assert split is not None and 2 <= len(split[0]) <= model.length_groups
    full = make_batch(schema, B=1024, L=50, seed=0, lengths=torch.full((1024,), 50))
    assert batch_groups(full, 50, model.length_groups, model.group_cost) is None


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_length_groups_must_be_non_negative(schema, cls) -> None:
    with pytest.raises(ValueError, match="length_groups"):
        cls(schema, length_groups=-1)


def test_right_aligned_linear_computes_in_the_autocast_dtype() -> None:
    """Like nn.Linear under autocast (its out= products would otherwise stay in float32)."""
    w = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = right_aligned_linear([x], w, None)
        assert y.dtype == F.linear(x, w[:, 1:]).dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == x.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), x @ w[:, 1:].T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_groups_under_bf16_autocast_match_the_padded_path(
    attention_path, schema, make_batch, cls
) -> None:
    torch.manual_seed(0)
    model = cls(schema, embed_dim=8, num_heads=2, max_len=10, length_groups=3).eval()
    model.group_cost = 0
    padded = copy.deepcopy(model)
    padded.length_groups = 0
    batch = make_batch(schema, B=48, L=12, seed=3, lengths=_skewed_lengths(48, 12, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(batch), padded(batch)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_sequence_offsets_follow_the_valid_tokens_group_after_group() -> None:
    masks = [
        torch.tensor([[False, True, True], [True, False, True]]),
        torch.tensor([[False], [True]]),
    ]
    assert sequence_offsets(masks).tolist() == [0, 2, 4, 4, 5]


def test_whole_batch_cuts_to_the_longest_history_without_gathering_rows(schema, make_batch) -> None:
    batch = make_batch(schema, B=8, L=12, seed=0, lengths=torch.tensor([0, 3, 7, 1, 2, 7, 5, 0]))
    groups, order = whole_batch(batch, max_len=10)
    assert order is None and len(groups) == 1
    sub, length = groups[0]
    assert length == 7 and sub.hist_item.shape == (8, 7)
    assert torch.equal(sub.hist_mask, batch.hist_mask[:, -7:]) and torch.equal(sub.user, batch.user)
    assert int(sub.hist_mask.sum()) == int(batch.hist_mask.sum())  # every event kept
    assert whole_batch(batch, max_len=0) is None  # no history positions


class _CountingKernel:
    """The fused attention kernel, counting its entry points' calls."""

    def __init__(self, ext) -> None:  # noqa: ANN001
        self.ext, self.calls = ext, []

    def __getattr__(self, name: str):  # noqa: ANN204
        fn = getattr(self.ext, name)
        return lambda *args: self.calls.append(name) or fn(*args)


@pytest.mark.parametrize("cls", [BST, ATRank])
def test_cpu_groups_attend_over_ragged_sequences(monkeypatch, schema, make_batch, cls) -> None:
    """With the fused kernel, grouped batches run each attention as one ragged kernel call over
    the valid tokens (no padded call); ATRank as one group (`whole_batch`)."""
    ext = require_fused()
    counting = _CountingKernel(ext)
    monkeypatch.setitem(kernels._state, "attention", counting)
    model = _small(cls, schema)
    model.group_cost = 0
    batch = make_batch(schema, B=48, L=12, seed=3, lengths=_skewed_lengths(48, 12, 2))
    model(batch).sum().backward()
    blocks = 1 if cls is BST else len(model.self_blocks) + len(model.target_blocks)
    assert counting.calls == ["forward_ragged"] * blocks + ["backward_ragged"] * blocks
    if cls is ATRank:
        seen = []
        monkeypatch.setattr(
            model, "forward_groups", lambda b, groups, order: seen.append(len(groups)) or 0
        )
        model(batch)
        assert seen == [1]

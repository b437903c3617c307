"""Length groups: run a batch of left-padded histories without computing on the padding.

A batch is padded to its longest history (or to `max_len`), so with real length distributions
most of a step's FLOPs go to positions that are masked out and whose outputs are thrown away:
on Electronics-like data (5-core, mean 8.8 events per user) a batch at `max_len=50` is mostly
padding. Both models compute each sample independently of the others and ignore padded
positions exactly (masked keys, zeroed outputs), so a batch can be split into groups of
samples with similar history lengths, each cut to its own longest history, without changing
any output or gradient: `plan_groups` picks the groups, `take` cuts them out, and
`RightAlignedLinear` is BST's first MLP layer over inputs of different widths (the flattened
outputs of groups of different lengths).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from seqrank.data.types import Batch

# fields of a Batch with a history axis (B, L); the others are (B,) or None
HISTORY_FIELDS = ("hist_item", "hist_cate", "hist_behavior", "hist_gap", "hist_mask")


def history_spans(mask: Tensor) -> Tensor:
    """How many trailing positions of each row cover all its valid positions (at least 1).

    Args:
        mask: (B, L) bool, True at real events (left-padded: usually the last ones).

    Returns:
        (B,) int64: L minus the index of the first real event; 1 for a row without events.
    """
    L = mask.shape[1]
    first = mask.to(torch.uint8).argmax(dim=1)  # (B,) first True (0 when none)
    has = mask.any(dim=1)
    return torch.where(has, L - first, 1)  # (B,)


def plan_groups(
    spans: np.ndarray, max_groups: int, group_cost: float, extra: int = 0
) -> list[tuple[np.ndarray, int]]:
    """Split a batch into at most `max_groups` groups of similar history length.

    The cost of a group is its samples times its length (plus `extra` tokens per sample, e.g.
    BST's target token), plus `group_cost` for running it at all (per-op overhead, in the same
    token units); the split minimises the total, exactly, by dynamic programming over the
    distinct lengths (sorted, a group is a run of them).

    Args:
        spans: (B,) history spans (`history_spans`), >= 1.
        max_groups: the most groups (>= 1).
        group_cost: cost of one more group, in tokens.
        extra: tokens per sample that every group pays regardless of length.

    Returns:
        [(rows, length)] longest first: the row indices of each group (int64, ascending) and the
        length its histories are cut to; every row is in exactly one group.
    """
    values, counts = np.unique(spans, return_counts=True)  # ascending distinct lengths
    values, counts = values[::-1], counts[::-1]  # longest first
    m = len(values)
    before = np.concatenate([[0], np.cumsum(counts)])  # samples in values[:i]
    # cost[i, j]: one group of values[i..j] (all cut to values[i]); inf below the diagonal
    n = before[None, 1:] - before[:-1, None]  # (m, m) samples in values[i..j]
    cost = np.where(n > 0, n * (values[:, None] + extra) + group_cost, np.inf)
    cost[np.tril_indices(m, -1)] = np.inf
    best = cost[0].copy()  # best[j]: values[0..j] in one group
    choice = [np.zeros(m, dtype=np.int64)]  # start of the last group, per (groups, j)
    for _ in range(1, min(max_groups, m)):
        # values[0..i-1] in g groups, then one group values[i..j]
        total = np.full((m, m), np.inf)
        total[1:] = best[:-1, None] + cost[1:]
        total[0] = cost[0]
        start = total.argmin(axis=0)
        choice.append(start)
        best = total[start, np.arange(m)]
    # walk back from the last distinct length with the best group count
    j, g, bounds = m - 1, len(choice) - 1, []
    while j >= 0:
        i = int(choice[g][j])
        bounds.append((i, j))
        j, g = i - 1, g - 1
    groups = []
    for i, j in reversed(bounds):
        rows = np.flatnonzero((spans <= values[i]) & (spans >= values[j]))
        groups.append((rows.astype(np.int64), int(values[i])))
    return groups


def take(batch: Batch, rows: Tensor, length: int) -> Batch:
    """The samples `rows` of a batch, histories cut to their last `length` positions.

    Args:
        batch: a left-padded `Batch` (B, L).
        rows: (n,) int64 row indices.
        length: 1 <= length <= L.

    Returns:
        a `Batch` of n samples with (n, length) histories.
    """
    changes = {}
    for name in ("user", "target_item", "target_cate", "label", "index", "pos"):
        value = getattr(batch, name)
        changes[name] = None if value is None else value[rows]
    for name in HISTORY_FIELDS:
        changes[name] = getattr(batch, name)[rows, -length:]
    return batch.replace(**changes)


def batch_groups(
    batch: Batch, max_len: int, max_groups: int, group_cost: float, extra: int = 0
) -> tuple[list[tuple[Batch, int]], Tensor] | None:
    """The batch as length groups, or None when one group at full length is the plan.

    Args:
        batch: a left-padded `Batch`.
        max_len: the model's longest history (histories are cut to it first).
        max_groups, group_cost, extra: as in `plan_groups`.

    Returns:
        ([(group batch, length)], order): order (B,) int64 lists the original rows group after
        group, so outputs concatenated in group order `y` are `y[inverse(order)]` in batch
        order; or None if splitting saves nothing.
    """
    mask = batch.hist_mask[:, -max_len:]
    if mask.shape[1] == 0:  # no history positions at all: nothing to cut
        return None
    spans = history_spans(mask).cpu().numpy()
    plan = plan_groups(spans, max_groups, group_cost, extra)
    if len(plan) == 1 and plan[0][1] == mask.shape[1]:
        return None
    device = batch.hist_mask.device
    groups, order = [], []
    for rows, length in plan:
        index = torch.from_numpy(rows).to(device)
        groups.append((take(batch, index, length), length))
        order.append(index)
    return groups, torch.cat(order)


def whole_batch(batch: Batch, max_len: int) -> tuple[list[tuple[Batch, int]], None] | None:
    """The batch as one length group, cut to its longest history (no rows gathered): for a
    model whose every layer skips the padding once its tokens are the valid ones alone (ATRank
    with the ragged attention kernel), where more groups would only add op calls.

    Returns:
        ([(batch cut to length L, L)], None) (None: the rows keep their order), or None when
        the batch has no history positions.
    """
    width = min(batch.hist_mask.shape[1], max_len)
    if width == 0:
        return None
    length = int(history_spans(batch.hist_mask[:, -width:]).max())
    cut = {name: getattr(batch, name)[:, -length:] for name in HISTORY_FIELDS}
    return [(batch.replace(**cut), length)], None


def real_positions(masks: list[Tensor]) -> Tensor | None:
    """Where the real (unmasked) positions of length groups sit among their T positions.

    Args:
        masks: per group, its (n, L) bool mask; T = the sum of their sizes.

    Returns:
        (R,) int64 positions in order (group after group, row-major), or None when every
        position is real (nothing to leave out).
    """
    valid = torch.cat([m.reshape(-1) for m in masks])  # (T,)
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


def sequence_offsets(masks: list[Tensor]) -> Tensor:
    """Where each sequence's valid tokens start among the valid tokens of length groups, laid
    out as `real_positions` lists them (group after group, row-major): the offsets the ragged
    attention kernel takes (`layers.attention.ragged_self_attention`).

    Args:
        masks: per group, its (n, L) bool mask; B = the sum of the n.

    Returns:
        (B + 1,) int64: 0, then the running count of valid tokens after each sequence.
    """
    counts = torch.cat([m.sum(dim=1) for m in masks])  # (B,)
    offsets = counts.new_zeros(len(counts) + 1)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def to_positions(rows: Tensor, real: Tensor | None, total: int) -> Tensor:
    """Rows computed for the real positions only, laid out at all `total` positions of the
    length groups, zero at the padding (for the per-group attention, which masks the padding,
    and for outputs that must be zero there).

    Args:
        rows: (R, C) one row per real position; real: (R,) their positions
            (`real_positions`), or None (rows are already (total, C)).

    Returns:
        (total, C).
    """
    if real is None:
        return rows
    # index_copy, not a gather from a padded copy: its backward reads only the real rows
    return rows.new_zeros(total, rows.shape[1]).index_copy(0, real, rows)  # (total, C)


def inverse_permutation(order: Tensor) -> Tensor:
    """(B,) int64 `inv` with inv[order[i]] = i."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return inv


class RightAlignedLinear(torch.autograd.Function):
    """y_g = x_g W[:, -k_g:]^T + b for inputs x_g of different widths k_g, one output.

    The inputs are the right-hand columns of one wide input whose other columns are zero
    (BST's flattened sequence, left-padded, of groups of different lengths): the same outputs
    and gradients as the full product, without its FLOPs on the zeros. The weight gradient is
    accumulated in place into one (out, in) tensor (slicing the weight under autograd would
    materialise a full-size zero gradient per group). Columns no input reaches get zero
    gradient, as they would from zero inputs.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, *xs: Tensor) -> Tensor:  # noqa: ANN001
        # the dtype nn.Linear would compute in (autocast does not reach the out= products below)
        device = xs[0].device.type
        dtype = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs[0].dtype
        )
        xs = tuple(x.to(dtype) for x in xs)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        out = xs[0].new_empty(sum(len(x) for x in xs), weight.shape[0])  # (N, out)
        r = 0
        for x in xs:
            w_x = w[:, w.shape[1] - x.shape[1] :]  # (out, k)
            if b is None:
                torch.mm(x, w_x.t(), out=out[r : r + len(x)])
            else:
                torch.addmm(b, x, w_x.t(), out=out[r : r + len(x)])
            r += len(x)
        ctx.save_for_backward(w, *xs)
        ctx.has_bias, ctx.weight_dtype = bias is not None, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        w, *xs = ctx.saved_tensors
        grad = grad.to(w.dtype)
        K = w.shape[1]
        dw = db = None
        if ctx.needs_input_grad[0]:
            # the widest input writes its columns, the others add to theirs; only the columns
            # left of the widest are zeroed (a full zero fill is a pass over the whole weight)
            widest = max(range(len(xs)), key=lambda i: xs[i].shape[1])
            k_max = xs[widest].shape[1]
            dw = w.new_empty(w.shape)  # (out, K)
            dw[:, : K - k_max].zero_()
            starts = np.cumsum([0, *(len(x) for x in xs)])
            for i in (widest, *(i for i in range(len(xs)) if i != widest)):
                g, x = grad[starts[i] : starts[i + 1]], xs[i]
                beta = 0.0 if i == widest else 1.0
                dw[:, K - x.shape[1] :].addmm_(g.t(), x, beta=beta)  # (out, k)
            dw = dw.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = grad.sum(0).to(ctx.weight_dtype)
        dxs, r = [], 0
        for i, x in enumerate(xs):
            g = grad[r : r + len(x)]
            r += len(x)
            dxs.append(g @ w[:, K - x.shape[1] :] if ctx.needs_input_grad[2 + i] else None)
        return (dw, db, *dxs)


def right_aligned_linear(xs: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
    """`RightAlignedLinear`: (n_g, k_g) inputs -> (sum n_g, out) outputs, in input order."""
    for x in xs:
        if x.shape[1] > weight.shape[1]:
            raise ValueError(f"input width {x.shape[1]} exceeds the layer's {weight.shape[1]}")
    return RightAlignedLinear.apply(weight, bias, *xs)

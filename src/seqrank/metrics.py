"""Ranking metrics for (user, candidate) click-through style recommenders.

The models in this project score ``(user, candidate)`` samples. Evaluation
samples come in *(positive, negative) pairs*: every positive item at a user's
sequence position ``pos`` is accompanied by one sampled negative item at the
same ``(user, pos)``. Three ranking views of the same scores are reported:

* :func:`auc` -- global ROC AUC over all samples (Mann-Whitney U statistic with
  average ranks, i.e. ties count 1/2).
* :func:`gauc` -- *group AUC* from the DIN paper (Zhou et al., "Deep Interest
  Network for Click-Through Rate Prediction", KDD 2018, arXiv:1706.06978):
  the AUC of every user computed on that user's samples only, averaged with the
  user's number of samples (impressions) as weight. Users whose samples are all
  of one class have no AUC and are excluded. Global AUC mixes users whose score
  scales differ; GAUC measures the intra-user ordering that a recommender is
  actually used for.
* :func:`pairwise_auc` -- the metric of ATRank (Zhou et al., "ATRank: An
  Attention-Based User Behavior Modeling Framework for Recommendation", AAAI
  2018, arXiv:1711.06632): samples are grouped by ``(user, pos)``; each group's
  value is the fraction of its (positive, negative) combinations ordered
  correctly (ties 1/2), and the result is the unweighted mean over groups that
  contain both classes. With one positive and one negative per group this is
  the fraction of correctly ordered pairs.

:func:`logloss` (binary cross-entropy on logits) completes the set.

The functions are plain numpy and fully vectorised (one ``np.lexsort`` plus
``np.add.reduceat`` segment sums, no per-user Python loop), so they evaluate
10M samples in seconds. They are the reference definitions that the tests pin
down. :class:`RankingMetrics` is a :class:`torchmetrics.Metric` that gathers
the raw per-sample tensors (also across DDP ranks), de-duplicates them by each
sample's global index -- a ``DistributedSampler`` pads the last batch by
repeating samples, and every sample must count exactly once -- and then calls
the numpy definitions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "METRIC_NAMES",
    "RankingMetrics",
    "auc",
    "gauc",
    "logloss",
    "pairwise_auc",
]

#: Keys of the dict returned by :meth:`RankingMetrics.compute` (besides ``num_samples``).
METRIC_NAMES: tuple[str, ...] = ("auc", "gauc", "pairwise_auc", "logloss")


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
def _as_1d(name: str, values: Any) -> np.ndarray:
    """Converts ``values`` to a numpy array and checks that it is 1-D.

    Args:
        name: Argument name used in error messages.
        values: Array-like input.

    Returns:
        The input as a 1-D numpy array (no copy when already an array).

    Raises:
        ValueError: If the input is not 1-D.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _validate(
    scores: Any, labels: Any, **groups: Any
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Validates and converts the common inputs of the metric functions.

    Args:
        scores: Real-valued scores (any real dtype), must not contain NaN.
        labels: Binary labels, values in {0, 1} (bool, int or float dtype).
        **groups: Further per-sample 1-D arrays (e.g. ``users``, ``pos``) that
            must have the same length as ``scores``.

    Returns:
        ``(scores as float64, labels as int64, groups as arrays)``.

    Raises:
        ValueError: On a wrong shape, length, dtype or value, naming the argument.
    """
    s = _as_1d("scores", scores)
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores must have a real numeric dtype, got {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN")
    n = s.shape[0]

    y = _as_1d("labels", labels)
    if y.shape[0] != n:
        raise ValueError(f"labels must have the same length as scores ({n}), got {y.shape[0]}")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be binary with values in {{0, 1}}, got dtype {y.dtype}")
    is_binary = (y == 0) | (y == 1)
    if not is_binary.all():
        bad = np.unique(y[~is_binary])[:5]
        raise ValueError(f"labels must be binary with values in {{0, 1}}, got {bad.tolist()}")
    y = y.astype(np.int64, copy=False)

    out: dict[str, np.ndarray] = {}
    for name, values in groups.items():
        g = _as_1d(name, values)
        if g.shape[0] != n:
            raise ValueError(f"{name} must have the same length as scores ({n}), got {g.shape[0]}")
        out[name] = g
    return s, y, out


# --------------------------------------------------------------------------- #
# Core: per-group Mann-Whitney statistic, vectorised
# --------------------------------------------------------------------------- #
_INT64_MAX = int(np.iinfo(np.int64).max)


def _key_codes(key: np.ndarray) -> tuple[np.ndarray, int]:
    """Maps a group key to order-preserving int64 codes in ``[0, span)``.

    Integer keys with a range no larger than the number of samples are just
    shifted (no sort needed); anything else is factorised with ``np.unique``.

    Args:
        key: 1-D group key of any sortable dtype, non-empty.

    Returns:
        ``(codes, span)``: equal keys get equal codes, and codes are ordered
        like the keys.
    """
    n = key.shape[0]
    if key.dtype.kind in "biu":
        lo, hi = int(key.min()), int(key.max())
        if hi - lo < n:
            if key.dtype.kind == "u":  # subtract in the unsigned dtype: no overflow
                shifted = (key - key.dtype.type(lo)).astype(np.int64)
            else:
                shifted = key.astype(np.int64) - lo
            return shifted, hi - lo + 1
    uniq, inverse = np.unique(key, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False), int(uniq.shape[0])


def _group_codes(keys: tuple[np.ndarray, ...]) -> tuple[np.ndarray, int]:
    """Combines several group keys into one order-preserving int64 code.

    The order is lexicographic: ``keys[0]`` first.

    Args:
        keys: Non-empty tuple of 1-D keys of equal, non-zero length.

    Returns:
        ``(codes, span)`` with codes in ``[0, span)``.
    """
    code, span = _key_codes(keys[0])
    for key in keys[1:]:
        c, s = _key_codes(key)
        if span * s > _INT64_MAX:
            code, span = _key_codes(code)  # compact to <= n distinct values
        code = code * s + c
        span *= s
    return code, span


def _sort_groups_and_ties(
    scores: np.ndarray, keys: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorts samples by ``(*keys, score)`` and marks group and tie-block starts.

    Instead of a slow multi-key ``np.lexsort``, scores are replaced by their
    dense rank and the group keys by an int64 code, so that a single integer
    ``np.argsort`` suffices.

    Args:
        scores: float64 scores, shape ``(n,)`` with ``n > 0``, no NaN.
        keys: Group keys; empty for one global group.

    Returns:
        ``(order, group_start, tie_start)``: the sorting permutation and two
        boolean masks over the sorted samples marking the first sample of each
        group and of each block of equal ``(group, score)``.
    """
    n = scores.shape[0]
    order = np.argsort(scores)
    new_score = np.empty(n, dtype=bool)
    new_score[0] = True
    s = scores[order]
    np.not_equal(s[1:], s[:-1], out=new_score[1:])
    group_start = np.zeros(n, dtype=bool)
    group_start[0] = True
    if not keys:
        return order, group_start, new_score

    dense = np.cumsum(new_score, dtype=np.int64) - 1
    rank = np.empty(n, dtype=np.int64)
    rank[order] = dense
    n_rank = int(dense[-1]) + 1
    code, span = _group_codes(keys)
    if span * n_rank > _INT64_MAX:
        code, span = _key_codes(code)  # span <= n, so span * n_rank <= n**2 fits
    combined = code * n_rank + rank
    order = np.argsort(combined)
    k = combined[order]
    g = k // n_rank
    group_start[1:] = g[1:] != g[:-1]
    tie_start = np.empty(n, dtype=bool)
    tie_start[0] = True
    np.not_equal(k[1:], k[:-1], out=tie_start[1:])
    return order, group_start, tie_start


def _grouped_auc_counts(
    scores: np.ndarray, labels: np.ndarray, keys: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Computes the AUC numerator and class counts of every group at once.

    Samples are sorted by ``(*keys, score)``. Within a group, each block of
    tied scores contributes ``pos_block * (2 * neg_below + neg_block)`` to
    twice the Mann-Whitney statistic, where ``neg_below`` is the number of the
    group's negatives with a strictly smaller score. Integer arithmetic keeps
    the result exact.

    Args:
        scores: float64 scores, shape ``(n,)`` with ``n > 0``, no NaN.
        labels: int64 labels in {0, 1}, shape ``(n,)``.
        keys: Group keys (shape ``(n,)`` each); empty for one global group.

    Returns:
        ``(twice_u, n_pos, n_neg)``, one entry per group (int64 arrays), where
        the group's AUC is ``twice_u / (2 * n_pos * n_neg)``.
    """
    n = scores.shape[0]
    order, group_start, tie_start = _sort_groups_and_ties(scores, keys)
    y = labels[order]

    tie_idx = np.flatnonzero(tie_start)
    pos_t = np.add.reduceat(y, tie_idx)
    cnt_t = np.diff(np.append(tie_idx, n))
    neg_t = cnt_t - pos_t

    # Tie blocks that open a group, and the group of every tie block.
    group_first_tie = np.flatnonzero(group_start[tie_idx])
    group_of_tie = np.cumsum(group_start[tie_idx]) - 1
    neg_before = np.cumsum(neg_t) - neg_t  # negatives in earlier blocks (any group)
    neg_below = neg_before - neg_before[group_first_tie][group_of_tie]

    twice_u = np.add.reduceat(pos_t * (2 * neg_below + neg_t), group_first_tie)
    n_pos = np.add.reduceat(pos_t, group_first_tie)
    n_neg = np.add.reduceat(neg_t, group_first_tie)
    return twice_u, n_pos, n_neg


def _group_aucs(
    scores: np.ndarray, labels: np.ndarray, keys: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the AUC and size of every group that contains both classes.

    Args:
        scores: float64 scores.
        labels: int64 labels in {0, 1}.
        keys: Group keys; empty for one global group.

    Returns:
        ``(aucs, sizes)`` for the qualifying groups (float64, int64).
    """
    if scores.shape[0] == 0:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    twice_u, n_pos, n_neg = _grouped_auc_counts(scores, labels, keys)
    ok = (n_pos > 0) & (n_neg > 0)
    twice_u, n_pos, n_neg = twice_u[ok], n_pos[ok], n_neg[ok]
    aucs = twice_u / (2.0 * n_pos.astype(np.float64) * n_neg.astype(np.float64))
    return aucs, n_pos + n_neg


# --------------------------------------------------------------------------- #
# Public functional definitions
# --------------------------------------------------------------------------- #
def auc(scores: Any, labels: Any) -> float:
    """Global ROC AUC with ties counted 1/2.

    Equals ``P(s+ > s-) + 0.5 * P(s+ == s-)`` over all (positive, negative)
    combinations, computed as the Mann-Whitney U statistic with average ranks.

    Args:
        scores: 1-D real scores (logits or probabilities; only the order matters).
        labels: 1-D binary labels in {0, 1}.

    Returns:
        The AUC, or NaN if the labels contain only one class (or are empty).

    Raises:
        ValueError: If an input is not 1-D, lengths differ, ``labels`` is not
            binary or ``scores`` contains NaN.
    """
    s, y, _ = _validate(scores, labels)
    aucs, _ = _group_aucs(s, y, ())
    return float(aucs[0]) if aucs.size else float("nan")


def gauc(scores: Any, labels: Any, users: Any) -> float:
    """Group AUC of DIN (Zhou et al., KDD 2018): impression-weighted per-user AUC.

    ``sum_u n_u * AUC_u / sum_u n_u`` over users ``u`` that have both positive
    and negative samples, where ``n_u`` is the user's number of samples and
    ``AUC_u`` is computed on that user's samples only (ties count 1/2).

    Args:
        scores: 1-D real scores.
        labels: 1-D binary labels in {0, 1}.
        users: 1-D user ids (any sortable dtype).

    Returns:
        The group AUC, or NaN if no user has samples of both classes.

    Raises:
        ValueError: If an input is not 1-D, lengths differ, ``labels`` is not
            binary or ``scores`` contains NaN.
    """
    s, y, g = _validate(scores, labels, users=users)
    aucs, sizes = _group_aucs(s, y, (g["users"],))
    if aucs.size == 0:
        return float("nan")
    w = sizes.astype(np.float64)
    return float(np.dot(w, aucs) / w.sum())


def pairwise_auc(scores: Any, labels: Any, users: Any, pos: Any) -> float:
    """ATRank's pairwise AUC (arXiv:1711.06632): mean per-(user, pos) ordering accuracy.

    Samples are grouped by ``(user, pos)``. A group's value is the mean over its
    (positive, negative) combinations of ``1[s+ > s-] + 0.5 * 1[s+ == s-]``; the
    result is the unweighted mean over groups that contain at least one positive
    and one negative. With exactly one positive and one negative per group this
    is the fraction of correctly ordered pairs.

    Args:
        scores: 1-D real scores.
        labels: 1-D binary labels in {0, 1}.
        users: 1-D user ids (any sortable dtype).
        pos: 1-D positions of the target in the user's sequence.

    Returns:
        The pairwise AUC, or NaN if no group contains both classes.

    Raises:
        ValueError: If an input is not 1-D, lengths differ, ``labels`` is not
            binary or ``scores`` contains NaN.
    """
    s, y, g = _validate(scores, labels, users=users, pos=pos)
    aucs, _ = _group_aucs(s, y, (g["users"], g["pos"]))
    return float(aucs.mean()) if aucs.size else float("nan")


def logloss(scores: Any, labels: Any) -> float:
    """Mean binary cross-entropy of labels given logits.

    Uses ``-log(sigmoid(x)) = logaddexp(0, -x)`` and
    ``-log(1 - sigmoid(x)) = logaddexp(0, x)``, which are exact and finite for
    all finite logits (no probability clipping).

    Args:
        scores: 1-D LOGITS (pre-sigmoid scores).
        labels: 1-D binary labels in {0, 1}.

    Returns:
        The mean log loss (natural log), or NaN for empty inputs.

    Raises:
        ValueError: If an input is not 1-D, lengths differ, ``labels`` is not
            binary or ``scores`` contains NaN.
    """
    s, y, _ = _validate(scores, labels)
    if s.size == 0:
        return float("nan")
    losses = np.logaddexp(0.0, np.where(y == 1, -s, s))
    return float(losses.mean())


# --------------------------------------------------------------------------- #
# torchmetrics wrapper
# --------------------------------------------------------------------------- #
class RankingMetrics(Metric):
    """Accumulates per-sample predictions and computes the ranking metrics.

    Every :meth:`update` appends the batch's raw tensors to list states that are
    concatenated across processes (``dist_reduce_fx="cat"``). :meth:`compute`
    moves everything to numpy, keeps only the first occurrence of each global
    sample ``index`` (so that samples repeated by ``DistributedSampler``
    padding, or seen twice for any other reason, count exactly once) and
    evaluates :func:`auc`, :func:`gauc`, :func:`pairwise_auc` and
    :func:`logloss`.

    ``higher_is_better`` is ``True`` because the headline metrics are AUCs;
    note that the ``logloss`` entry is lower-is-better.

    Example:
        >>> metric = RankingMetrics()
        >>> metric.update(
        ...     scores=torch.tensor([2.0, -1.0]),
        ...     labels=torch.tensor([1, 0]),
        ...     users=torch.tensor([7, 7]),
        ...     pos=torch.tensor([3, 3]),
        ...     index=torch.tensor([0, 1]),
        ... )
        >>> float(metric.compute()["pairwise_auc"])
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    labels: list[Tensor]
    users: list[Tensor]
    pos: list[Tensor]
    index: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        """Initialises the list states.

        Args:
            **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g.
                ``sync_on_compute``, ``process_group``).
        """
        super().__init__(**kwargs)
        for name in ("scores", "labels", "users", "pos", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(  # type: ignore[override]
        self, scores: Tensor, labels: Tensor, users: Tensor, pos: Tensor, index: Tensor
    ) -> None:
        """Appends one batch.

        Args:
            scores: 1-D logits, any floating dtype (float16/bfloat16 allowed).
            labels: 1-D binary labels in {0, 1}.
            users: 1-D integer user ids.
            pos: 1-D integer positions of the target in the user's sequence.
            index: 1-D integer global index of each sample within its split.

        Raises:
            ValueError: If an input is not 1-D or the lengths differ.
        """
        batch = {"scores": scores, "labels": labels, "users": users, "pos": pos, "index": index}
        n = scores.shape[0] if scores.ndim == 1 else -1
        for name, value in batch.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(value.shape)}")
            if value.shape[0] != n:
                raise ValueError(
                    f"{name} must have the same length as scores ({n}), got {value.shape[0]}"
                )
        self.scores.append(scores.detach())
        self.labels.append(labels.detach())
        self.users.append(users.detach().long())
        self.pos.append(pos.detach().long())
        self.index.append(index.detach().long())

    def _result_tensor(self, value: float) -> Tensor:
        """Wraps a Python float as a scalar float tensor on the metric's device."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.tensor(value, dtype=dtype, device=self.device)

    def compute(self) -> dict[str, Tensor]:
        """Computes the metrics over all de-duplicated samples seen so far.

        Returns:
            Dict with scalar float tensors ``auc``, ``gauc``, ``pairwise_auc``,
            ``logloss`` (NaN where undefined, e.g. without any update) and
            ``num_samples`` (number of distinct samples after de-duplication).
        """
        nan = float("nan")
        results: dict[str, float] = dict.fromkeys(METRIC_NAMES, nan)
        results["num_samples"] = 0.0

        if isinstance(self.scores, Tensor) or len(self.scores) > 0:
            # torch.cat promotes mixed dtypes losslessly (e.g. fp16 + bf16 -> fp32).
            s = dim_zero_cat(self.scores).to(torch.float64)
            y = dim_zero_cat(self.labels).to(torch.float64)  # validated as {0, 1} below
            u = dim_zero_cat(self.users)
            p = dim_zero_cat(self.pos)
            idx_np = dim_zero_cat(self.index).cpu().numpy()
            # np.unique gives the position of the FIRST occurrence of each distinct
            # index, ordered by index: a canonical sample order, so results are
            # bit-identical whatever the batching, world size or padding.
            _, keep = np.unique(idx_np, return_index=True)
            s_np = s.cpu().numpy()[keep]
            y_np = y.cpu().numpy()[keep]
            u_np = u.cpu().numpy()[keep]
            p_np = p.cpu().numpy()[keep]
            results["num_samples"] = float(keep.size)

            if np.isnan(s_np).any():
                rank_zero_warn("RankingMetrics: scores contain NaN; all metrics are set to NaN.")
            elif keep.size > 0:
                results["auc"] = auc(s_np, y_np)
                results["gauc"] = gauc(s_np, y_np, u_np)
                results["pairwise_auc"] = pairwise_auc(s_np, y_np, u_np, p_np)
                results["logloss"] = logloss(s_np, y_np)

        return {k: self._result_tensor(v) for k, v in results.items()}

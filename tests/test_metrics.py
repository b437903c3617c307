"""Tests for seqrank.metrics: reference definitions and the torchmetrics wrapper."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqrank.metrics import RankingMetrics, auc, gauc, logloss, pairwise_auc


# --------------------------------------------------------------------------- #
# Brute-force references (loops; small inputs only)
# --------------------------------------------------------------------------- #
def _pair_value(sp: float, sn: float) -> float:
    return 1.0 if sp > sn else (0.5 if sp == sn else 0.0)


def _brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    return sum(_pair_value(a, b) for a in pos for b in neg) / (len(pos) * len(neg))


def _brute_gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        a = _brute_auc(scores[m], labels[m])
        if not math.isnan(a):
            num += m.sum() * a
            den += m.sum()
    return num / den if den else math.nan


def _brute_pairwise(
    scores: np.ndarray, labels: np.ndarray, users: np.ndarray, pos: np.ndarray
) -> float:
    vals = []
    for u, p in {(int(u), int(p)) for u, p in zip(users, pos, strict=True)}:
        m = (users == u) & (pos == p)
        a = _brute_auc(scores[m], labels[m])
        if not math.isnan(a):
            vals.append(a)
    return float(np.mean(vals)) if vals else math.nan


def _paired_data(seed: int, n_users: int = 15, max_pos: int = 6) -> dict[str, np.ndarray]:
    """(positive, negative) pairs per (user, pos); scores rounded to create ties."""
    rng = np.random.default_rng(seed)
    users, pos, labels = [], [], []
    for u in range(n_users):
        for p in range(int(rng.integers(1, max_pos + 1))):
            users += [u, u]
            pos += [p, p]
            labels += [1, 0]
    n = len(labels)
    labels_a = np.array(labels)
    scores = np.round(rng.normal(size=n) + 0.7 * labels_a, 1)
    perm = rng.permutation(n)
    return {
        "scores": scores[perm],
        "labels": labels_a[perm],
        "users": np.array(users)[perm],
        "pos": np.array(pos)[perm],
    }


# --------------------------------------------------------------------------- #
# auc
# --------------------------------------------------------------------------- #
def test_auc_hand_example() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered correctly.
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(3 / 4)


def test_auc_hand_example_with_ties() -> None:
    # positives 0.5, 0.9, 0.5; negatives 0.5, 0.2.
    # pairs: (.5,.5)=1/2 (.5,.2)=1 (.9,.5)=1 (.9,.2)=1 (.5,.5)=1/2 (.5,.2)=1 -> 5/6
    assert auc([0.5, 0.5, 0.2, 0.9, 0.5], [1, 0, 0, 1, 1]) == pytest.approx(5 / 6)
    assert auc([3.0, 3.0, 3.0, 3.0], [1, 0, 1, 0]) == pytest.approx(1 / 2)
    assert auc([0.0, 1.0], [1, 0]) == 0.0


def test_auc_single_class_or_empty_is_nan() -> None:
    assert math.isnan(auc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(auc([0.1, 0.2, 0.3], [0, 0, 0]))
    assert math.isnan(auc([], []))


def test_auc_matches_bruteforce_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 300
        labels = rng.integers(0, 2, size=n)
        scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)  # many ties
        assert auc(scores, labels) == pytest.approx(_brute_auc(scores, labels), abs=1e-12)


def test_auc_accepts_bool_and_float_labels_and_int_scores() -> None:
    assert auc([1, 2, 3, 4], np.array([False, True, False, True])) == pytest.approx(3 / 4)
    assert auc(np.array([1, 2, 3, 4]), np.array([0.0, 1.0, 0.0, 1.0])) == pytest.approx(3 / 4)


# --------------------------------------------------------------------------- #
# gauc
# --------------------------------------------------------------------------- #
def test_gauc_weighting_by_impressions() -> None:
    # user 0 (4 samples): positives .9,.3; negatives .8,.1 -> 3/4.
    # user 1 (2 samples): positive .2 < negative .6 -> 0.
    # gauc = (4 * 3/4 + 2 * 0) / 6 = 1/2 (an unweighted mean would be 3/8,
    # the global AUC is 5/9).
    scores = [0.9, 0.8, 0.3, 0.1, 0.2, 0.6]
    labels = [1, 0, 1, 0, 1, 0]
    users = [0, 0, 0, 0, 1, 1]
    assert gauc(scores, labels, users) == pytest.approx(1 / 2)
    assert auc(scores, labels) == pytest.approx(5 / 9)


def test_gauc_excludes_single_class_users() -> None:
    scores = [0.9, 0.8, 0.3, 0.1, 0.2, 0.6, 0.5, 0.4, 0.3, 0.7]
    labels = [1, 0, 1, 0, 1, 0, 1, 1, 1, 0]
    users = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]  # user 2: only positives, user 3: only a negative
    assert gauc(scores, labels, users) == pytest.approx(1 / 2)


def test_gauc_tie_and_nan() -> None:
    # user 5: tie -> 1/2 (weight 2); user 9: 1 > 0 on both pairs -> 1 (weight 3).
    assert gauc([0.5, 0.5, 0.9, 0.1, 0.2], [1, 0, 1, 0, 0], [5, 5, 9, 9, 9]) == pytest.approx(
        (2 * 0.5 + 3 * 1.0) / 5
    )
    assert math.isnan(gauc([0.1, 0.2], [1, 1], [0, 1]))
    assert math.isnan(gauc([], [], []))


def test_gauc_non_integer_user_ids() -> None:
    scores = [0.9, 0.8, 0.3, 0.1, 0.2, 0.6]
    labels = [1, 0, 1, 0, 1, 0]
    assert gauc(scores, labels, ["a", "a", "a", "a", "b", "b"]) == pytest.approx(1 / 2)


def test_gauc_matches_bruteforce() -> None:
    for seed in range(3):
        d = _paired_data(seed)
        expected = _brute_gauc(d["scores"], d["labels"], d["users"])
        assert gauc(d["scores"], d["labels"], d["users"]) == pytest.approx(expected, abs=1e-12)
    # Unpaired random data: per-user class counts differ.
    rng = np.random.default_rng(7)
    scores = np.round(rng.normal(size=400), 1)
    labels = rng.integers(0, 2, size=400)
    users = rng.integers(0, 40, size=400)
    assert gauc(scores, labels, users) == pytest.approx(
        _brute_gauc(scores, labels, users), abs=1e-12
    )


# --------------------------------------------------------------------------- #
# pairwise_auc
# --------------------------------------------------------------------------- #
def test_pairwise_auc_hand_example_with_tie() -> None:
    # groups (user, pos): (1,0): .7 > .2 -> 1; (1,1): .3 < .5 -> 0; (2,0): .4 == .4 -> 1/2.
    scores = [0.7, 0.2, 0.3, 0.5, 0.4, 0.4]
    labels = [1, 0, 1, 0, 1, 0]
    users = [1, 1, 1, 1, 2, 2]
    pos = [0, 0, 1, 1, 0, 0]
    assert pairwise_auc(scores, labels, users, pos) == pytest.approx(1 / 2)


def test_pairwise_auc_excludes_one_class_groups_and_averages_combinations() -> None:
    scores = [0.7, 0.2, 0.3, 0.5, 0.4, 0.4] + [0.9] + [0.6, 0.1, 0.6]
    labels = [1, 0, 1, 0, 1, 0] + [1] + [1, 0, 0]
    users = [1, 1, 1, 1, 2, 2] + [2] + [3, 3, 3]
    pos = [0, 0, 1, 1, 0, 0] + [1] + [0, 0, 0]
    # (2,1) has only a positive -> excluded; (3,0): (.6>.1)=1, (.6==.6)=1/2 -> 3/4.
    # mean over 4 groups: (1 + 0 + 1/2 + 3/4) / 4 = 9/16
    assert pairwise_auc(scores, labels, users, pos) == pytest.approx(9 / 16)
    assert math.isnan(pairwise_auc([0.1, 0.2], [1, 0], [0, 0], [0, 1]))


def test_pairwise_auc_matches_bruteforce_and_pair_fraction() -> None:
    d = _paired_data(3)
    expected = _brute_pairwise(d["scores"], d["labels"], d["users"], d["pos"])
    got = pairwise_auc(d["scores"], d["labels"], d["users"], d["pos"])
    assert got == pytest.approx(expected, abs=1e-12)
    # One positive + one negative per group: fraction of correctly ordered pairs.
    order = np.lexsort((d["labels"], d["pos"], d["users"]))  # neg then pos per group
    s = d["scores"][order].reshape(-1, 2)
    frac = np.mean((s[:, 1] > s[:, 0]) + 0.5 * (s[:, 1] == s[:, 0]))
    assert got == pytest.approx(frac, abs=1e-12)


@pytest.mark.parametrize(
    "transform",
    [
        lambda a: a * 10**12 - 5,  # sparse, huge ids -> factorised with np.unique
        lambda a: -a,  # negative ids
        lambda a: a.astype(np.uint64) + np.uint64(2**63),  # unsigned near the top
        lambda a: a.astype(np.int8),  # small dtype
        lambda a: np.array([f"id{v:03d}" for v in a]),  # strings
    ],
)
def test_group_metrics_invariant_to_id_encoding(transform) -> None:
    d = _paired_data(5)
    ref_g = _brute_gauc(d["scores"], d["labels"], d["users"])
    ref_p = _brute_pairwise(d["scores"], d["labels"], d["users"], d["pos"])
    users, pos = transform(d["users"]), transform(d["pos"])
    assert gauc(d["scores"], d["labels"], users) == pytest.approx(ref_g, abs=1e-12)
    assert pairwise_auc(d["scores"], d["labels"], users, pos) == pytest.approx(ref_p, abs=1e-12)


def test_group_metrics_code_overflow_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny int64 limit forces the code-compaction paths used for huge id ranges.
    monkeypatch.setattr("seqrank.metrics._INT64_MAX", 40)
    d = _paired_data(6)
    ref_g = _brute_gauc(d["scores"], d["labels"], d["users"])
    ref_p = _brute_pairwise(d["scores"], d["labels"], d["users"], d["pos"])
    assert gauc(d["scores"], d["labels"], d["users"]) == pytest.approx(ref_g, abs=1e-12)
    assert pairwise_auc(d["scores"], d["labels"], d["users"], d["pos"]) == pytest.approx(
        ref_p, abs=1e-12
    )


# --------------------------------------------------------------------------- #
# logloss
# --------------------------------------------------------------------------- #
def test_logloss_hand_example() -> None:
    assert logloss([0.0, 0.0], [1, 0]) == pytest.approx(math.log(2))
    # -log(sigmoid(ln 3)) = ln(4/3); -log(1 - sigmoid(ln 3)) = ln 4
    assert logloss([math.log(3), math.log(3)], [1, 0]) == pytest.approx(
        (math.log(4 / 3) + math.log(4)) / 2
    )
    assert math.isnan(logloss([], []))


def test_logloss_matches_torch_including_extreme_logits() -> None:
    rng = np.random.default_rng(1)
    logits = np.concatenate([rng.normal(scale=5.0, size=200), [100.0, -100.0, 100.0, -100.0]])
    labels = np.concatenate([rng.integers(0, 2, size=200), [1, 0, 0, 1]])
    expected = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(labels).double()
    ).item()
    got = logloss(logits, labels)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-12)
    # Confidently wrong at |logit| = 100 costs exactly ~100 nats, right costs ~0.
    assert logloss([100.0, -100.0, 100.0, -100.0], [1, 0, 0, 1]) == pytest.approx(50.0)


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auc([0.1, 0.2, 0.3], [1, 0]), "labels must have the same length"),
        (lambda: auc([[0.1, 0.2]], [[1, 0]]), "scores must be a 1-D"),
        (lambda: auc([0.1, 0.2], [[1, 0]]), "labels must be a 1-D"),
        (lambda: auc([0.1, 0.2], [1, 2]), r"labels must be binary .*\[2\]"),
        (lambda: auc([0.1, float("nan")], [1, 0]), "scores must not contain NaN"),
        (lambda: auc(["a", "b"], [1, 0]), "scores must have a real numeric dtype"),
        (lambda: logloss([0.1, 0.2], [0.5, 1.0]), "labels must be binary"),
        (lambda: gauc([0.1, 0.2], [1, 0], [0]), "users must have the same length"),
        (lambda: gauc([0.1, 0.2], [1, 0], [[0, 0]]), "users must be a 1-D"),
        (lambda: pairwise_auc([0.1, 0.2], [1, 0], [0, 0], [0, 0, 0]), "pos must have the same"),
    ],
)
def test_validation_errors_name_the_argument(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- #
# RankingMetrics
# --------------------------------------------------------------------------- #
def _functional(d: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "auc": auc(d["scores"], d["labels"]),
        "gauc": gauc(d["scores"], d["labels"], d["users"]),
        "pairwise_auc": pairwise_auc(d["scores"], d["labels"], d["users"], d["pos"]),
        "logloss": logloss(d["scores"], d["labels"]),
        "num_samples": float(len(d["scores"])),
    }


def _feed(metric: RankingMetrics, d: dict[str, np.ndarray], idx: np.ndarray, n_batches: int):
    for part in np.array_split(idx, n_batches):
        metric.update(
            scores=torch.from_numpy(d["scores"][part]).float(),
            labels=torch.from_numpy(d["labels"][part]),
            users=torch.from_numpy(d["users"][part]),
            pos=torch.from_numpy(d["pos"][part]),
            index=torch.from_numpy(part),
        )


def _as_floats(out: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(out) == {"auc", "gauc", "pairwise_auc", "logloss", "num_samples"}
    assert all(v.ndim == 0 and v.is_floating_point() for v in out.values())
    return {k: float(v) for k, v in out.items()}


def test_ranking_metrics_matches_functional_over_batches() -> None:
    d = _paired_data(11)
    d["scores"] = d["scores"].astype(np.float32).astype(np.float64)  # what the metric sees
    n = len(d["scores"])
    metric = RankingMetrics()
    _feed(metric, d, np.arange(n), n_batches=7)
    got = _as_floats(metric.compute())
    expected = _functional(d)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["num_samples"] == n


def test_ranking_metrics_deduplicates_padding_exactly() -> None:
    d = _paired_data(12)
    n = len(d["scores"])
    clean = RankingMetrics()
    _feed(clean, d, np.arange(n), n_batches=4)
    ref = _as_floats(clean.compute())

    # Same samples fed twice (DistributedSampler pads by wrapping to the start).
    padded = RankingMetrics()
    _feed(padded, d, np.concatenate([np.arange(n), np.arange(5)]), n_batches=5)
    assert _as_floats(padded.compute()) == ref

    # Simulated 3-rank DDP: padded index list split round-robin, states merged.
    world = 3
    total = math.ceil(n / world) * world
    all_idx = np.concatenate([np.arange(n), np.arange(total - n)])
    ranks = [RankingMetrics() for _ in range(world)]
    for r, m in enumerate(ranks):
        _feed(m, d, all_idx[r::world], n_batches=3)
    for m in ranks[1:]:
        ranks[0].merge_state(m)
    assert _as_floats(ranks[0].compute()) == ref
    assert ref["num_samples"] == n


def test_ranking_metrics_empty_state_returns_nan() -> None:
    metric = RankingMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _as_floats(metric.compute())
    assert out["num_samples"] == 0
    assert all(math.isnan(out[k]) for k in ("auc", "gauc", "pairwise_auc", "logloss"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ranking_metrics_low_precision_scores(dtype: torch.dtype) -> None:
    d = _paired_data(13)
    n = len(d["scores"])
    scores = torch.from_numpy(d["scores"]).to(dtype)
    metric = RankingMetrics()
    for part in np.array_split(np.arange(n), 3):
        metric.update(
            scores[part],
            torch.from_numpy(d["labels"][part]).to(dtype),
            torch.from_numpy(d["users"][part]),
            torch.from_numpy(d["pos"][part]),
            torch.from_numpy(part),
        )
    got = _as_floats(metric.compute())
    expected = _functional({**d, "scores": scores.double().numpy()})
    assert got == pytest.approx(expected, rel=1e-12)


def test_ranking_metrics_nan_scores_give_nan_with_warning() -> None:
    metric = RankingMetrics()
    metric.update(
        torch.tensor([float("nan"), 0.0]),
        torch.tensor([1, 0]),
        torch.tensor([0, 0]),
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
    )
    with pytest.warns(UserWarning, match="NaN"):
        out = _as_floats(metric.compute())
    assert math.isnan(out["auc"]) and out["num_samples"] == 2


def test_ranking_metrics_update_validation() -> None:
    metric = RankingMetrics()
    one = torch.zeros(4)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="scores must be a 1-D"):
        metric.update(torch.zeros(4, 1), one, ids, ids, ids)
    with pytest.raises(ValueError, match="index must have the same length"):
        metric.update(one, one, ids, ids, torch.arange(3))
    with pytest.raises(ValueError, match="labels must be a torch.Tensor"):
        metric.update(one, [0, 1, 0, 1], ids, ids, ids)

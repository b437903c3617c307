"""Reference scorers beside every model result: popularity, and the generator's oracle.

A model's figure means little alone; on synthetic data we know the best achievable score (the
oracle: the generator's exact probability of the next item given the history), and on any data a
popularity-only scorer is the floor every sequence model must clear.
"""

from __future__ import annotations

import numpy as np

from seqrank.data.store import Store
from seqrank.metrics import auc, gauc, logloss, pairwise_auc


def ranking_metrics(
    scores: np.ndarray, store: Store, split: str, *, logits: bool
) -> dict[str, float]:
    """auc, gauc, pairwise_auc (and logloss when `scores` are logits) of scores on a split."""
    s = store.splits[split]
    labels = np.asarray(s.label, dtype=np.int64)
    out = {
        "auc": auc(scores, labels),
        "gauc": gauc(scores, labels, s.user),
        "pairwise_auc": pairwise_auc(scores, labels, s.user, s.pos),
    }
    if logits:
        out["logloss"] = logloss(scores, labels)
    return out


def popularity_scores(store: Store, split: str) -> np.ndarray:
    """Score = how often the candidate was an observed training target (train split only)."""
    tr = store.splits["train"]
    counts = np.bincount(
        np.asarray(tr.target)[np.asarray(tr.label) == 1], minlength=store.schema.num_items
    )
    return counts[np.asarray(store.splits[split].target)].astype(np.float64)


def reference_metrics(store: Store, split: str = "test") -> dict[str, dict[str, float]]:
    """Metrics of the popularity scorer and, when the store has one, of the oracle."""
    refs = {
        "popularity": ranking_metrics(popularity_scores(store, split), store, split, logits=False)
    }
    if split in store.oracle:
        refs["oracle"] = ranking_metrics(
            np.asarray(store.oracle[split]), store, split, logits=False
        )
    return refs


def gap_closed(model: float, popularity: float, oracle: float) -> float:
    """Fraction of the popularity -> oracle gap a model closes (1.0 = oracle, 0.0 = popularity)."""
    return (
        float((model - popularity) / (oracle - popularity))
        if oracle != popularity
        else float("nan")
    )

"""HR@K and NDCG@K with full ranking over all items, the user's other items excluded, pessimistic ties."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (5, 10, 20)


def mask_excluded(scores: np.ndarray, targets: np.ndarray, excluded: Sequence[np.ndarray]) -> np.ndarray:
    """Set each row's excluded items to -inf, except the row's target (a repeat purchase stays rankable).

    scores: (n, n_items) float, modified in place and returned; targets: (n,) item columns;
    excluded[r]: item columns the user interacted with (their history), any order, may include the target.
    """
    lengths = np.fromiter((len(e) for e in excluded), dtype=np.int64, count=len(excluded))
    if lengths.sum() == 0:
        return scores
    rows = np.repeat(np.arange(len(excluded)), lengths)
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in excluded])
    keep = cols != targets[rows]
    scores[rows[keep], cols[keep]] = -np.inf
    return scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(n,) 0-based rank of each row's target among all columns, counting ties pessimistically.

    Tie rule: every other item whose score equals the target's is ranked above it, so a model that gives
    many items the same score (all zeros, say) gets no credit for the tie. Apply `mask_excluded` first.
    """
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; the model diverged (lower the learning rate and retrain)")
    target_scores = scores[np.arange(len(targets)), targets][:, None]  # (n, 1)
    return (scores >= target_scores).sum(axis=1) - 1  # minus the target itself


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"HR@K", "NDCG@K"} averaged over users: a hit when rank < K; NDCG = 1 / log2(rank + 2) on a hit."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out


def top_items(scores: np.ndarray, k: int) -> np.ndarray:
    """(n, k) columns of the k highest scores per row, best first (ties broken by lower column)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


class RankingAccumulator:
    """Collects target ranks (and optionally top-k lists) batch by batch, so no (users, items) array
    bigger than one batch ever exists."""

    def __init__(self, keep_top: int = 0):
        self.keep_top = keep_top
        self.ranks: list[np.ndarray] = []
        self.tops: list[np.ndarray] = []

    def add(self, scores: np.ndarray, targets: np.ndarray, excluded: Sequence[np.ndarray]) -> None:
        """scores: (batch, n_items) float32 (modified in place); targets: (batch,); excluded: per row."""
        targets = np.asarray(targets, dtype=np.int64)
        mask_excluded(scores, targets, excluded)
        self.ranks.append(target_ranks(scores, targets))
        if self.keep_top:
            self.tops.append(top_items(scores, self.keep_top))

    def metrics(self, ks: Sequence[int] = KS) -> dict[str, float]:
        return metrics_from_ranks(np.concatenate(self.ranks), ks)

    def top(self) -> np.ndarray:
        return np.concatenate(self.tops) if self.tops else np.zeros((0, self.keep_top), dtype=np.int64)

"""Popularity, item-based CF and user-based CF over histories, with sparse matrices (no dense user x item)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse


def interaction_matrix(histories: Sequence[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """(n_users, n_items) binary CSR matrix: 1 where the user interacted with the item (repeats once)."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    rows = np.repeat(np.arange(len(histories)), lengths)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(histories) else []
    matrix = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(histories), n_items)
    )
    matrix.data[:] = 1.0  # duplicates were summed by the constructor
    return matrix


def _row_normalize(matrix: sparse.csr_matrix) -> sparse.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    return sparse.diags(1.0 / np.maximum(norms, 1e-12)).astype(np.float32) @ matrix


class Popularity:
    """Scores every item by how many users interacted with it (the same list for every user)."""

    def __init__(self, histories: Sequence[np.ndarray], n_items: int):
        counts = np.asarray(interaction_matrix(histories, n_items).sum(axis=0)).ravel()
        self.counts = counts.astype(np.float32)  # (n_items,)

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """(batch, n_items) scores for the users at `user_rows` of the fitted histories."""
        return np.broadcast_to(self.counts, (len(user_rows), len(self.counts))).copy()


class ItemCF:
    """Item-based CF: item-item cosine over user co-occurrence; a user's score for item j is the sum of
    cos(i, j) over the items i in their history (Sarwar et al., WWW 2001; Deshpande & Karypis 2004)."""

    def __init__(self, histories: Sequence[np.ndarray], n_items: int):
        self.user_items = interaction_matrix(histories, n_items)  # (n_users, n_items)
        item_users = _row_normalize(self.user_items.T.tocsr())  # (n_items, n_users), unit rows
        self.similarity = (item_users @ item_users.T).tocsr()  # (n_items, n_items), sparse cosine
        self.similarity.setdiag(0.0)  # an item is not its own neighbour (excluded from ranking anyway)
        self.similarity.eliminate_zeros()

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        return (self.user_items[user_rows] @ self.similarity).toarray().astype(np.float32)


class UserCF:
    """User-based CF: the k most cosine-similar other users vote for their items, weighted by similarity
    (Herlocker et al., SIGIR 1999). Similarities are computed per batch of users, never all at once."""

    def __init__(self, histories: Sequence[np.ndarray], n_items: int, neighbours: int = 50):
        self.user_items = interaction_matrix(histories, n_items)  # (n_users, n_items)
        self.unit_users = _row_normalize(self.user_items)  # (n_users, n_items), unit rows
        self.neighbours = neighbours

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        user_rows = np.asarray(user_rows)
        similarity = (self.unit_users[user_rows] @ self.unit_users.T).toarray()  # (batch, n_users)
        similarity[np.arange(len(user_rows)), user_rows] = 0.0  # not one's own neighbour
        k = min(self.neighbours, similarity.shape[1] - 1)
        if k <= 0:
            return np.zeros((len(user_rows), self.user_items.shape[1]), dtype=np.float32)
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (batch, k)
        weights = np.take_along_axis(similarity, nearest, axis=1)  # (batch, k)
        rows = np.repeat(np.arange(len(user_rows)), k)
        votes = sparse.csr_matrix(
            (weights.ravel().astype(np.float32), (rows, nearest.ravel())),
            shape=(len(user_rows), self.user_items.shape[0]),
        )
        return (votes @ self.user_items).toarray().astype(np.float32)  # (batch, n_items)

"""Behavior vectors: the GRU's item vectors as the index's `behavior` space, and its exactness check."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoders.sequence import HistoryEvent, SequenceEncoder
from index import EdgeSettings, EdgeStore, Record, VectorIndex, VectorSpace

BEHAVIOR_SPACE = "behavior"
# Search-time HNSW beam for behavior queries. User vectors are not drawn from the item distribution
# (MIPS-augmented, one extra axis), so the graph needs a wider beam than product-to-product search.
BEHAVIOR_HNSW_EF = 256  # measured on Beauty, 1,000 users: ef 64 0.926, 128 0.970, 256 0.991


def behavior_space(encoder: SequenceEncoder) -> VectorSpace:
    """The index space for this trained model; its encoder id carries a hash of the item vectors, so a
    retrained model never silently mixes with vectors of another."""
    digest = hashlib.sha256(encoder.item_vectors().tobytes()).hexdigest()[:10]
    return VectorSpace(BEHAVIOR_SPACE, encoder.info.dim, f"{encoder.info.id}+{digest}")


@dataclass
class BehaviorUpsert:
    written: int  # products that got a behavior vector
    not_in_index: int  # model items that are not (or no longer) products in the index
    space: VectorSpace


def upsert_behavior_vectors(
    index: VectorIndex, encoder: SequenceEncoder, batch: int = 1024
) -> BehaviorUpsert:
    """Add (or refresh) the `behavior` space and write every known product's behavior vector.

    Products the model never saw keep no behavior vector: behavior search skips them until a retrain
    (or the cold-start mapping from content vectors) gives them one."""
    space = behavior_space(encoder)
    current = index.spaces.get(BEHAVIOR_SPACE)
    if current is not None and current != space:
        raise ValueError(
            f"collection {index.name!r} already holds behavior vectors of {current.encoder!r} "
            f"(dim {current.dim}); this model is {space.encoder!r} (dim {space.dim}): write a new "
            "collection (re-run ingest into a fresh data dir) or keep the served model"
        )
    index.add_space(space)
    vectors = encoder.item_vectors()  # (n_items, dim + 2) unit rows for cosine
    present = {r.product_id for r in index.get(encoder.item_ids)}
    rows = [(pid, vectors[i]) for i, pid in enumerate(encoder.item_ids) if pid in present]
    for start in range(0, len(rows), batch):
        index.update_vectors({pid: {BEHAVIOR_SPACE: row} for pid, row in rows[start : start + batch]})
    return BehaviorUpsert(len(rows), len(encoder.item_ids) - len(rows), space)


def index_recall_at_k(
    index: VectorIndex,
    encoder: SequenceEncoder,
    histories: Sequence[Sequence[HistoryEvent]],
    k: int = 10,
    hnsw_ef: int | None = BEHAVIOR_HNSW_EF,
) -> float:
    """Mean share of the exact full-ranking top-k (model scores over items in the index) that the
    index's behavior search returns, over the given users."""
    in_index = np.array([pid is not None for pid in _present(index, encoder)])
    scores = encoder.scores(histories)  # (n_users, n_items)
    scores[:, ~in_index] = -np.inf
    users = encoder.encode_users(histories)  # (n_users, dim + 2)
    found = index.search_batch(BEHAVIOR_SPACE, users, k=k, hnsw_ef=hnsw_ef)
    recalls = []
    for row, hits in zip(scores, found, strict=True):
        exact = {encoder.item_ids[j] for j in np.argsort(-row)[:k]}
        recalls.append(len(exact & {h.product_id for h in hits}) / k)
    return float(np.mean(recalls))


def hnsw_behavior_recall(
    encoder: SequenceEncoder,
    histories: Sequence[Sequence[HistoryEvent]],
    k: int = 10,
    hnsw_ef: int | None = BEHAVIOR_HNSW_EF,
) -> float:
    """index_recall_at_k on a scratch embedded collection of every item's behavior vector, with HNSW
    forced on (at the engine's default thresholds a catalog this small is scanned exactly)."""
    settings = EdgeSettings(full_scan_threshold_kb=1, indexing_threshold_kb=1)
    with tempfile.TemporaryDirectory(prefix="shopguide-behavior-") as tmp, EdgeStore(tmp, settings) as store:
        index = store.create_collection("behavior_check", [behavior_space(encoder)])
        vectors = encoder.item_vectors()
        for start in range(0, len(vectors), 2048):
            index.upsert(
                [
                    Record(pid, {BEHAVIOR_SPACE: vectors[i]})
                    for i, pid in enumerate(encoder.item_ids[start : start + 2048], start)
                ]
            )
        index.optimize()
        return index_recall_at_k(index, encoder, histories, k, hnsw_ef)


def _present(index: VectorIndex, encoder: SequenceEncoder) -> list[str | None]:
    present = {r.product_id for r in index.get(encoder.item_ids)}
    return [pid if pid in present else None for pid in encoder.item_ids]

"""Behavior vectors: the GRU's item vectors as the index's `behavior` space, and its exactness check."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from encoders.base import l2_normalize
from encoders.sequence import HistoryEvent, SequenceEncoder
from index import EdgeSettings, EdgeStore, Record, VectorIndex, VectorSpace

BEHAVIOR_PREFIX = "behavior-"  # each trained model's item vectors live in a space of their own
# Search-time HNSW beam for behavior queries. User vectors are not drawn from the item distribution
# (MIPS-augmented, one extra axis), so the graph needs a wider beam than product-to-product search.
BEHAVIOR_HNSW_EF = 256  # measured on Beauty, 1,000 users: ef 64 0.926, 128 0.970, 256 0.991
# Cold start: a new product's behavior vector is the similarity-weighted mean of those of the
# MAPPING_NEIGHBOURS known products closest to it in content (fused) space, softmax(cos / temperature).
MAPPING_NEIGHBOURS = 10
MAPPING_TEMPERATURE = 0.05  # cos 0.95 vs 0.90 weighs e^1 = 2.7x: the nearest look-alikes dominate


def behavior_space(encoder: SequenceEncoder) -> VectorSpace:
    """The index space for this trained model: named by a hash of its item vectors, so two models
    (the live one and a candidate, or two A/B arms) sit side by side and never mix."""
    digest = hashlib.sha256(encoder.item_vectors().tobytes()).hexdigest()[:10]
    return VectorSpace(f"{BEHAVIOR_PREFIX}{digest}", encoder.info.dim, f"{encoder.info.id}+{digest}")


def is_behavior_space(name: str) -> bool:
    return name.startswith(BEHAVIOR_PREFIX) or name == "behavior"  # "behavior": data dirs before versions


@dataclass
class BehaviorUpsert:
    written: int  # products that got the model's own item vector
    not_in_index: int  # model items that are not (or no longer) products in the index
    space: VectorSpace
    mapped: int = 0  # products the model never saw, given a vector by the content mapping
    covered: frozenset[str] = frozenset()  # every product id that now has a vector in `space`


class ContentMapping:
    """Content vectors (fused image + text) -> the GRU's behavior space, fitted on the products the model
    knows: a new product gets the similarity-weighted mean of the raw item vectors (embedding and bias) of
    its nearest known look-alikes (k-nearest-neighbour regression), so it lands where shoppers' behavior
    put products like it, before any retrain.

    Chosen over a linear map because behavior clusters are arbitrary directions a linear map of content
    recovers poorly when products look alike (measured on the test catalog: ridge in-sample relative
    error 0.46-0.80 at any penalty; the neighbour mean puts a near-twin at its twin). The output is lifted
    into the cosine index space exactly like the model's own item vectors (the same MIPS augmentation
    and scale), so users score mapped and learned items on one scale."""

    def __init__(
        self,
        encoder: SequenceEncoder,
        content: np.ndarray,
        item_rows: np.ndarray,
        neighbours: int = MAPPING_NEIGHBOURS,
        temperature: float = MAPPING_TEMPERATURE,
    ) -> None:
        # content: (n, d) unit fused vectors of products the model knows; item_rows: their rows in item_ids.
        if len(content) == 0:
            raise ValueError("the content mapping needs at least one product the model knows")
        table, bias = (t.detach().numpy() for t in encoder.raw_item_table())
        full = np.concatenate([table, bias[:, None]], axis=1).astype(np.float64)  # (n_items, dim + 1)
        self.content = np.asarray(content, dtype=np.float32)  # (n, d)
        self.targets = full[item_rows]  # (n, dim + 1)
        self.neighbours = min(neighbours, len(content))
        self.temperature = temperature
        self.largest = float(np.linalg.norm(full, axis=1).max())  # the lift's scale (item_vectors)

    def __call__(self, content: np.ndarray) -> np.ndarray:
        """(m, d) content vectors -> (m, dim + 2) unit rows in the model's cosine index space."""
        sims = np.asarray(content, dtype=np.float32) @ self.content.T  # (m, n)
        top = np.argpartition(-sims, self.neighbours - 1, axis=1)[:, : self.neighbours]  # (m, k)
        top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / self.temperature)
        weights /= weights.sum(axis=1, keepdims=True)
        augmented = np.einsum("mk,mkd->md", weights, self.targets[top])  # (m, dim + 1)
        norms = np.linalg.norm(augmented, axis=1, keepdims=True)
        # A mean of item vectors is never longer than the longest one, so the lift always applies.
        filler = np.sqrt(np.clip(self.largest**2 - norms**2, 0, None))
        return (np.concatenate([augmented, filler], axis=1) / self.largest).astype(np.float32)


def upsert_behavior_vectors(
    index: VectorIndex,
    encoder: SequenceEncoder,
    batch: int = 1024,
    map_content: bool = False,
    only: set[str] | None = None,
) -> BehaviorUpsert:
    """Add (or refresh) this model's behavior space and write every known product's item vector.

    With `map_content`, products the model never saw get a vector from `ContentMapping` (cold start)
    instead of none. `only` restricts the writes to those product ids (new products since the last
    call); the mapping is still fitted on every known product."""
    space = behavior_space(encoder)
    index.add_space(space)
    vectors = encoder.item_vectors()  # (n_items, dim + 2) unit rows for cosine
    in_index = list(index.product_ids())  # a scroll of ids: cheaper than reading every payload
    known = set(encoder.item_ids).intersection(in_index)
    rows = [(pid, vectors[i]) for i, pid in enumerate(encoder.item_ids) if pid in known]
    if only is not None:
        rows = [(pid, row) for pid, row in rows if pid in only]
    _write_changed(index, space.name, rows, batch)
    covered = set(known)
    mapped = 0
    if map_content and "fused" in index.spaces:
        unseen = [pid for pid in (only if only is not None else in_index) if pid not in known]
        if unseen:
            mapping = _fit_mapping(index, encoder, known)
            for start in range(0, len(unseen), batch):
                records = index.get(unseen[start : start + batch], with_vectors=("fused",))
                records = [r for r in records if "fused" in r.vectors]
                if not records:
                    continue
                out = mapping(np.stack([r.vectors["fused"] for r in records]))
                pairs = [(r.product_id, row) for r, row in zip(records, out, strict=True)]
                _write_changed(index, space.name, pairs, batch)
                covered |= {r.product_id for r in records}
                mapped += len(records)
    return BehaviorUpsert(len(rows), len(encoder.item_ids) - len(known), space, mapped, frozenset(covered))


def _write_changed(index: VectorIndex, space: str, rows: list[tuple[str, np.ndarray]], batch: int) -> None:
    """Write the rows whose stored vector in `space` is missing or differs (the engine stores cosine
    vectors normalized, so they are compared normalized).

    A server restart calls this for a model whose vectors are already stored: rewriting all of them
    left the engine with unindexed copies to re-index while requests waited (make soak: a restarted
    Recommender kept shedding load for 20 s after it came back)."""
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        stored = {
            r.product_id: r.vectors[space]
            for r in index.get([pid for pid, _ in chunk], with_vectors=(space,))
            if space in r.vectors
        }
        same = np.zeros(len(chunk), dtype=bool)  # (chunk,) stored and equal
        present = [i for i, (pid, _) in enumerate(chunk) if pid in stored]
        if present:  # one vectorized comparison per chunk: a restart compares all 11k at start-up
            old = l2_normalize(np.stack([stored[chunk[i][0]] for i in present]))
            new = l2_normalize(np.stack([chunk[i][1] for i in present]))
            same[present] = np.abs(old - new).max(axis=1) <= 1e-5
        changed = {
            pid: {space: row} for (pid, row), unchanged in zip(chunk, same, strict=True) if not unchanged
        }
        if changed:
            index.update_vectors(changed)


def _fit_mapping(index: VectorIndex, encoder: SequenceEncoder, known: set[str]) -> ContentMapping:
    ids = [pid for pid in encoder.item_ids if pid in known]
    records = [r for r in index.get(ids, with_vectors=("fused",)) if "fused" in r.vectors]
    rows = np.array([encoder.item_index[r.product_id] - 1 for r in records])  # item_index is 1-based
    return ContentMapping(encoder, np.stack([r.vectors["fused"] for r in records]), rows)


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
    found = index.search_batch(behavior_space(encoder).name, users, k=k, hnsw_ef=hnsw_ef)
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
        space = behavior_space(encoder)
        index = store.create_collection("behavior_check", [space])
        vectors = encoder.item_vectors()
        for start in range(0, len(vectors), 2048):
            index.upsert(
                [
                    Record(pid, {space.name: vectors[i]})
                    for i, pid in enumerate(encoder.item_ids[start : start + 2048], start)
                ]
            )
        index.optimize()
        return index_recall_at_k(index, encoder, histories, k, hnsw_ef)


def _present(index: VectorIndex, encoder: SequenceEncoder) -> list[str | None]:
    present = {r.product_id for r in index.get(encoder.item_ids)}
    return [pid if pid in present else None for pid in encoder.item_ids]

"""Behavior space: GRU item vectors in the index rank exactly like the model's full ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.sequence import GRUSequenceModel, SequenceEncoder, SequenceModelConfig
from index import EdgeStore, Filters, Record, VectorSpace
from training.behavior import index_recall_at_k, upsert_behavior_vectors


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    row = rng.normal(size=dim).astype(np.float32)
    return row / np.linalg.norm(row)


@pytest.fixture
def index_and_encoder(tmp_path: Path):
    rng = np.random.default_rng(0)
    store = EdgeStore(tmp_path / "index")
    index = store.create_collection("products_t", [VectorSpace("fused", 8, "test/1")])
    product_ids = [f"p{i}" for i in range(300)]
    index.upsert(
        [Record(pid, {"fused": _unit(rng, 8)}, {"in_stock": i % 2 == 0}) for i, pid in enumerate(product_ids)]
    )
    torch.manual_seed(0)
    model = GRUSequenceModel(SequenceModelConfig(dim=16, hidden=32), n_items=310)
    with torch.no_grad():  # give items distinct biases so the MIPS augmentation matters
        model.item_bias.normal_(std=2.0)
    # The model knows 10 products that are not in the index (e.g. since deleted).
    encoder = SequenceEncoder(model, product_ids + [f"gone{i}" for i in range(10)])
    yield index, encoder
    store.close()


def test_behavior_search_equals_the_models_exact_ranking(index_and_encoder) -> None:
    index, encoder = index_and_encoder
    result = upsert_behavior_vectors(index, encoder)
    assert (result.written, result.not_in_index) == (300, 10)
    rng = np.random.default_rng(1)
    histories = [
        [(f"p{j}", "click") for j in rng.integers(0, 300, size=rng.integers(0, 12))] for _ in range(60)
    ]
    assert index_recall_at_k(index, encoder, histories, k=10) == 1.0
    # Filters still apply in the behavior space.
    hits = index.search(
        result.space.name,
        encoder.encode_users([[("p3", "view")]])[0],
        k=20,
        filters=Filters(in_stock=True),
    )
    assert len(hits) == 20 and all(h.payload["in_stock"] for h in hits)


def test_two_models_keep_their_vectors_side_by_side(index_and_encoder) -> None:
    index, encoder = index_and_encoder
    first = upsert_behavior_vectors(index, encoder)
    assert upsert_behavior_vectors(index, encoder).space == first.space  # the same model again: a refresh
    torch.manual_seed(1)
    other = SequenceEncoder(
        GRUSequenceModel(SequenceModelConfig(dim=16, hidden=32), n_items=310), encoder.item_ids
    )
    second = upsert_behavior_vectors(index, other)
    assert second.space.name != first.space.name and second.space.encoder != first.space.encoder
    histories = [[("p3", "view"), ("p7", "click")]]
    # Each model still ranks exactly as it would alone: writing one never touched the other.
    assert index_recall_at_k(index, encoder, histories, k=10) == 1.0
    assert index_recall_at_k(index, other, histories, k=10) == 1.0


def test_products_the_model_never_saw_get_mapped_vectors(tmp_path: Path) -> None:
    """The content mapping places an unseen product among the known products that look like it, in the
    behavior space, even though behavior clusters point in directions unrelated to content ones."""
    rng = np.random.default_rng(0)
    clusters, per = 30, 10
    looks = np.stack([_unit(rng, 8) for _ in range(clusters)])  # content centre of each cluster
    tastes = np.stack([_unit(rng, 16) for _ in range(clusters)])  # behavior direction of each cluster
    ids = [f"p{i}" for i in range(clusters * per)]
    store = EdgeStore(tmp_path / "index")
    index = store.create_collection("products_m", [VectorSpace("fused", 8, "test/1")])
    fused = [looks[i // per] + rng.normal(scale=0.05, size=8) for i in range(len(ids))]
    index.upsert(
        [
            Record(pid, {"fused": (f / np.linalg.norm(f)).astype(np.float32)})
            for pid, f in zip(ids, fused, strict=True)
        ]
    )
    known = ids[::2]  # the model saw half of every cluster
    model = GRUSequenceModel(SequenceModelConfig(dim=16, hidden=16), n_items=len(known))
    with torch.no_grad():
        model.item_bias.zero_()
        rows = [tastes[int(pid[1:]) // per] + rng.normal(scale=0.05, size=16) for pid in known]
        model.item_embedding.weight[1:] = torch.tensor(np.stack(rows), dtype=torch.float32)
    encoder = SequenceEncoder(model, known)
    result = upsert_behavior_vectors(index, encoder, map_content=True)
    assert (result.written, result.mapped, len(result.covered)) == (150, 150, 300)
    unseen = index.get(ids[1::2], with_vectors=True)
    for record in unseen:
        mapped = record.vectors[result.space.name][:16]  # the embedding part of the lifted row
        own = int(record.product_id[1:]) // per
        cosines = tastes @ mapped / np.linalg.norm(mapped)
        assert int(np.argmax(cosines)) == own and cosines[own] > 0.95
    # Without the mapping an unseen product has no behavior vector at all.
    plain = upsert_behavior_vectors(index, encoder)
    assert plain.mapped == 0 and len(plain.covered) == 150
    store.close()


def test_a_refresh_writes_only_vectors_that_are_missing_or_changed(index_and_encoder, monkeypatch) -> None:
    """A server restart refreshes the live model: rewriting every stored vector left the engine
    re-indexing while requests waited, so unchanged vectors are not written again."""
    index, encoder = index_and_encoder
    first = upsert_behavior_vectors(index, encoder, map_content=True)
    written: list[str] = []
    original = index.update_vectors

    def counting(vectors: dict) -> None:
        written.extend(vectors)
        original(vectors)

    monkeypatch.setattr(index, "update_vectors", counting)
    again = upsert_behavior_vectors(index, encoder, map_content=True)
    assert written == [] and again.covered == first.covered  # nothing changed: nothing written
    space = first.space.name
    dim = index.spaces[space].dim
    original({"p5": {space: np.eye(dim, dtype=np.float32)[0]}})  # one vector tampered with
    index.upsert([Record("p-new", {"fused": np.eye(8, dtype=np.float32)[1]})])  # one product added
    upsert_behavior_vectors(index, encoder, map_content=True)
    assert sorted(written) == ["p-new", "p5"]  # the changed one and the new (mapped) one, nothing else
    assert index_recall_at_k(index, encoder, [[("p3", "view"), ("p5", "click")]], k=10) == 1.0

"""Behavior space: GRU item vectors in the index rank exactly like the model's full ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.sequence import GRUSequenceModel, SequenceEncoder, SequenceModelConfig
from index import EdgeStore, Filters, Record, VectorSpace
from training.behavior import BEHAVIOR_SPACE, index_recall_at_k, upsert_behavior_vectors


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
        BEHAVIOR_SPACE, encoder.encode_users([[("p3", "view")]])[0], k=20, filters=Filters(in_stock=True)
    )
    assert len(hits) == 20 and all(h.payload["in_stock"] for h in hits)


def test_a_different_model_is_refused_in_a_filled_behavior_space(index_and_encoder) -> None:
    index, encoder = index_and_encoder
    upsert_behavior_vectors(index, encoder)
    upsert_behavior_vectors(index, encoder)  # the same model again: fine (refresh)
    other = SequenceEncoder(
        GRUSequenceModel(SequenceModelConfig(dim=16, hidden=32), n_items=310), encoder.item_ids
    )
    with pytest.raises(ValueError, match="already holds behavior vectors"):
        upsert_behavior_vectors(index, other)

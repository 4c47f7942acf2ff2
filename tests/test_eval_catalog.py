"""Catalog evaluation: metric functions on known answers, and the real catalog slice when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.catalog import load_catalog
from training.evaluate import (
    attribute_queries,
    random_similar_precision,
    recall_at_k,
    similar_precision,
    topk_exact,
)


def test_topk_exact_matches_argsort() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    expected = np.argsort(-(rows @ rows.T), axis=1)[:, :5]
    np.testing.assert_array_equal(topk_exact(rows, rows, 5, chunk=7), expected)
    # exclude_self drops each row's own index (its best match)
    assert not (topk_exact(rows, rows, 5, chunk=7, exclude_self=True) == np.arange(50)[:, None]).any()


def test_similar_precision_on_separable_clusters() -> None:
    labels = ["a"] * 20 + ["b"] * 20
    vectors = np.zeros((40, 2), np.float32)
    vectors[:20, 0] = 1.0
    vectors[20:, 1] = 1.0
    vectors += np.random.default_rng(0).normal(scale=0.01, size=vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert similar_precision(vectors, labels, k=10) == 1.0
    assert 0.3 < random_similar_precision(labels, k=10) < 0.7
    assert recall_at_k(vectors, vectors, k=1) == pytest.approx(1.0, abs=0.2)


def test_attribute_queries_need_ten_products(tiny_catalog: Path) -> None:
    # The tiny catalog has 4 products per (colour, gender, article): none qualifies; 8 after doubling.
    products = load_catalog(tiny_catalog).products
    assert attribute_queries(products) == []
    queries = attribute_queries(products * 3)
    assert ("Red Women Handbags", ("Red", "Women", "Handbags")) in queries


@pytest.mark.dataset
@pytest.mark.slow
def test_real_catalog_slice_beats_baselines(fashion_catalog: Path, tmp_path: Path) -> None:
    """600 real products end to end: aligned + fused vectors beat random and the raw features."""
    from training.eval_catalog import run_catalog_eval

    result = run_catalog_eval(fashion_catalog, tmp_path, limit=600, progress=False)
    similar = result["similar_p10_articleType"]
    assert similar["fused"] > max(similar["image"], similar["raw_cnn"], 3 * similar["random"]), similar
    assert similar["fused"] > 0.7
    assert result["title_to_image_r10"] > 5 * result["title_to_image_r10_by_mode"]["random"]
    assert result["attribute_query_p10"] is None or result["attribute_query_p10"] > 0.5

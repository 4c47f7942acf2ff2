"""The index benchmark runs end to end at toy size and reports every number the CLI prints."""

from __future__ import annotations

import numpy as np

from index.bench import bench_index, exact_top_k


def test_bench_index_toy_size(tmp_path) -> None:
    real = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)  # (n, d), normalized inside
    result = bench_index(points=2000, dim=16, queries=5, real_vectors=real, work_dir=tmp_path, progress=False)
    for key in (
        "edge_p50_ms",
        "edge_p95_ms",
        "memory_p50_ms",
        "memory_p95_ms",
        "speedup_p50",
        "edge_load_s",
        "edge_hnsw_build_s",
        "memory_load_s",
        "recall_at_10",
    ):
        assert np.isfinite(result[key]) and result[key] >= 0, key
    assert result["edge_p50_ms"] <= result["edge_p95_ms"]
    assert result["speedup_p50"] == result["memory_p50_ms"] / result["edge_p50_ms"]
    assert 0.0 <= result["recall_at_10"] <= 1.0
    assert 0.0 <= result["edge_filtered_recall_at_10"] <= 1.0
    assert 0.0 <= result["edge_unfiltered_recall_at_10"] <= 1.0
    assert result["recall_indexed_vectors"] == result["recall_points"] == 300 - 60  # HNSW really built
    assert list(tmp_path.iterdir()) == []  # temporary shards are cleaned up


def test_exact_top_k_chunks_agree_with_full_sort() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(250, 8)).astype(np.float32)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    full = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    np.testing.assert_array_equal(exact_top_k(base, queries, 10, chunk=64), full)

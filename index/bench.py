"""Index benchmark: embedded HNSW vs qdrant-client in-memory latency, and HNSW recall on real vectors."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .base import Filters, Record, VectorIndex, VectorSpace
from .edge import EdgeSettings, EdgeStore

GENDERS = ("Men", "Women", "Boys", "Girls", "Unisex")
ARTICLE_TYPES = tuple(f"type_{i:02d}" for i in range(30))
COLOURS = ("Black", "White", "Blue", "Navy Blue", "Red", "Grey", "Green", "Brown", "Pink", "Purple")

# The timed query: two payload-indexed conditions, ~16% of the catalog passes (1/5 gender x 0.8 stock).
BENCH_FILTER = Filters(gender=("Women",), in_stock=True)
LOAD_BATCH = 2000  # records per upsert call while loading


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _payloads(rng: np.random.Generator, n: int) -> list[dict]:
    genders = rng.integers(0, len(GENDERS), n)
    articles = rng.integers(0, len(ARTICLE_TYPES), n)
    colours = rng.integers(0, len(COLOURS), n)
    prices = np.round(rng.uniform(5.0, 300.0, n), 2)
    stock = rng.random(n) < 0.8
    return [
        {
            "gender": GENDERS[genders[i]],
            "articleType": ARTICLE_TYPES[articles[i]],
            "baseColour": COLOURS[colours[i]],
            "price": float(prices[i]),
            "in_stock": bool(stock[i]),
        }
        for i in range(n)
    ]


def _load(
    index: VectorIndex, vectors: np.ndarray, payloads: list[dict] | None, desc: str, progress: bool
) -> float:
    """Upsert rows as products "0".."n-1" in batches; returns seconds."""
    start = time.perf_counter()
    with tqdm(total=len(vectors), desc=desc, unit="pt", disable=not progress) as bar:
        for lo in range(0, len(vectors), LOAD_BATCH):
            hi = min(lo + LOAD_BATCH, len(vectors))
            index.upsert(
                [
                    Record(str(i), {"vec": vectors[i]}, payloads[i] if payloads is not None else {})
                    for i in range(lo, hi)
                ]
            )
            bar.update(hi - lo)
    return time.perf_counter() - start


def _latencies_ms(search: Callable[[np.ndarray], object], queries: np.ndarray, warmup: int = 3) -> np.ndarray:
    for row in queries[:warmup]:
        search(row)
    out = []
    for row in queries:
        start = time.perf_counter()
        search(row)
        out.append((time.perf_counter() - start) * 1000.0)
    return np.asarray(out)


def _p(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q))


def _overlap_at_k(got: list[list[str]], want: list[list[str]]) -> float:
    """Mean |got ∩ want| / |want| over queries (recall of `got` against the exact lists `want`)."""
    scores = [len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True) if w]
    return float(np.mean(scores)) if scores else 1.0


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Brute-force cosine top-k row indices (nq, k) for unit rows, scanning `base` in chunks."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, len(base), chunk):
        scores = queries @ base[lo : lo + chunk].T  # (nq, chunk)
        ids = np.broadcast_to(np.arange(lo, lo + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return best_ids


def hnsw_recall(
    vectors: np.ndarray,
    queries: int = 200,
    k: int = 10,
    seed: int = 0,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Recall@k of the embedded HNSW against exact search, with held-out rows of `vectors` as queries."""
    data = np.asarray(vectors, dtype=np.float32)
    data = data / np.linalg.norm(data, axis=1, keepdims=True)  # (n, d); encoders already normalize
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_queries = int(min(queries, max(1, len(data) // 5)))
    query_rows, base_rows = order[:n_queries], order[n_queries:]
    base, query_vecs = data[base_rows], data[query_rows]  # (n_base, d), (n_queries, d)
    k_used = min(k, len(base))  # a tiny catalog may have fewer than k points
    # Tiny thresholds force the graph to be built and walked: with the engine defaults a catalog
    # under ~10 MB of vectors is scanned exactly and the "recall" would be 1.0 by construction.
    settings = EdgeSettings(full_scan_threshold_kb=1, indexing_threshold_kb=1)
    with tempfile.TemporaryDirectory(prefix="shopguide-recall-", dir=work_dir) as tmp:
        with EdgeStore(tmp, settings) as store:
            index = store.create_collection("recall", [VectorSpace("vec", data.shape[1], "bench/real")])
            load_s = _load(index, base, None, "edge: load real vectors", progress)
            start = time.perf_counter()
            index.optimize()
            build_s = time.perf_counter() - start
            info = index.info()
            hits = index.search_batch("vec", query_vecs, k=k_used)
    got = [[int(h.product_id) for h in row] for row in hits]
    want = exact_top_k(base, query_vecs, k_used).tolist()
    return {
        f"recall_at_{k}": _overlap_at_k(got, want),
        "recall_points": len(base),
        "recall_queries": n_queries,
        "recall_dim": int(data.shape[1]),
        "recall_indexed_vectors": info["indexed_vectors"],
        "recall_load_s": load_s,
        "recall_hnsw_build_s": build_s,
    }


def bench_index(
    points: int = 100_000,
    dim: int = 256,
    queries: int = 200,
    seed: int = 0,
    real_vectors: np.ndarray | None = None,
    memory_queries: int = 20,
    hnsw_ef: int | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Filtered top-10 latency, embedded (HNSW) vs qdrant-client ":memory:", on the same synthetic data.

    Returns p50/p95 in ms for both, `speedup_p50` (memory p50 / edge p50), load and HNSW build
    times, and with `real_vectors` (n, d) also `recall_at_10` of HNSW vs exact search. The
    in-memory backend is a brute-force Python scan (~1 s per filtered query at 100k), so it runs
    only `memory_queries` of the `queries`; being exact, it also gives the edge backend's recall@10
    on those queries (`edge_filtered_recall_at_10`, `edge_unfiltered_recall_at_10`). Random vectors
    are HNSW's worst case: read those recalls next to the speedup. `hnsw_ef` sets the search ef.
    """
    from .server import ServerStore  # ~1 s import, only paid by the benchmark

    rng = np.random.default_rng(seed)
    vectors = _unit_rows(rng, points, dim)  # (points, dim)
    payloads = _payloads(rng, points)
    query_vecs = _unit_rows(rng, queries, dim)  # (queries, dim)
    mem_query_vecs = query_vecs[: max(1, min(memory_queries, queries))]
    space = [VectorSpace("vec", dim, "bench/random")]
    result: dict = {
        "points": points,
        "dim": dim,
        "filter": "gender=Women & in_stock=True",
        "edge_queries": queries,
        "memory_queries": len(mem_query_vecs),
        "hnsw_ef": hnsw_ef,
    }

    with tempfile.TemporaryDirectory(prefix="shopguide-bench-", dir=work_dir) as tmp:
        with EdgeStore(tmp, EdgeSettings(hnsw_ef=hnsw_ef)) as store:
            edge = store.create_collection("bench", space)
            result["edge_load_s"] = _load(edge, vectors, payloads, "edge: load", progress)
            if progress:
                tqdm.write(f"edge: optimize() builds HNSW for {points} points (minutes at 100k on 2 cores)")
            start = time.perf_counter()
            edge.optimize()
            result["edge_hnsw_build_s"] = time.perf_counter() - start
            result["edge_indexed_vectors"] = edge.info()["indexed_vectors"]

            filtered = _latencies_ms(lambda q: edge.search("vec", q, 10, BENCH_FILTER), query_vecs)
            unfiltered = _latencies_ms(lambda q: edge.search("vec", q, 10), query_vecs)
            start = time.perf_counter()
            edge.search_batch("vec", query_vecs, 10, BENCH_FILTER)
            result["edge_batch_filtered_qps"] = queries / (time.perf_counter() - start)
            edge_filtered = [
                [h.product_id for h in edge.search("vec", q, 10, BENCH_FILTER)] for q in mem_query_vecs
            ]
            edge_unfiltered = [[h.product_id for h in edge.search("vec", q, 10)] for q in mem_query_vecs]
        result.update(
            edge_p50_ms=_p(filtered, 50),
            edge_p95_ms=_p(filtered, 95),
            edge_unfiltered_p50_ms=_p(unfiltered, 50),
            edge_unfiltered_p95_ms=_p(unfiltered, 95),
        )

    with ServerStore(":memory:") as store:
        memory = store.create_collection("bench", space)
        result["memory_load_s"] = _load(memory, vectors, payloads, "memory: load", progress)
        bar = tqdm(total=2 * len(mem_query_vecs), desc="memory: queries", disable=not progress)
        memory_filtered: list[list[str]] = []
        memory_unfiltered: list[list[str]] = []

        def timed_filtered(q: np.ndarray) -> None:
            memory_filtered.append([h.product_id for h in memory.search("vec", q, 10, BENCH_FILTER)])
            bar.update(1)

        def timed_unfiltered(q: np.ndarray) -> None:
            memory_unfiltered.append([h.product_id for h in memory.search("vec", q, 10)])
            bar.update(1)

        filtered = _latencies_ms(timed_filtered, mem_query_vecs, warmup=0)
        unfiltered = _latencies_ms(timed_unfiltered, mem_query_vecs, warmup=0)
        bar.close()
    result.update(
        memory_p50_ms=_p(filtered, 50),
        memory_p95_ms=_p(filtered, 95),
        memory_unfiltered_p50_ms=_p(unfiltered, 50),
        memory_unfiltered_p95_ms=_p(unfiltered, 95),
    )
    result["speedup_p50"] = result["memory_p50_ms"] / result["edge_p50_ms"]
    result["speedup_unfiltered_p50"] = result["memory_unfiltered_p50_ms"] / result["edge_unfiltered_p50_ms"]
    # The in-memory backend scans exactly, so agreement with it is the edge backend's recall@10.
    result["edge_filtered_recall_at_10"] = _overlap_at_k(edge_filtered, memory_filtered)
    result["edge_unfiltered_recall_at_10"] = _overlap_at_k(edge_unfiltered, memory_unfiltered)

    if real_vectors is not None:
        result.update(
            hnsw_recall(real_vectors, queries=200, k=10, seed=seed, work_dir=work_dir, progress=progress)
        )
    return result

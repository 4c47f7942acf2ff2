"""Offline quality metrics for product vectors: similar items, cross-modal recall, attribute queries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from training.catalog import Product

MIN_PRODUCTS_PER_QUERY = 10  # attribute combinations with fewer products are not used as queries


def topk_exact(
    queries: np.ndarray, candidates: np.ndarray, k: int, chunk: int = 1024, exclude_self: bool = False
) -> np.ndarray:
    """(n_queries, k) indices of the k most similar candidate rows (cosine on unit rows), exactly."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ candidates.T  # (chunk, n_candidates)
        if exclude_self:
            rows = np.arange(len(scores))
            scores[rows, start + rows] = -np.inf
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def similar_precision(vectors: np.ndarray, labels: Sequence[str | None], k: int = 10) -> float:
    """Mean share of each product's k nearest other products that have its label (full catalog pool)."""
    labels_arr = np.asarray([lbl or "" for lbl in labels])
    neighbours = topk_exact(vectors, vectors, k, exclude_self=True)
    return float((labels_arr[neighbours] == labels_arr[:, None]).mean())


def random_similar_precision(labels: Sequence[str | None], k: int = 10, seed: int = 0) -> float:
    """The random baseline of similar_precision, sampled with a seed."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray([lbl or "" for lbl in labels])
    n = len(labels_arr)
    picks = rng.integers(0, n - 1, size=(n, k))
    picks += picks >= np.arange(n)[:, None]  # never the product itself
    return float((labels_arr[picks] == labels_arr[:, None]).mean())


def recall_at_k(queries: np.ndarray, targets: np.ndarray, k: int = 10) -> float:
    """Share of queries i whose target i is among the k nearest targets."""
    top = topk_exact(queries, targets, k)
    return float((top == np.arange(len(queries))[:, None]).any(axis=1).mean())


def attribute_phrase(colour: str | None, gender: str | None, article: str | None) -> str:
    """The query template "{baseColour} {gender} {articleType}" (also used as a training text view)."""
    return " ".join(part for part in (colour, gender, article) if part)


def attribute_queries(products: Sequence[Product]) -> list[tuple[str, tuple[str, str, str]]]:
    """(query text, (colour, gender, article)) for combinations with >= MIN_PRODUCTS_PER_QUERY products."""
    counts = Counter(
        (p.baseColour, p.gender, p.articleType)
        for p in products
        if p.baseColour and p.gender and p.articleType
    )
    return [
        (attribute_phrase(*combo), combo)
        for combo, count in sorted(counts.items())
        if count >= MIN_PRODUCTS_PER_QUERY
    ]


def attribute_precision(
    query_vectors: np.ndarray,
    combos: Sequence[tuple[str, str, str]],
    candidates: np.ndarray,
    products: Sequence[Product],
    k: int = 10,
) -> float:
    """Mean share of the top-k results that match all three attributes of their query."""
    top = topk_exact(query_vectors, candidates, k)
    keys = [(p.baseColour, p.gender, p.articleType) for p in products]
    hits = [[keys[j] == combo for j in row] for row, combo in zip(top, combos, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


def evaluate_vectors(
    products: Sequence[Product],
    spaces: dict[str, np.ndarray],
    encode_query: Callable[[list[str]], np.ndarray],
    heldout: np.ndarray,
    title_queries: np.ndarray,
) -> dict:
    """All catalog metrics for each mode.

    spaces: mode -> (n, d) product vectors aligned with `products` ("image", "text", "fused", and any
    extra baselines). encode_query: texts -> query vectors in the shared space. heldout: boolean mask of
    products that never trained the heads. title_queries: (n, d) query vectors of each product's title.
    """
    article = [p.articleType for p in products]
    sub = [p.subCategory for p in products]
    queries = attribute_queries(products)
    query_vecs = encode_query([q for q, _ in queries]) if queries else None
    result: dict = {
        "products": len(products),
        "heldout_products": int(heldout.sum()),
        "attribute_queries": len(queries),
        "similar_p10_articleType": {"random": random_similar_precision(article)},
        "similar_p10_subCategory": {"random": random_similar_precision(sub)},
        "title_to_image_r10": {"random": min(1.0, 10 / max(1, int(heldout.sum())))},
        "attribute_query_p10": {},
    }
    for mode, vectors in spaces.items():
        result["similar_p10_articleType"][mode] = similar_precision(vectors, article)
        result["similar_p10_subCategory"][mode] = similar_precision(vectors, sub)
        if vectors.shape[1] == title_queries.shape[1]:  # text queries only reach the shared space
            if mode == "image":
                # Only photos make this cross-modal: text and fused vectors contain the title itself.
                result["title_to_image_r10"][mode] = recall_at_k(title_queries[heldout], vectors[heldout])
            if query_vecs is not None:
                result["attribute_query_p10"][mode] = attribute_precision(
                    query_vecs, [c for _, c in queries], vectors, products
                )
    return result

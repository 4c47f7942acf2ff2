"""`shopguide eval catalog`: product-vector quality with baselines side by side."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from training.align import HELDOUT_FRACTION, is_heldout
from training.catalog import load_catalog
from training.evaluate import evaluate_vectors
from training.vectors import EncoderConfig, Towers, build_product_vectors

# Order of the table's columns: baselines first, then the aligned spaces the index serves.
COLUMNS = ("random", "raw_cnn", "raw_title", "image", "text", "fused")


def _eval_heads_file(data_dir: Path, product_ids: list[str]) -> Path:
    # Heads for evaluation are keyed by the exact training set, so an eval never reuses heads that
    # were trained on another catalog slice (e.g. the demo's --limit ingest).
    key = hashlib.sha256("\n".join(sorted(p for p in product_ids if not is_heldout(p))).encode()).hexdigest()[
        :10
    ]
    return data_dir / "eval" / f"alignment-{key}.pt"


def run_catalog_eval(
    catalog_dir: Path,
    data_dir: Path,
    limit: int | None = None,
    encoder_config: EncoderConfig | None = None,
    retrain_heads: bool = False,
    progress: bool = True,
) -> dict:
    """Metrics for every mode plus baselines (random, frozen CNN, frozen title embedding).

    Similar items: P@10 of same articleType / subCategory over the whole catalog (exact search).
    Cross-modal: each held-out product's title as a text query against held-out product photos.
    Attribute queries: "{baseColour} {gender} {articleType}" for combinations with >= 10 products."""
    towers = Towers(encoder_config or EncoderConfig())
    catalog = load_catalog(catalog_dir, limit=limit)
    heads_file = _eval_heads_file(data_dir, [p.id for p in catalog.products])
    vectors = build_product_vectors(catalog, data_dir, towers, retrain_heads, progress, heads_file=heads_file)
    heldout = np.array([is_heldout(p.id) for p in vectors.products])
    title_queries = vectors.heads.project_texts(vectors.raw_title)

    def encode_query(texts: list[str]) -> np.ndarray:
        return vectors.heads.project_texts(towers.text.encode_texts(texts))

    spaces = {
        "raw_cnn": vectors.raw_image,
        "raw_title": vectors.raw_title,
        "image": vectors.image,
        "text": vectors.text,
        "fused": vectors.fused,
    }
    by_mode = evaluate_vectors(vectors.products, spaces, encode_query, heldout, title_queries)
    return {
        "catalog": str(catalog_dir),
        "products": by_mode["products"],
        "skipped": len(vectors.skipped),
        "heldout_products": by_mode["heldout_products"],
        "heldout_fraction": HELDOUT_FRACTION,
        "attribute_queries": by_mode["attribute_queries"],
        "encoders": {
            "image": towers.image.info.id,
            "text": towers.text.info.id,
            "fused_image_weight": towers.config.fused_image_weight,
        },
        "heads": vectors.heads_metrics,
        "similar_p10_articleType": by_mode["similar_p10_articleType"],
        "similar_p10_subCategory": by_mode["similar_p10_subCategory"],
        # Headline numbers: title -> photo (the aligned image space); attribute queries on fused,
        # the default search mode. Every mode is in *_by_mode.
        "title_to_image_r10": by_mode["title_to_image_r10"].get("image"),
        "attribute_query_p10": by_mode["attribute_query_p10"].get("fused"),
        "title_to_image_r10_by_mode": by_mode["title_to_image_r10"],
        "attribute_query_p10_by_mode": by_mode["attribute_query_p10"],
    }


def print_table(result: dict) -> None:
    """One table, baselines side by side."""
    rows = [
        ("similar P@10 articleType", result["similar_p10_articleType"]),
        ("similar P@10 subCategory", result["similar_p10_subCategory"]),
        ("title -> image R@10 (held-out)", result["title_to_image_r10_by_mode"]),
        ("attribute query P@10", result["attribute_query_p10_by_mode"]),
    ]
    print(
        f"catalog {result['catalog']}: {result['products']} products "
        f"({result['heldout_products']} held out, {result['attribute_queries']} attribute queries)"
    )
    print(f"{'metric':<32}" + "".join(f"{c:>10}" for c in COLUMNS))
    for label, values in rows:
        cells = "".join(f"{values[c]:>10.4f}" if c in values else f"{'-':>10}" for c in COLUMNS)
        print(f"{label:<32}{cells}")
    print(
        "raw_cnn / raw_title: frozen features before alignment (title text only); "
        "image / text / fused: the aligned vectors the index serves"
    )


def real_vectors_for_bench(catalog_dir: Path, data_dir: Path, limit: int | None = None) -> np.ndarray | None:
    """Fused vectors of the real catalog for the HNSW recall check (None when the catalog is absent)."""
    if not (Path(catalog_dir) / "products.csv").is_file():
        return None
    towers = Towers(EncoderConfig())
    catalog = load_catalog(catalog_dir, limit=limit)
    heads_file = _eval_heads_file(data_dir, [p.id for p in catalog.products])
    return build_product_vectors(catalog, data_dir, towers, heads_file=heads_file).fused

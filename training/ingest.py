"""`shopguide ingest`: catalog -> aligned vectors -> a versioned index collection behind an alias."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from index import IndexStore, Record, VectorSpace
from training.catalog import Skipped, load_catalog
from training.vectors import EncoderConfig, ProductVectors, Towers, build_product_vectors

ALIAS = "products"  # the name queries use; it points at one concrete versioned collection
MANIFEST = "ingest.json"  # what built the live collection: encoders, fusion, heads version
UPSERT_BATCH = 256


@dataclass
class IngestSummary:
    """What an ingest run did (printed at the end, and written into the data dir)."""

    collection: str
    products_indexed: int  # points written in this run (new or changed)
    products_unchanged: int
    products_deleted: int
    products_total: int  # points in the collection afterwards
    skipped: list[Skipped]
    images_embedded: int
    image_seconds: float
    seconds: float
    alias_swapped: bool
    heads_metrics: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / self.image_seconds if self.image_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skipped"] = [asdict(s) for s in self.skipped]
        out["images_per_second"] = round(self.images_per_second, 2)
        return out


def spaces_for(vectors: ProductVectors, towers: Towers) -> list[VectorSpace]:
    """Named vectors of the collection; each carries the full recipe of its encoder as its id."""
    base = f"align[{towers.image.info.id}+{towers.text.info.id}]/{vectors.heads.version}"
    dim = vectors.heads.config.embed_dim
    return [
        VectorSpace("image", dim, base),
        VectorSpace("text", dim, base),
        VectorSpace("fused", dim, f"{base}+w{towers.config.fused_image_weight:g}"),
    ]


def collection_name(spaces: list[VectorSpace]) -> str:
    """Deterministic versioned name: the same encoders give the same collection (resumable ingest)."""
    key = json.dumps([asdict(s) for s in spaces], sort_keys=True)
    return f"{ALIAS}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _payload(vectors: ProductVectors, i: int) -> dict:
    product = vectors.products[i]
    payload = product.payload()
    # Content hashes let a re-run tell changed products from unchanged ones without re-reading vectors.
    payload["image_hash"] = vectors.image_hashes[product.id]
    payload["text_hash"] = hashlib.sha256(product.document().encode()).hexdigest()[:16]
    return payload


def run_ingest(
    catalog_dir: Path,
    store: IndexStore,
    data_dir: Path,
    limit: int | None = None,
    encoder_config: EncoderConfig | None = None,
    retrain_heads: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> IngestSummary:
    """Embed the catalog and write it to the collection for the current encoders, then point the alias.

    Re-runs touch only new or changed products; with no --limit, products gone from the catalog are
    deleted. A killed run resumes: the embedding cache and the (deterministically named) collection
    keep what was finished, and the alias only moves once the collection is complete."""
    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    towers = Towers(encoder_config or EncoderConfig())
    catalog = load_catalog(catalog_dir, limit=limit, seed=seed)
    vectors = build_product_vectors(catalog, data_dir, towers, retrain_heads=retrain_heads, progress=progress)
    spaces = spaces_for(vectors, towers)
    name = collection_name(spaces)
    index = (
        store.open_collection(name)
        if name in store.list_collections()
        else store.create_collection(name, spaces)
    )
    try:
        index.check_spaces({s.name: s for s in spaces})
        stored = {r.product_id: r.payload for r in index.get([p.id for p in vectors.products])}
        todo = [i for i, p in enumerate(vectors.products) if stored.get(p.id) != _payload(vectors, i)]
        with tqdm(total=len(todo), desc="index", unit="product", disable=not progress) as bar:
            for begin in range(0, len(todo), UPSERT_BATCH):
                batch = todo[begin : begin + UPSERT_BATCH]
                index.upsert(
                    [
                        Record(
                            vectors.products[i].id,
                            {"image": vectors.image[i], "text": vectors.text[i], "fused": vectors.fused[i]},
                            _payload(vectors, i),
                        )
                        for i in batch
                    ]
                )
                bar.update(len(batch))
        deleted = 0
        if limit is None:
            keep = {p.id for p in vectors.products}
            gone = [pid for pid in index.product_ids() if pid not in keep]
            index.delete(gone)
            deleted = len(gone)
        if todo or deleted:
            index.optimize()
        total = index.count()
    finally:
        index.close()
    swapped = store.get_alias(ALIAS) != name
    if swapped:
        store.set_alias(ALIAS, name)
    manifest = {
        "collection": name,
        "encoders": asdict(towers.config),
        "spaces": [asdict(s) for s in spaces],
        "heads_version": vectors.heads.version,
        "catalog": str(catalog_dir),
    }
    (data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return IngestSummary(
        collection=name,
        products_indexed=len(todo),
        products_unchanged=len(vectors.products) - len(todo),
        products_deleted=deleted,
        products_total=total,
        skipped=vectors.skipped,
        images_embedded=vectors.images_embedded,
        image_seconds=vectors.image_seconds,
        seconds=time.perf_counter() - start,
        alias_swapped=swapped,
        heads_metrics=vectors.heads_metrics,
    )


__all__ = ["ALIAS", "IngestSummary", "run_ingest"]

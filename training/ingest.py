"""`shopguide ingest`: catalog -> aligned vectors -> a versioned index collection behind an alias."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from index import IndexStore, Record, VectorSpace
from training.catalog import Skipped, load_catalog
from training.overrides import OverrideStore, apply_overrides
from training.vectors import EncoderConfig, ProductVectors, Towers, build_product_vectors

ALIAS = "products"  # the name queries use; it points at one concrete versioned collection
MANIFEST = "ingest.json"  # what built the live collection: encoders, fusion, heads version
# One manifest per collection (DATA_DIR/manifests/<collection>.json), written before the alias can point
# at it, so a server that follows the alias knows which encoders and heads the new collection needs.
MANIFESTS_DIR = "manifests"
ALIAS_HISTORY = "alias_history.json"  # every move of the alias, oldest first (`reembed --swap-back`)
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


def _payload(vectors: ProductVectors, i: int, overrides: dict[str, dict]) -> dict:
    product = vectors.products[i]
    payload = product.payload()
    payload.update(overrides.get(product.id, {}))  # live price/stock updates (training/overrides.py)
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
    overrides: OverrideStore | None = None,
) -> IngestSummary:
    """Embed the catalog and write it to the collection for the current encoders, then point the alias.

    Re-runs touch only new or changed products; with no --limit, products gone from the catalog are
    deleted. A killed run resumes: the embedding cache and the (deterministically named) collection
    keep what was finished, and the alias only moves once the collection is complete. Live price/stock
    updates (`overrides`, default DATA_DIR/product_overrides.db) are kept (training/overrides.py)."""
    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    towers = Towers(encoder_config or EncoderConfig())
    catalog = load_catalog(catalog_dir, limit=limit, seed=seed)
    vectors = build_product_vectors(catalog, data_dir, towers, retrain_heads=retrain_heads, progress=progress)
    spaces = spaces_for(vectors, towers)
    name = collection_name(spaces)
    written, deleted, total = write_collection(
        store,
        name,
        spaces,
        vectors,
        delete_missing=limit is None,
        progress=progress,
        overrides=overrides or OverrideStore.at(data_dir),
        complete=limit is None,
    )
    swapped, _ = point_alias(
        store, data_dir, name, build_manifest(name, towers, spaces, vectors, catalog_dir), "ingest"
    )
    return IngestSummary(
        collection=name,
        products_indexed=written,
        products_unchanged=len(vectors.products) - written,
        products_deleted=deleted,
        products_total=total,
        skipped=vectors.skipped,
        images_embedded=vectors.images_embedded,
        image_seconds=vectors.image_seconds,
        seconds=time.perf_counter() - start,
        alias_swapped=swapped,
        heads_metrics=vectors.heads_metrics,
    )


def write_collection(
    store: IndexStore,
    name: str,
    spaces: list[VectorSpace],
    vectors: ProductVectors,
    delete_missing: bool,
    progress: bool = True,
    overrides: OverrideStore | None = None,
    complete: bool = True,
) -> tuple[int, int, int]:
    """Create or reopen collection `name` and make it hold exactly `vectors` (resumable).

    Only products whose stored payload differs (new, changed, or never written before a kill) are
    upserted, in batches; with `delete_missing`, points of products not in `vectors` are deleted.
    The live price/stock updates in `overrides` are written over the catalog's values, except those the
    catalog has moved past, which are dropped for good (and, if `complete` says `vectors` is the whole
    catalog, those of products it no longer has).
    Returns (products written, products deleted, points in the collection afterwards)."""
    index = (
        store.open_collection(name)
        if name in store.list_collections()
        else store.create_collection(name, spaces)
    )
    try:
        index.check_spaces({s.name: s for s in spaces})
        # After the index opened: an ingest refused (a server holds it) drops no override.
        live = (
            overrides.reconcile({p.id: p.payload() for p in vectors.products}, complete) if overrides else {}
        )
        stored = {r.product_id: r.payload for r in index.get([p.id for p in vectors.products])}
        todo = [i for i, p in enumerate(vectors.products) if stored.get(p.id) != _payload(vectors, i, live)]
        with tqdm(total=len(todo), desc="index", unit="product", disable=not progress) as bar:
            for begin in range(0, len(todo), UPSERT_BATCH):
                batch = todo[begin : begin + UPSERT_BATCH]
                index.upsert(
                    [
                        Record(
                            vectors.products[i].id,
                            {"image": vectors.image[i], "text": vectors.text[i], "fused": vectors.fused[i]},
                            _payload(vectors, i, live),
                        )
                        for i in batch
                    ]
                )
                bar.update(len(batch))
        deleted = 0
        if delete_missing:
            keep = {p.id for p in vectors.products}
            gone = [pid for pid in index.product_ids() if pid not in keep]
            index.delete(gone)
            deleted = len(gone)
        if overrides is not None:
            # A live update made while this ran (a server on a Qdrant server's live collection) may
            # have been overwritten by a payload computed before it: it is in the file, so write it again.
            apply_overrides(index, overrides.values())
        if todo or deleted:
            index.optimize()
        return len(todo), deleted, index.count()
    finally:
        index.close()


def build_manifest(
    name: str, towers: Towers, spaces: list[VectorSpace], vectors: ProductVectors, catalog_dir: Path
) -> dict:
    """What a server needs to serve collection `name`: the query towers, the spaces and the heads."""
    return {
        "collection": name,
        # Where this run's towers ran (`device`) is not part of the collection's recipe.
        "encoders": {k: v for k, v in asdict(towers.config).items() if k != "device"},
        "spaces": [asdict(s) for s in spaces],
        "heads_version": vectors.heads.version,
        "catalog": str(catalog_dir),
    }


def manifest_path(data_dir: Path, collection: str) -> Path:
    """DATA_DIR/manifests/<collection>.json: the manifest of one collection, live or not."""
    return data_dir / MANIFESTS_DIR / f"{collection}.json"


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so a reader (a server following the alias) sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_alias_history(data_dir: Path) -> list[dict]:
    """Every recorded move of the alias, oldest first: {at, alias, from, to, action}."""
    path = data_dir / ALIAS_HISTORY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def point_alias(
    store: IndexStore, data_dir: Path, name: str, manifest: dict, action: str
) -> tuple[bool, str | None]:
    """Make `name` the live collection: its manifest first, then the alias, then DATA_DIR/ingest.json.

    The order matters to a server that follows the alias: whatever it sees the alias point at already
    has its manifest (and, written earlier, its heads). Returns (alias moved, the previous target)."""
    write_json_atomic(manifest_path(data_dir, name), manifest)
    previous = store.get_alias(ALIAS)
    moved = previous != name
    if moved:
        store.set_alias(ALIAS, name)
        history = read_alias_history(data_dir)
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        history.append({"at": at, "alias": ALIAS, "from": previous, "to": name, "action": action})
        write_json_atomic(data_dir / ALIAS_HISTORY, history)
    write_json_atomic(data_dir / MANIFEST, manifest)
    return moved, previous


__all__ = ["ALIAS", "IngestSummary", "point_alias", "run_ingest", "write_collection"]

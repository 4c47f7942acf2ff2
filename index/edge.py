"""Embedded backend: each collection is a qdrant-edge shard folder, aliases are pointer files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from ._common import (
    INDEXED_FIELDS,
    WRITE_BATCH,
    check_droppable,
    check_name,
    check_new_space,
    check_payload_fields,
    check_query,
    check_spaces_def,
    check_spaces_known,
    hit_payload,
    keyword_values,
    prepare_records,
    prepare_vector_updates,
    require_points,
    spaces_from_json,
    spaces_to_json,
    to_hits,
)
from .base import (
    PRODUCT_ID_KEY,
    CollectionAliasedError,
    CollectionExistsError,
    Filters,
    Hit,
    IndexError_,
    IndexInUseError,
    IndexStore,
    Record,
    SchemaMismatchError,
    UnknownCollectionError,
    UnknownProductError,
    VectorIndex,
    VectorSpace,
    point_id,
)

SPACES_FILE = "spaces.json"  # inside the shard folder, next to the engine's own edge_config.json

_SCHEMA = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}

# EdgeSettings.quantization names; only scalar int8 so far (the engine default quantile, 1.0).
QUANTIZATIONS = {"int8": lambda: qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8)}


@dataclass(frozen=True)
class EdgeSettings:
    """HNSW, optimizer and quantization knobs; None keeps the engine default.

    `hnsw_ef` and the `quantization_*` search knobs apply to every search of the store that carries
    them; the rest are fixed when a shard is created. Measured recall@10 at the defaults (m=16,
    ef=100): 0.96 on 11k MiniLM title embeddings, but only 0.17 on 100k random 256-d vectors
    (HNSW's worst case; 0.83 at hnsw_ef=1024), so measure on real vectors before tuning
    (index.bench.hnsw_recall; int8 quantization: tests/bench/bench_quantization.py).
    """

    m: int | None = None  # HNSW edges per node (engine default 16)
    ef_construct: int | None = None  # build-time candidate list; also the default search ef (default 100)
    full_scan_threshold_kb: int | None = None  # segments with fewer KB of vectors are scanned, not walked
    indexing_threshold_kb: int | None = None  # optimize() builds HNSW only for segments above this size
    hnsw_ef: int | None = None  # search-time candidate list (default = ef_construct): recall vs latency
    # "int8": scalar quantization of every vector space: a 1-byte copy of each component searched
    # first (4x less RAM than float32), the float32 originals kept for rescoring.
    quantization: str | None = None
    vectors_on_disk: bool | None = None  # float32 originals on disk (mmap), not held in RAM (default: RAM)
    quantization_rescore: bool | None = None  # re-rank int8 hits with the originals (None: engine's choice)
    quantization_oversampling: float | None = None  # int8 candidates fetched = oversampling x k (>= 1)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; known: {sorted(QUANTIZATIONS)} (or None)"
            )
        if self.quantization_oversampling is not None and self.quantization_oversampling < 1:
            raise ValueError(f"quantization_oversampling must be >= 1, got {self.quantization_oversampling}")

    def search_params(self, hnsw_ef: int | None = None) -> qe.SearchParams | None:
        """Search parameters; `hnsw_ef` overrides the store's for one call."""
        ef = hnsw_ef or self.hnsw_ef
        quantization = None
        if self.quantization_rescore is not None or self.quantization_oversampling is not None:
            quantization = qe.QuantizationSearchParams(
                rescore=self.quantization_rescore, oversampling=self.quantization_oversampling
            )
        if ef is None and quantization is None:
            return None
        return qe.SearchParams(hnsw_ef=None if ef is None else int(ef), quantization=quantization)

    def quantization_config(self) -> qe.ScalarQuantizationConfig | None:
        return None if self.quantization is None else QUANTIZATIONS[self.quantization]()

    def vector_memory(self) -> qe.Memory | None:
        if self.vectors_on_disk is None:
            return None
        return qe.Memory.Cold if self.vectors_on_disk else qe.Memory.Cached

    def hnsw_config(self) -> qe.HnswIndexConfig | None:
        if self.m is None and self.ef_construct is None and self.full_scan_threshold_kb is None:
            return None
        # The binding wants all three; fill the unset ones with the engine defaults.
        return qe.HnswIndexConfig(
            m=16 if self.m is None else self.m,
            ef_construct=100 if self.ef_construct is None else self.ef_construct,
            full_scan_threshold=10_000
            if self.full_scan_threshold_kb is None
            else self.full_scan_threshold_kb,
        )

    def optimizers(self) -> qe.EdgeOptimizersConfig | None:
        if self.indexing_threshold_kb is None:
            return None
        return qe.EdgeOptimizersConfig(indexing_threshold=self.indexing_threshold_kb)


def _in_use_error(path: Path, cause: Exception) -> IndexInUseError:
    return IndexInUseError(
        f"the index at {path} is in use by another process (for example a running `shopguide serve`): "
        "the embedded index has exactly one owner. Stop that process and retry, or send the change "
        f"through the running server's API instead. (engine said: {cause})"
    )


def _load_shard(path: Path) -> qe.EdgeShard:
    try:
        return qe.EdgeShard.load(str(path))
    except Exception as exc:  # the binding raises plain Exception; the WAL lock shows up in the text
        if "WouldBlock" in str(exc):
            raise _in_use_error(path, exc) from exc
        raise


def _atomic_write(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the folder too, so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _to_filter(filters: Filters | None, exclude_ids: Sequence[str] = ()) -> qe.Filter | None:
    must: list = []
    if filters is not None:
        for key, values in keyword_values(filters):
            must.append(qe.FieldCondition(key=key, match=qe.MatchAny(any=values)))
        if filters.min_price is not None or filters.max_price is not None:
            rng = qe.RangeFloat(
                gte=None if filters.min_price is None else float(filters.min_price),
                lte=None if filters.max_price is None else float(filters.max_price),
            )
            must.append(qe.FieldCondition(key="price", range=rng))
        if filters.in_stock is not None:
            # np.bool_, not bool: qdrant-edge-py 0.9 turns a Python bool into the integer 1/0 (bool is an
            # int subclass), which never matches a boolean payload; numpy's bool is kept as a bool.
            must.append(qe.FieldCondition(key="in_stock", match=qe.MatchValue(np.bool_(filters.in_stock))))
    must_not = [qe.HasIdCondition(point_ids={point_id(pid) for pid in exclude_ids})] if exclude_ids else []
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


class EdgeIndex(VectorIndex):
    """One collection as an embedded qdrant-edge shard, owned by this process while open."""

    def __init__(
        self,
        name: str,
        path: Path,
        shard: qe.EdgeShard,
        spaces: dict[str, VectorSpace],
        store: EdgeStore | None = None,
        settings: EdgeSettings | None = None,
    ):
        self.name = name
        self.path = path
        self.spaces = spaces
        self._shard: qe.EdgeShard | None = shard
        self._store = store
        self._settings = settings or EdgeSettings()
        self._params = self._settings.search_params()

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise IndexError_(f"collection {self.name!r} is closed; open it again from the store")
        return self._shard

    def upsert(self, records: Sequence[Record]) -> None:
        points = prepare_records(self.name, self.spaces, records)
        for start in range(0, len(points), WRITE_BATCH):
            batch = [
                qe.Point(id=p.point_id, vector=p.vector_lists(), payload=p.payload)
                for p in points[start : start + WRITE_BATCH]
            ]
            self.shard.update(qe.UpdateOperation.upsert_points(batch))

    def delete(self, product_ids: Sequence[str]) -> None:
        if product_ids:
            self.shard.update(qe.UpdateOperation.delete_points([point_id(pid) for pid in product_ids]))

    def set_payload(self, product_id: str, fields: dict) -> None:
        fields = check_payload_fields(fields)
        try:
            self.shard.update(qe.UpdateOperation.set_payload([point_id(product_id)], fields))
        except Exception as exc:
            if "No point with id" in str(exc):
                raise UnknownProductError(f"no product {product_id!r} in collection {self.name!r}") from exc
            raise

    def add_space(self, space: VectorSpace) -> None:
        if check_new_space(self.name, self.spaces, space):
            return
        try:
            # The engine rewrites its edge_config.json at once and logs the change in the WAL.
            self.shard.update(
                qe.UpdateOperation.create_dense_vector(space.name, int(space.dim), qe.Distance.Cosine)
            )
        except Exception as exc:
            # Only reachable when the engine has a vector spaces.json does not list (a crash between
            # the two writes below, retried with another dim): the engine keeps the one it has.
            if "already exists" in str(exc):
                raise SchemaMismatchError(
                    f"collection {self.name!r} already has an engine vector {space.name!r} that "
                    f"{SPACES_FILE} does not list, with parameters other than dim={space.dim}; add the "
                    f"space under a new name (engine said: {exc})"
                ) from exc
            raise
        spaces = {**self.spaces, space.name: space}
        # Engine first, spaces.json second: a crash in between leaves a vector nobody writes to, and a
        # retry of add_space finishes the job (creating an identical engine vector is a no-op).
        _atomic_write(self.path / SPACES_FILE, json.dumps(spaces_to_json(spaces), indent=1))
        self.spaces = spaces

    def drop_space(self, name: str) -> None:
        if not check_droppable(self.name, self.spaces, name):
            return
        spaces = {k: v for k, v in self.spaces.items() if k != name}
        # Metadata first, engine second: a crash in between leaves an engine vector nobody reads, and
        # add_space of that name again re-creates it (an identical engine vector is a no-op).
        _atomic_write(self.path / SPACES_FILE, json.dumps(spaces_to_json(spaces), indent=1))
        self.spaces = spaces
        self.shard.update(qe.UpdateOperation.delete_vector_name(name))

    def update_vectors(self, vectors: dict[str, dict[str, np.ndarray]]) -> None:
        updates = prepare_vector_updates(self.name, self.spaces, vectors)
        require_points(
            self.name, updates, lambda ids: {str(r.id) for r in self.shard.retrieve(ids, False, False)}
        )
        for start in range(0, len(updates), WRITE_BATCH):
            batch = [
                qe.PointVectors(u.point_id, u.vector_lists()) for u in updates[start : start + WRITE_BATCH]
            ]
            self.shard.update(qe.UpdateOperation.update_vectors(batch))

    def _request(
        self,
        space: str,
        row: np.ndarray,
        k: int,
        flt: qe.Filter | None,
        hnsw_ef: int | None = None,
        with_vectors: Sequence[str] = (),
    ) -> qe.QueryRequest:
        return qe.QueryRequest(
            limit=int(k),
            query=qe.Query.Nearest(row.tolist(), using=space),
            filter=flt,
            with_payload=True,
            with_vector=list(with_vectors) if with_vectors else None,
            params=self._settings.search_params(hnsw_ef) if hnsw_ef else self._params,
        )

    def search(
        self,
        space: str,
        vector: np.ndarray,
        k: int = 10,
        filters: Filters | None = None,
        exclude_ids: Sequence[str] = (),
        hnsw_ef: int | None = None,
        with_vectors: Sequence[str] = (),
    ) -> list[Hit]:
        row = check_query(self.name, self.spaces, space, vector, k)  # (1, dim)
        if row.shape[0] != 1:
            raise ValueError(f"search takes one vector, got {row.shape[0]}; use search_batch")
        check_spaces_known(self.name, self.spaces, with_vectors)
        request = self._request(space, row[0], k, _to_filter(filters, exclude_ids), hnsw_ef, with_vectors)
        return to_hits(self.shard.query(request), with_vectors)

    def search_batch(
        self,
        space: str,
        vectors: np.ndarray,
        k: int = 10,
        filters: Filters | None = None,
        hnsw_ef: int | None = None,
    ) -> list[list[Hit]]:
        matrix = check_query(self.name, self.spaces, space, vectors, k)  # (n, dim)
        flt = _to_filter(filters)
        # One query_batch call: the engine plans the batch as a whole and shares segment passes.
        batch = qe.QueryBatchRequest([self._request(space, row, k, flt, hnsw_ef) for row in matrix])
        return [to_hits(points) for points in self.shard.query_batch(batch)]

    def similarity(self, space: str, vector: np.ndarray, product_ids: Sequence[str]) -> dict[str, float]:
        row = check_query(self.name, self.spaces, space, vector, 1)[0]
        ids = {point_id(pid): pid for pid in product_ids}
        if not ids:
            return {}
        request = qe.QueryRequest(
            limit=len(ids),
            query=qe.Query.Nearest(row.tolist(), using=space),
            filter=qe.Filter(must=[qe.HasIdCondition(point_ids=set(ids))]),
            with_payload=False,
            params=qe.SearchParams(exact=True),  # every listed point, not an HNSW approximation
        )
        return {ids[str(p.id)]: float(p.score) for p in self.shard.query(request)}

    def get(self, product_ids: Sequence[str], with_vectors: bool | Sequence[str] = False) -> list[Record]:
        unique = list(dict.fromkeys(product_ids))
        if not unique:
            return []
        found = {}
        selector = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        for rec in self.shard.retrieve([point_id(pid) for pid in unique], True, selector):
            pid, payload = hit_payload(rec.payload)
            vectors = {}
            stored = rec.vector if with_vectors else None  # each access converts the whole map again
            if stored:
                vectors = {name: np.asarray(vec, dtype=np.float32) for name, vec in stored.items()}
            found[pid] = Record(product_id=pid, vectors=vectors, payload=payload)
        return [found[pid] for pid in product_ids if pid in found]

    def count(self) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def product_ids(self) -> Iterator[str]:
        offset = None
        while True:
            records, offset = self.shard.scroll(
                qe.ScrollRequest(offset=offset, limit=1000, with_payload=[PRODUCT_ID_KEY], with_vector=False)
            )
            for rec in records:
                yield (rec.payload or {}).get(PRODUCT_ID_KEY, str(rec.id))
            if offset is None:
                return

    def optimize(self) -> None:
        # Blocks until the engine has nothing left to do: builds HNSW for segments above the
        # indexing threshold and merges small segments.
        self.shard.optimize()

    def info(self) -> dict:
        """Engine statistics: points, segments, vectors already in HNSW, payload-indexed fields."""
        info = self.shard.info()
        return {
            "points": info.points_count,
            "segments": info.segments_count,
            "indexed_vectors": info.indexed_vectors_count,
            "payload_indexes": sorted(info.payload_schema),
        }

    def close(self) -> None:
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        try:
            shard.flush()
        finally:
            shard.close()
            if self._store is not None:
                self._store._forget(self.name, self)


class EdgeStore(IndexStore):
    """Collections as shard folders under DATA_DIR/collections/, aliases as files under DATA_DIR/aliases/.

    One process owns a shard while it has it open (the engine locks its WAL); a second process,
    or a second EdgeStore in this process, gets IndexInUseError. Within one store, opening an
    open collection again returns the same EdgeIndex.
    """

    def __init__(self, data_dir: str | Path, settings: EdgeSettings | None = None):
        self.root = Path(data_dir)
        self.settings = settings or EdgeSettings()
        self._collections = self.root / "collections"
        self._aliases = self.root / "aliases"
        self._collections.mkdir(parents=True, exist_ok=True)
        self._aliases.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, EdgeIndex] = {}

    def _forget(self, name: str, index: EdgeIndex) -> None:
        if self._open.get(name) is index:
            del self._open[name]

    def _path(self, name: str) -> Path:
        return self._collections / check_name("collection", name)

    def create_collection(self, name: str, spaces: Sequence[VectorSpace]) -> EdgeIndex:
        by_name = check_spaces_def(spaces)
        path = self._path(name)
        if path.exists():
            raise CollectionExistsError(
                f"collection {name!r} already exists at {path}; pick a new versioned name "
                f"(existing: {self.list_collections()}) or drop_collection it first"
            )
        config = qe.EdgeConfig(
            vectors={
                s.name: qe.EdgeVectorParams(
                    size=int(s.dim), distance=qe.Distance.Cosine, memory=self.settings.vector_memory()
                )
                for s in spaces
            },
            hnsw_config=self.settings.hnsw_config(),
            quantization_config=self.settings.quantization_config(),
            optimizers=self.settings.optimizers(),
        )
        shard = qe.EdgeShard.create(str(path), config)
        try:
            for field_name, kind in INDEXED_FIELDS:
                shard.update(qe.UpdateOperation.create_field_index(field_name, _SCHEMA[kind]))
            # Written last: a folder without spaces.json is a creation that did not finish.
            _atomic_write(path / SPACES_FILE, json.dumps(spaces_to_json(by_name), indent=1))
        except BaseException:
            shard.close()
            shutil.rmtree(path, ignore_errors=True)
            raise
        index = EdgeIndex(name, path, shard, by_name, store=self, settings=self.settings)
        self._open[name] = index
        return index

    def open_collection(self, name: str) -> EdgeIndex:
        if name in self._open:
            return self._open[name]
        path = self._path(name)
        if not (path / SPACES_FILE).is_file():
            hint = f" ({name!r} is an alias: use open({name!r}))" if self.get_alias(name) else ""
            raise UnknownCollectionError(
                f"no collection {name!r} in {self._collections}{hint}; "
                f"collections here: {self.list_collections()}"
            )
        spaces = spaces_from_json(json.loads((path / SPACES_FILE).read_text(encoding="utf-8")))
        index = EdgeIndex(name, path, _load_shard(path), spaces, store=self, settings=self.settings)
        self._open[name] = index
        return index

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self._collections.iterdir() if (p / SPACES_FILE).is_file())

    def list_aliases(self) -> dict[str, str]:
        """Every alias and the collection it points to."""
        out = {}
        for p in self._aliases.iterdir():
            if not p.name.startswith("."):
                out[p.name] = p.read_text(encoding="utf-8").strip()
        return dict(sorted(out.items()))

    def drop_collection(self, name: str) -> None:
        path = self._path(name)
        if not path.exists():
            raise UnknownCollectionError(
                f"no collection {name!r}; collections here: {self.list_collections()}"
            )
        pointing = sorted(alias for alias, target in self.list_aliases().items() if target == name)
        if pointing:
            raise CollectionAliasedError(
                f"collection {name!r} is the target of alias(es) {pointing}; point them at another "
                "collection (set_alias) before dropping it"
            )
        if name in self._open:
            self._open[name].close()
        # Taking the WAL lock first proves no other process still serves from this folder.
        if (path / "wal").exists():
            _load_shard(path).close()
        shutil.rmtree(path)

    def get_alias(self, alias: str) -> str | None:
        path = self._aliases / check_name("alias", alias)
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def set_alias(self, alias: str, collection: str) -> None:
        check_name("alias", alias)
        if not (self._path(collection) / SPACES_FILE).is_file():
            raise UnknownCollectionError(
                f"cannot point alias {alias!r} at {collection!r}: no such collection; "
                f"collections here: {self.list_collections()}"
            )
        # Atomic rename: a reader sees the old target or the new one, never a missing or partial file.
        _atomic_write(self._aliases / alias, collection + "\n")

    def close(self) -> None:
        for index in list(self._open.values()):
            index.close()
        self._open.clear()

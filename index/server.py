"""Server backend: real Qdrant collections and aliases through qdrant-client (a URL, or ":memory:")."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

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
    IndexStore,
    Record,
    SchemaMismatchError,
    UnknownCollectionError,
    UnknownProductError,
    VectorIndex,
    VectorSpace,
    point_id,
)

# The vector spaces travel in the collection's own metadata (Qdrant >= 1.16), so no reserved point
# or side collection is needed and searches never see bookkeeping data.
METADATA_KEY = "shopguide_spaces"
# Collection metadata (where the spaces live) arrived in Qdrant 1.16; an older server drops it silently.
MIN_SERVER_VERSION = (1, 16)

_SCHEMA = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}


def _to_filter(filters: Filters | None, exclude_ids: Sequence[str] = ()) -> models.Filter | None:
    must: list = []
    if filters is not None:
        for key, values in keyword_values(filters):
            must.append(models.FieldCondition(key=key, match=models.MatchAny(any=values)))
        if filters.min_price is not None or filters.max_price is not None:
            rng = models.Range(
                gte=None if filters.min_price is None else float(filters.min_price),
                lte=None if filters.max_price is None else float(filters.max_price),
            )
            must.append(models.FieldCondition(key="price", range=rng))
        if filters.in_stock is not None:
            must.append(
                models.FieldCondition(key="in_stock", match=models.MatchValue(value=bool(filters.in_stock)))
            )
    must_not = [models.HasIdCondition(has_id=[point_id(pid) for pid in exclude_ids])] if exclude_ids else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _search_params(hnsw_ef: int | None) -> models.SearchParams | None:
    return models.SearchParams(hnsw_ef=int(hnsw_ef)) if hnsw_ef else None


class ServerIndex(VectorIndex):
    """One Qdrant collection reached through the store's client."""

    def __init__(self, name: str, client: QdrantClient, spaces: dict[str, VectorSpace]):
        self.name = name
        self.spaces = spaces
        self._client: QdrantClient | None = client

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            raise IndexError_(f"collection {self.name!r} is closed; open it again from the store")
        return self._client

    def upsert(self, records: Sequence[Record]) -> None:
        points = prepare_records(self.name, self.spaces, records)
        for start in range(0, len(points), WRITE_BATCH):
            batch = [
                models.PointStruct(id=p.point_id, vector=p.vector_lists(), payload=p.payload)
                for p in points[start : start + WRITE_BATCH]
            ]
            self.client.upsert(self.name, points=batch, wait=True)

    def delete(self, product_ids: Sequence[str]) -> None:
        if product_ids:
            selector = models.PointIdsList(points=[point_id(pid) for pid in product_ids])
            self.client.delete(self.name, points_selector=selector, wait=True)

    def set_payload(self, product_id: str, fields: dict) -> None:
        fields = check_payload_fields(fields)
        pid = point_id(product_id)
        # A remote server answers an unknown id with a 404 and local mode with KeyError; checking
        # first gives one error type on both.
        if not self.client.retrieve(self.name, [pid], with_payload=False, with_vectors=False):
            raise UnknownProductError(f"no product {product_id!r} in collection {self.name!r}")
        self.client.set_payload(self.name, payload=fields, points=[pid], wait=True)

    def _reload_spaces(self) -> dict[str, VectorSpace]:
        """The spaces as the server lists them now. Other processes (every Recommender replica, a CLI)
        add and drop spaces of the same collection, so a change is computed from this, never from the
        list this handle read when it opened: that would put back a space another one dropped, or drop
        one it added (measured: two handles, each adding a space, left only the second one listed)."""
        metadata = self.client.get_collection(self.name).config.metadata or {}
        if METADATA_KEY in metadata:
            self.spaces = spaces_from_json(metadata[METADATA_KEY])
        return self.spaces

    def add_space(self, space: VectorSpace) -> None:
        if check_new_space(self.name, self._reload_spaces(), space):
            return
        config = models.DenseVectorNameConfig(
            dense=models.DenseVectorConfig(size=int(space.dim), distance=models.Distance.COSINE)
        )
        # Vector first, metadata second: a failure in between leaves a vector nobody writes to, and a
        # retry finishes the job (re-creating an identical vector is a no-op: measured in local mode).
        self.client.create_vector_name(self.name, space.name, vector_name_config=config, wait=True)
        spaces = {**self._reload_spaces(), space.name: space}
        # Metadata updates merge by top-level key, so this replaces only our key's list.
        self.client.update_collection(self.name, metadata={METADATA_KEY: spaces_to_json(spaces)})
        self.spaces = spaces

    def drop_space(self, name: str) -> None:
        if not check_droppable(self.name, self._reload_spaces(), name):
            return
        spaces = {k: v for k, v in self.spaces.items() if k != name}
        # Metadata first (as in the embedded backend): an engine vector nobody lists is harmless.
        self.client.update_collection(self.name, metadata={METADATA_KEY: spaces_to_json(spaces)})
        self.spaces = spaces
        self.client.delete_vector_name(self.name, name, wait=True)

    def update_vectors(self, vectors: dict[str, dict[str, np.ndarray]]) -> None:
        updates = prepare_vector_updates(self.name, self.spaces, vectors)
        require_points(
            self.name,
            updates,
            lambda ids: {
                str(r.id)
                for r in self.client.retrieve(self.name, ids, with_payload=False, with_vectors=False)
            },
        )
        for start in range(0, len(updates), WRITE_BATCH):
            batch = [
                models.PointVectors(id=u.point_id, vector=u.vector_lists())
                for u in updates[start : start + WRITE_BATCH]
            ]
            self.client.update_vectors(self.name, points=batch, wait=True)

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
        response = self.client.query_points(
            self.name,
            query=row[0].tolist(),
            using=space,
            limit=int(k),
            query_filter=_to_filter(filters, exclude_ids),
            with_payload=True,
            with_vectors=list(with_vectors) if with_vectors else False,
            search_params=_search_params(hnsw_ef),
        )
        return to_hits(response.points, with_vectors)

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
        params = _search_params(hnsw_ef)
        requests = [
            models.QueryRequest(
                query=row.tolist(), using=space, filter=flt, limit=int(k), with_payload=True, params=params
            )
            for row in matrix
        ]
        return [to_hits(r.points) for r in self.client.query_batch_points(self.name, requests=requests)]

    def similarity(self, space: str, vector: np.ndarray, product_ids: Sequence[str]) -> dict[str, float]:
        row = check_query(self.name, self.spaces, space, vector, 1)[0]
        ids = {point_id(pid): pid for pid in product_ids}
        if not ids:
            return {}
        response = self.client.query_points(
            self.name,
            query=row.tolist(),
            using=space,
            limit=len(ids),
            query_filter=models.Filter(must=[models.HasIdCondition(has_id=list(ids))]),
            with_payload=False,
            search_params=models.SearchParams(exact=True),  # every listed point, not an approximation
        )
        return {ids[str(p.id)]: float(p.score) for p in response.points}

    def get(self, product_ids: Sequence[str], with_vectors: bool | Sequence[str] = False) -> list[Record]:
        unique = list(dict.fromkeys(product_ids))
        if not unique:
            return []
        found = {}
        selector = with_vectors if isinstance(with_vectors, bool) else list(with_vectors)
        for rec in self.client.retrieve(
            self.name, [point_id(pid) for pid in unique], with_payload=True, with_vectors=selector
        ):
            pid, payload = hit_payload(rec.payload)
            vectors = {}
            if with_vectors and isinstance(rec.vector, dict):
                vectors = {name: np.asarray(vec, dtype=np.float32) for name, vec in rec.vector.items()}
            found[pid] = Record(product_id=pid, vectors=vectors, payload=payload)
        return [found[pid] for pid in product_ids if pid in found]

    def count(self) -> int:
        return int(self.client.count(self.name, exact=True).count)

    def product_ids(self) -> Iterator[str]:
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.name, limit=1000, offset=offset, with_payload=[PRODUCT_ID_KEY], with_vectors=False
            )
            for rec in records:
                yield (rec.payload or {}).get(PRODUCT_ID_KEY, str(rec.id))
            if offset is None:
                return

    def optimize(self, timeout_s: float = 3600.0) -> None:
        # The server builds HNSW in the background by itself; waiting for a green status gives
        # callers (benchmarks, the re-embed job before an alias swap) the same "index is built"
        # point as the embedded backend. Local mode has no HNSW and is always green.
        deadline = time.monotonic() + timeout_s
        while self.client.get_collection(self.name).status != models.CollectionStatus.GREEN:
            if time.monotonic() > deadline:
                raise TimeoutError(f"collection {self.name!r} did not finish optimizing in {timeout_s:.0f} s")
            time.sleep(0.5)

    def close(self) -> None:
        # The client belongs to the store (other collections share it); only this handle is released.
        self._client = None


class ServerStore(IndexStore):
    """Collections and aliases on a Qdrant server (url), or qdrant-client's in-process mode (":memory:")."""

    def __init__(self, url: str, api_key: str | None = None, timeout: int | None = None):
        self.url = url
        if url == ":memory:":
            self.client = QdrantClient(location=":memory:")
            return
        # check_compatibility=False: _check_server does that check itself, in the foreground, so an
        # unreachable server gives one error instead of that error plus a late warning from a thread.
        self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        try:
            self._check_server(keyed=api_key is not None)
        except BaseException:
            self.client.close()
            raise

    def _check_server(self, keyed: bool) -> None:
        """Fail now, in one line that says what to fix, if the server is unreachable, refuses the key
        or is too old; otherwise the first real call would fail with a transport traceback."""
        try:
            self.client.get_collections()  # needs the key when the server has one (`/` does not)
            version = self.client.info().version
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                why = "refused the API key" if keyed else "needs an API key"
                raise IndexError_(
                    f"the Qdrant server at {self.url} {why} (HTTP {exc.status_code}); put its key in the "
                    "environment variable named by --qdrant-api-key-env (default QDRANT_API_KEY)"
                ) from exc
            raise IndexError_(
                f"{self.url} answered HTTP {exc.status_code} {exc.reason_phrase}; "
                "is it a Qdrant server's REST address (port 6333)?"
            ) from exc
        except ResponseHandlingException as exc:
            raise IndexError_(
                f"cannot reach a Qdrant server at {self.url} ({exc.source}); start it, or fix --qdrant-url"
            ) from exc
        try:
            major_minor = tuple(int(part) for part in version.split(".")[:2])
        except ValueError:  # a development build ("dev"): nothing to compare
            return
        if major_minor < MIN_SERVER_VERSION:
            needed = ".".join(map(str, MIN_SERVER_VERSION))
            raise IndexError_(
                f"the Qdrant server at {self.url} runs {version}; shopguide keeps each collection's vector "
                f"spaces in collection metadata, which needs Qdrant >= {needed}: upgrade the server"
            )

    def open(self, alias: str) -> ServerIndex:
        # The base class's error says "run `shopguide ingest`"; against a server the command needs
        # the URL too, or it would fill the embedded index instead.
        if self.get_alias(alias) is None:
            raise UnknownCollectionError(
                f"no alias {alias!r} on {self.url} (collections there: {self.list_collections()}); "
                f"run `shopguide ingest --qdrant-url {self.url}` first"
            )
        return super().open(alias)

    def create_collection(self, name: str, spaces: Sequence[VectorSpace]) -> ServerIndex:
        by_name = check_spaces_def(spaces)
        check_name("collection", name)
        if self.client.collection_exists(name):
            raise CollectionExistsError(
                f"collection {name!r} already exists on {self.url}; pick a new versioned name "
                f"(existing: {self.list_collections()}) or drop_collection it first"
            )
        self.client.create_collection(
            name,
            vectors_config={
                s.name: models.VectorParams(size=int(s.dim), distance=models.Distance.COSINE) for s in spaces
            },
            metadata={METADATA_KEY: spaces_to_json(by_name)},
        )
        try:
            with warnings.catch_warnings():
                # Local mode warns that payload indexes do nothing there; a server uses them.
                warnings.filterwarnings("ignore", message="Payload indexes have no effect")
                for field_name, kind in INDEXED_FIELDS:
                    self.client.create_payload_index(name, field_name, field_schema=_SCHEMA[kind], wait=True)
        except BaseException:
            # A collection without its payload indexes would filter slowly forever; don't leave one.
            self.client.delete_collection(name)
            raise
        return ServerIndex(name, self.client, by_name)

    def open_collection(self, name: str) -> ServerIndex:
        if name not in self.list_collections():
            hint = f" ({name!r} is an alias: use open({name!r}))" if self.get_alias(name) else ""
            raise UnknownCollectionError(
                f"no collection {name!r} on {self.url}{hint}; collections there: {self.list_collections()}"
            )
        metadata = self.client.get_collection(name).config.metadata or {}
        if METADATA_KEY not in metadata:
            raise SchemaMismatchError(
                f"collection {name!r} on {self.url} has no {METADATA_KEY!r} metadata, so its encoders are "
                "unknown; it was not created by shopguide (re-ingest into a new collection)"
            )
        return ServerIndex(name, self.client, spaces_from_json(metadata[METADATA_KEY]))

    def list_collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def list_aliases(self) -> dict[str, str]:
        """Every alias and the collection it points to."""
        return dict(sorted((a.alias_name, a.collection_name) for a in self.client.get_aliases().aliases))

    def drop_collection(self, name: str) -> None:
        if name not in self.list_collections():
            raise UnknownCollectionError(
                f"no collection {name!r}; collections there: {self.list_collections()}"
            )
        pointing = sorted(alias for alias, target in self.list_aliases().items() if target == name)
        if pointing:
            raise CollectionAliasedError(
                f"collection {name!r} is the target of alias(es) {pointing}; point them at another "
                "collection (set_alias) before dropping it"
            )
        self.client.delete_collection(name)

    def get_alias(self, alias: str) -> str | None:
        return self.list_aliases().get(alias)

    def set_alias(self, alias: str, collection: str) -> None:
        check_name("alias", alias)
        if collection not in self.list_collections():
            raise UnknownCollectionError(
                f"cannot point alias {alias!r} at {collection!r}: no such collection; "
                f"collections there: {self.list_collections()}"
            )
        ops: list = []
        if self.get_alias(alias) is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        # One request: the server applies delete+create together, so readers never see no alias.
        self.client.update_collection_aliases(change_aliases_operations=ops)

    def close(self) -> None:
        self.client.close()

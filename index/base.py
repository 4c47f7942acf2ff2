"""The index contract: plain types and the abstract facade both Qdrant backends implement."""

from __future__ import annotations

import functools
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# Payload fields that get a payload index and can be filtered on (keyword = exact match, any-of).
KEYWORD_FIELDS: tuple[str, ...] = ("gender", "masterCategory", "subCategory", "articleType", "baseColour")
FLOAT_FIELDS: tuple[str, ...] = ("price",)
BOOL_FIELDS: tuple[str, ...] = ("in_stock",)

# The payload key that holds the catalog's product id (point ids are derived from it).
PRODUCT_ID_KEY = "product_id"

# Point ids are UUIDv5 of the product id in this namespace, so they are stable across runs and backends.
_POINT_NAMESPACE = uuid.UUID("6f1c2a0e-6b8e-5d3a-9c41-7e2f0a9b5d10")


@functools.lru_cache(maxsize=1 << 18)  # a feed maps a few hundred ids per request; uuid5 is a SHA-1 each
def point_id(product_id: str) -> str:
    """Deterministic Qdrant point id (UUIDv5 string) for a catalog product id."""
    return str(uuid.uuid5(_POINT_NAMESPACE, str(product_id)))


class IndexError_(Exception):  # noqa: N801, N818 - public name other modules already use
    """Base class for index errors (named with a trailing underscore to avoid shadowing the builtin)."""


class SchemaMismatchError(IndexError_):
    """Vectors or an encoder do not match the collection: the message names both sides."""


class IndexInUseError(IndexError_):
    """The embedded index folder is owned by another process."""


class UnknownCollectionError(IndexError_):
    """A collection or alias that does not exist; the message lists the ones that do."""


class CollectionExistsError(IndexError_):
    """create_collection on a name that is already taken."""


class CollectionAliasedError(IndexError_):
    """drop_collection on a collection an alias still points to."""


class UnknownProductError(IndexError_, KeyError):
    """A payload update for a product id that has no point (a KeyError, so `except KeyError` works)."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class InvalidVectorError(IndexError_, ValueError):
    """Vectors of the right shape but bad values (non-finite, not unit norm, not floats)."""


# How far a row's L2 norm may be from 1: float32 encoders land within ~1e-6, so 1e-3 only catches
# rows that were never normalized (cosine in Qdrant would silently renormalize them otherwise).
UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class VectorSpace:
    """One named vector of a collection: its dimension and the encoder (name/version) that fills it."""

    name: str  # "image" | "text" | "fused" | "behavior" | ...
    dim: int  # vector length; every row is float32 and L2-normalized (cosine distance)
    encoder: str  # e.g. "align-efficientnet_lite0+minilm/1"; a different encoder = a new collection


@dataclass(frozen=True)
class Filters:
    """Payload filters; all set fields must hold (AND); list fields match any of their values (OR)."""

    gender: tuple[str, ...] = ()
    masterCategory: tuple[str, ...] = ()  # noqa: N815 - catalog column names, kept verbatim
    subCategory: tuple[str, ...] = ()  # noqa: N815
    articleType: tuple[str, ...] = ()  # noqa: N815
    baseColour: tuple[str, ...] = ()  # noqa: N815
    min_price: float | None = None
    max_price: float | None = None
    in_stock: bool | None = None

    def is_empty(self) -> bool:
        return self == Filters()

    def matches(self, payload: dict) -> bool:
        """Reference semantics, used by tests and exact search: does a payload pass these filters?"""
        for key in KEYWORD_FIELDS:
            wanted = getattr(self, key)
            if wanted and payload.get(key) not in wanted:
                return False
        price = payload.get("price")
        if self.min_price is not None and (price is None or price < self.min_price):
            return False
        if self.max_price is not None and (price is None or price > self.max_price):
            return False
        if self.in_stock is not None and payload.get("in_stock") is not self.in_stock:
            return False
        return True


@dataclass
class Record:
    """A product to upsert: its id, one vector per named space, and its payload."""

    product_id: str
    vectors: dict[str, np.ndarray]  # space name -> (dim,) float32, unit norm
    payload: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A search result: plain data, never a Qdrant type."""

    product_id: str
    score: float
    payload: dict
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # only the spaces a search asked for


def check_vectors(
    collection: str,
    spaces: dict[str, VectorSpace],
    space: str,
    vectors: object,
    row_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Validate vectors for one named space at the index door; returns them as float32 (n, dim).

    `vectors` is one row (dim,) or a matrix (n, dim). Unknown space or wrong dimension raise
    SchemaMismatchError naming the space, the expected and the given dim; bad values raise
    InvalidVectorError (a ValueError) naming the row, or its entry in `row_names` (product ids).
    """
    have = spaces.get(space)
    if have is None:
        raise SchemaMismatchError(
            f"collection {collection!r} has no vector space {space!r} (it has {sorted(spaces)})"
        )
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != have.dim:
        given = arr.shape[-1] if arr.ndim >= 1 else 0
        raise SchemaMismatchError(
            f"vector space {space!r} of collection {collection!r} expects dim={have.dim} "
            f"(encoder {have.encoder!r}), but dim={given} was given (shape {arr.shape})"
        )
    if arr.dtype.kind != "f":
        raise InvalidVectorError(
            f"vector space {space!r} of collection {collection!r} takes float vectors, got dtype {arr.dtype}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)

    def which(row: int) -> str:
        return f"product {row_names[row]!r}" if row_names is not None else f"row {row}"

    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidVectorError(
            f"vector space {space!r} of collection {collection!r}: {which(row)} has NaN or inf values"
        )
    norms = np.linalg.norm(arr, axis=1)  # (n,)
    off = np.abs(norms - 1.0) > UNIT_NORM_TOL
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise InvalidVectorError(
            f"vector space {space!r} of collection {collection!r}: {which(row)} has L2 norm "
            f"{norms[row]:.6f}, but rows must be unit norm (|norm - 1| <= {UNIT_NORM_TOL}); "
            "normalize in the encoder"
        )
    return arr


class VectorIndex(ABC):
    """One collection of product points with named vectors, payload indexes and filters."""

    name: str  # the concrete (versioned) collection name, e.g. "products_v2"
    spaces: dict[str, VectorSpace]

    @abstractmethod
    def upsert(self, records: Sequence[Record]) -> None:
        """Insert or replace points (idempotent by product id); checks every vector's space and dim."""

    @abstractmethod
    def delete(self, product_ids: Sequence[str]) -> None:
        """Remove points; unknown ids are ignored."""

    @abstractmethod
    def set_payload(self, product_id: str, fields: dict) -> None:
        """Payload-only update (e.g. price, in_stock) that leaves vectors untouched."""

    @abstractmethod
    def add_space(self, space: VectorSpace) -> None:
        """Add a dense named vector (cosine) to this existing collection and store it in its space metadata.

        Existing points keep their vectors and payloads and have no vector in the new space until
        update_vectors gives them one; searches there see only points that have one. Adding a space
        that is already there with the same dim and encoder is a no-op; with another dim or encoder
        it raises SchemaMismatchError naming both.
        """

    @abstractmethod
    def drop_space(self, name: str) -> None:
        """Remove a named vector (its vectors on every point, and its metadata), e.g. the behavior space
        of a model that is no longer served. An unknown name is a no-op, so a retried drop is safe;
        dropping a collection's last space raises SchemaMismatchError (drop the collection instead)."""

    @abstractmethod
    def update_vectors(self, vectors: dict[str, dict[str, np.ndarray]]) -> None:
        """Set named vectors on existing points: product id -> {space: (dim,) vector}.

        Other vectors and the payload stay as they are. Validated like upsert before anything is
        written; a product id with no point raises UnknownProductError naming it, and nothing is written.
        """

    @abstractmethod
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
        """Top-k by cosine similarity in one named space, after filters and exclusions.

        `hnsw_ef` widens the HNSW beam for this query (recall for latency); None = the store default.
        `with_vectors`: spaces whose vectors each hit carries (one round trip instead of a `get` after)."""

    def search_batch(
        self,
        space: str,
        vectors: np.ndarray,
        k: int = 10,
        filters: Filters | None = None,
        hnsw_ef: int | None = None,
    ) -> list[list[Hit]]:
        """Top-k for each row of `vectors` (n, dim); backends may override with a batched call."""
        return [self.search(space, row, k, filters, hnsw_ef=hnsw_ef) for row in vectors]

    @abstractmethod
    def similarity(self, space: str, vector: np.ndarray, product_ids: Sequence[str]) -> dict[str, float]:
        """Cosine of `vector` to each listed product's vector in `space`, computed by the engine (no
        vectors leave it: for 200 products ~0.2 ms, against ~3 ms to read them); products without a
        vector there are left out."""

    @abstractmethod
    def get(self, product_ids: Sequence[str], with_vectors: bool | Sequence[str] = False) -> list[Record]:
        """The stored points for these ids (missing ids are left out), in the order asked.

        with_vectors: True for every space, or the names of the spaces wanted (reading one space of 50
        points costs ~0.1 ms on the embedded index, all four ~3 ms). Each record holds only the spaces
        the point has a vector in.
        """

    @abstractmethod
    def count(self) -> int:
        """Number of points."""

    @abstractmethod
    def product_ids(self) -> Iterator[str]:
        """Every stored product id (for resumable and incremental ingest)."""

    @abstractmethod
    def optimize(self) -> None:
        """Build or refresh the ANN structures (HNSW); a no-op where the backend does it by itself."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the collection."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_spaces(self, expected: dict[str, VectorSpace]) -> None:
        """Raise SchemaMismatchError naming both sides if the expected spaces differ from stored ones."""
        for name, want in expected.items():
            have = self.spaces.get(name)
            if have is None:
                raise SchemaMismatchError(
                    f"collection {self.name!r} has no vector space {name!r} "
                    f"(it has {sorted(self.spaces)}); re-embed into a new collection"
                )
            if have != want:
                raise SchemaMismatchError(
                    f"vector space {name!r} of collection {self.name!r} holds dim={have.dim} "
                    f"encoder={have.encoder!r}, but dim={want.dim} encoder={want.encoder!r} was given; "
                    "a different encoder needs a new collection (shopguide ingest --rebuild)"
                )


class IndexStore(ABC):
    """Versioned collections behind aliases, in one place (a data dir, or a Qdrant server)."""

    @abstractmethod
    def create_collection(self, name: str, spaces: Sequence[VectorSpace]) -> VectorIndex:
        """Create an empty collection with these named vectors and the standard payload indexes."""

    @abstractmethod
    def open_collection(self, name: str) -> VectorIndex:
        """Open an existing collection by its concrete name."""

    @abstractmethod
    def list_collections(self) -> list[str]:
        """Concrete collection names."""

    @abstractmethod
    def drop_collection(self, name: str) -> None:
        """Delete a collection (refuses the one an alias points to)."""

    @abstractmethod
    def get_alias(self, alias: str) -> str | None:
        """The collection an alias points to, or None."""

    @abstractmethod
    def set_alias(self, alias: str, collection: str) -> None:
        """Point an alias at a collection atomically (readers see the old or the new, never neither)."""

    def open(self, alias: str) -> VectorIndex:
        """Open the collection an alias points to."""
        target = self.get_alias(alias)
        if target is None:
            raise UnknownCollectionError(
                f"no alias {alias!r}; collections here: {self.list_collections()} "
                "(run `shopguide ingest` first)"
            )
        return self.open_collection(target)

    def close(self) -> None:  # noqa: B027 - a no-op by default; backends that hold resources override it
        """Release everything this store holds open."""

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

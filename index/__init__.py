"""Vector index: the contract in `base`, an embedded (qdrant-edge) and a server (qdrant-client) backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import (
    BOOL_FIELDS,
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    PRODUCT_ID_KEY,
    UNIT_NORM_TOL,
    CollectionAliasedError,
    CollectionExistsError,
    Filters,
    Hit,
    IndexError_,
    IndexInUseError,
    IndexStore,
    InvalidVectorError,
    Record,
    SchemaMismatchError,
    UnknownCollectionError,
    UnknownProductError,
    VectorIndex,
    VectorSpace,
    check_vectors,
    point_id,
)
from .edge import EdgeIndex, EdgeSettings, EdgeStore

if TYPE_CHECKING:
    from .server import ServerIndex, ServerStore

__all__ = [
    "BOOL_FIELDS",
    "FLOAT_FIELDS",
    "KEYWORD_FIELDS",
    "PRODUCT_ID_KEY",
    "UNIT_NORM_TOL",
    "CollectionAliasedError",
    "CollectionExistsError",
    "EdgeIndex",
    "EdgeSettings",
    "EdgeStore",
    "Filters",
    "Hit",
    "IndexError_",
    "IndexInUseError",
    "IndexStore",
    "InvalidVectorError",
    "Record",
    "SchemaMismatchError",
    "ServerIndex",
    "ServerStore",
    "UnknownCollectionError",
    "UnknownProductError",
    "VectorIndex",
    "VectorSpace",
    "check_vectors",
    "open_store",
    "point_id",
]


def __getattr__(name: str) -> object:
    # qdrant-client takes ~1 s to import; only server users should pay for it.
    if name in ("ServerIndex", "ServerStore"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    data_dir: str | Path | None = None, qdrant_url: str | None = None, api_key: str | None = None
) -> IndexStore:
    """Qdrant at `qdrant_url` if given (":memory:" = in-process), else the embedded index in data_dir."""
    if qdrant_url:
        from .server import ServerStore

        return ServerStore(qdrant_url, api_key=api_key)
    if data_dir is None:
        raise ValueError("open_store needs a data_dir (embedded index) or a qdrant_url (Qdrant server)")
    return EdgeStore(data_dir)

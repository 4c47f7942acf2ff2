"""Backend-neutral helpers shared by the edge and server backends: names, records, payloads, filters."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .base import (
    BOOL_FIELDS,
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    PRODUCT_ID_KEY,
    Filters,
    Hit,
    InvalidVectorError,
    Record,
    SchemaMismatchError,
    UnknownProductError,
    VectorSpace,
    check_vectors,
    point_id,
)

# Collection and alias names become folder and file names in the embedded backend, so both backends
# accept only this conservative set (no path separators, no leading dot).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Points per write request: bounds request size for a remote server (default limit 32 MiB) and
# the Python-side memory of one batch.
WRITE_BATCH = 512


def check_name(kind: str, name: str) -> str:
    """Reject collection/alias names that are not safe as a file name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.', not starting with '.', "
            "at most 128 characters"
        )
    return name


def check_spaces_def(spaces: Sequence[VectorSpace]) -> dict[str, VectorSpace]:
    """Validate the vector spaces of a new collection; returns them by name."""
    if not spaces:
        raise ValueError("a collection needs at least one vector space")
    by_name: dict[str, VectorSpace] = {}
    for space in spaces:
        if not isinstance(space, VectorSpace):
            raise TypeError(f"expected VectorSpace, got {type(space).__name__}")
        if space.name in by_name:
            raise ValueError(f"vector space {space.name!r} is given twice")
        if not space.name or int(space.dim) < 1 or not space.encoder:
            raise ValueError(f"vector space needs a name, dim >= 1 and an encoder, got {space!r}")
        by_name[space.name] = space
    return by_name


def spaces_to_json(spaces: dict[str, VectorSpace]) -> list[dict]:
    return [{"name": s.name, "dim": int(s.dim), "encoder": s.encoder} for s in spaces.values()]


def spaces_from_json(items: list[dict]) -> dict[str, VectorSpace]:
    return {d["name"]: VectorSpace(name=d["name"], dim=int(d["dim"]), encoder=d["encoder"]) for d in items}


def plain(value: object) -> object:
    """JSON-plain copy of a payload value: numpy scalars/arrays become Python numbers/lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class PreparedPoint:
    """One validated point, ready for either backend."""

    point_id: str
    vectors: dict[str, np.ndarray]  # space -> (dim,) float32, validated
    payload: dict  # includes PRODUCT_ID_KEY

    def vector_lists(self) -> dict[str, list[float]]:
        # Converted per write batch, not up front: 100k x 256 as Python floats would be ~800 MB.
        return {space: row.tolist() for space, row in self.vectors.items()}


def check_droppable(collection: str, spaces: dict[str, VectorSpace], name: str) -> bool:
    """True if `name` is a space to drop; False if it is not there (a no-op); raises for the last one."""
    if name not in spaces:
        return False
    if len(spaces) == 1:
        raise SchemaMismatchError(
            f"{name!r} is the only vector space of collection {collection!r}; drop the collection instead"
        )
    return True


def check_new_space(collection: str, spaces: dict[str, VectorSpace], space: VectorSpace) -> bool:
    """Validate a space to add to an existing collection; True if it is already there, identical."""
    check_spaces_def([space])
    have = spaces.get(space.name)
    if have is None:
        return False
    if have != space:
        raise SchemaMismatchError(
            f"vector space {space.name!r} of collection {collection!r} already holds dim={have.dim} "
            f"encoder={have.encoder!r}, but dim={space.dim} encoder={space.encoder!r} was given; "
            "a space keeps its encoder for life: add it under a new name, or re-embed into a new collection"
        )
    return True


def _check_named_vectors(
    collection: str,
    spaces: dict[str, VectorSpace],
    items: Sequence[tuple[str, dict[str, object]]],
    kind: str,
) -> list[dict[str, np.ndarray]]:
    """Validate (product id, {space: (dim,) vector}) items; returns each item's vectors as float32 rows.

    `kind` ("record" or "product") only words the messages, so upsert and update_vectors keep theirs.
    """
    rows_by_space: dict[str, list[np.ndarray]] = {}
    owners_by_space: dict[str, list[int]] = {}
    for i, (product_id, vectors) in enumerate(items):
        for space, vec in vectors.items():
            vec = np.asarray(vec)
            if vec.ndim != 1:
                raise SchemaMismatchError(
                    f"{kind} {product_id!r}: vector for space {space!r} must be 1-d (dim,), "
                    f"got shape {vec.shape}"
                )
            if space not in spaces:
                check_vectors(collection, spaces, space, vec)  # raises: unknown space, listing the known ones
            if vec.shape[0] != spaces[space].dim:
                # Caught here, per row, so the message can name the product.
                raise SchemaMismatchError(
                    f"{kind} {product_id!r}: vector space {space!r} of collection {collection!r} "
                    f"expects dim={spaces[space].dim} (encoder {spaces[space].encoder!r}), "
                    f"but dim={vec.shape[0]} was given"
                )
            if vec.dtype.kind != "f":
                # Checked per row: stacking with float rows would silently upcast it.
                raise InvalidVectorError(
                    f"{kind} {product_id!r}: vector space {space!r} of collection {collection!r} "
                    f"takes float vectors, got dtype {vec.dtype}"
                )
            rows_by_space.setdefault(space, []).append(vec)
            owners_by_space.setdefault(space, []).append(i)
    checked: list[dict[str, np.ndarray]] = [{} for _ in items]
    # One vectorized check per space instead of one per row: 100k-row ingests stay cheap.
    for space, rows in rows_by_space.items():
        names = [items[owner][0] for owner in owners_by_space[space]]
        matrix = check_vectors(collection, spaces, space, np.stack(rows), row_names=names)  # (n_space, dim)
        for owner, row in zip(owners_by_space[space], matrix, strict=True):
            checked[owner][space] = row
    return checked


def prepare_records(
    collection: str, spaces: dict[str, VectorSpace], records: Sequence[Record]
) -> list[PreparedPoint]:
    """Validate every record before anything is written (a bad row must not leave half a batch)."""
    points: list[PreparedPoint] = []
    for i, rec in enumerate(records):
        if not isinstance(rec.product_id, str) or not rec.product_id:
            raise ValueError(f"record {i}: product_id must be a non-empty string, got {rec.product_id!r}")
        if not rec.vectors:
            raise ValueError(f"record {rec.product_id!r} has no vectors")
        payload = plain(dict(rec.payload))
        given_id = payload.get(PRODUCT_ID_KEY, rec.product_id)
        if given_id != rec.product_id:
            raise ValueError(
                f"record {rec.product_id!r}: payload[{PRODUCT_ID_KEY!r}]={given_id!r} "
                "disagrees with product_id"
            )
        payload[PRODUCT_ID_KEY] = rec.product_id
        points.append(PreparedPoint(point_id(rec.product_id), {}, payload))
    items = [(rec.product_id, rec.vectors) for rec in records]
    for point, vectors in zip(points, _check_named_vectors(collection, spaces, items, "record"), strict=True):
        point.vectors = vectors
    return points


@dataclass
class VectorUpdate:
    """One validated update_vectors entry: the point, its product id and the named vectors to set."""

    point_id: str
    product_id: str
    vectors: dict[str, np.ndarray]  # space -> (dim,) float32, validated

    def vector_lists(self) -> dict[str, list[float]]:
        return {space: row.tolist() for space, row in self.vectors.items()}


def prepare_vector_updates(
    collection: str, spaces: dict[str, VectorSpace], vectors: dict[str, dict[str, np.ndarray]]
) -> list[VectorUpdate]:
    """Validate product id -> {space: (dim,) vector} before anything is written, like upsert."""
    if not isinstance(vectors, dict):
        raise TypeError(
            f"update_vectors takes a dict product id -> {{space: vector}}, got {type(vectors).__name__}"
        )
    for product_id, named in vectors.items():
        if not isinstance(product_id, str) or not product_id:
            raise ValueError(f"update_vectors: product ids must be non-empty strings, got {product_id!r}")
        if not isinstance(named, dict) or not named:
            raise ValueError(
                f"update_vectors: product {product_id!r} needs a non-empty dict space -> vector, "
                f"got {'an empty dict' if isinstance(named, dict) else type(named).__name__}"
            )
    items = list(vectors.items())
    checked = _check_named_vectors(collection, spaces, items, "product")
    return [
        VectorUpdate(point_id(product_id), product_id, rows)
        for (product_id, _), rows in zip(items, checked, strict=True)
    ]


def require_points(collection: str, updates: Sequence, existing: Callable[[list[str]], set[str]]) -> None:
    """Raise UnknownProductError (nothing written yet) unless every update's point exists.

    Both engines write the known points of a vector-update request before failing on an unknown one,
    so update_vectors checks ids first. `existing(point_ids)` returns the ids (as str) that exist."""
    missing: list[str] = []
    for start in range(0, len(updates), WRITE_BATCH):
        batch = updates[start : start + WRITE_BATCH]
        found = existing([u.point_id for u in batch])
        missing += [u.product_id for u in batch if u.point_id not in found]
    if missing:
        more = f" ({len(missing)} unknown ids, first ones {list(missing[:5])})" if len(missing) > 1 else ""
        raise UnknownProductError(
            f"no product {missing[0]!r} in collection {collection!r}{more}; nothing was written. "
            "update_vectors only adds vectors to existing points: upsert new products first"
        )


def check_query(
    collection: str, spaces: dict[str, VectorSpace], space: str, vectors: object, k: int
) -> np.ndarray:
    """Validate a search: the vectors as float32 (n, dim), and k."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return check_vectors(collection, spaces, space, vectors)


def check_spaces_known(collection: str, spaces: dict[str, VectorSpace], wanted: Sequence[str]) -> None:
    """Vectors asked for by name must be of spaces the collection has (a typo is an error, not {})."""
    if isinstance(wanted, str):
        raise TypeError(f"with_vectors takes a sequence of space names, got the string {wanted!r}")
    unknown = [name for name in wanted if name not in spaces]
    if unknown:
        raise SchemaMismatchError(
            f"collection {collection!r} has no vector space {unknown[0]!r} (it has {sorted(spaces)})"
        )


def keyword_values(filters: Filters) -> list[tuple[str, list[str]]]:
    """The keyword filters that are set, as (field, allowed values); a bare string counts as one value."""
    out = []
    for key in KEYWORD_FIELDS:
        wanted = getattr(filters, key)
        if isinstance(wanted, str):
            wanted = (wanted,)
        if wanted:
            out.append((key, [str(v) for v in wanted]))
    return out


def hit_payload(payload: dict | None) -> tuple[str | None, dict]:
    """Split a stored payload into (product id, payload without the id key)."""
    payload = dict(payload or {})
    return payload.pop(PRODUCT_ID_KEY, None), payload


def to_hits(points: list, with_vectors: Sequence[str] = ()) -> list[Hit]:
    """Engine result points (either library's: `.id`, `.score`, `.payload`, `.vector`) -> plain hits,
    carrying the `with_vectors` spaces the point has."""
    hits = []
    for p in points:
        pid, payload = hit_payload(p.payload)
        vectors = {}
        stored = p.vector if with_vectors else None  # each access converts the whole map again
        if isinstance(stored, dict):
            vectors = {n: np.asarray(stored[n], dtype=np.float32) for n in with_vectors if n in stored}
        hits.append(
            Hit(
                product_id=pid if pid is not None else str(p.id),
                score=float(p.score),
                payload=payload,
                vectors=vectors,
            )
        )
    return hits


def check_payload_fields(fields: dict) -> dict:
    if PRODUCT_ID_KEY in fields:
        raise ValueError(f"{PRODUCT_ID_KEY!r} is the point's identity and cannot be changed by set_payload")
    return plain(dict(fields))


# Re-exported for backends that build payload indexes.
INDEXED_FIELDS = (
    [(f, "keyword") for f in KEYWORD_FIELDS]
    + [(f, "float") for f in FLOAT_FIELDS]
    + [(f, "bool") for f in BOOL_FIELDS]
)

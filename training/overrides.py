"""Price and stock set live (PATCH /products/ID, `shopguide products update`), kept so rebuilds keep them.

A live update changes the collection's payload at once, but `shopguide ingest` and `shopguide reembed`
write payloads from the catalog file. So every update is also recorded in DATA_DIR/product_overrides.db,
and both apply what is recorded to what they write; a server re-applies it to a collection it switches
to (a re-embed's swap, `reembed --swap-back`).

The file's place is configurable (`--overrides-db`, the serve config's `overrides_db`) for deployments
whose DATA_DIR is read-only to the server; ingest and reembed must then be given the same file.

An override lasts until the catalog's own value for that field changes: each one remembers the value the
catalog had when it was made, and a rebuild that reads another value there drops it (the shop's newer
catalog wins).

SQLite, not a JSON file: a shop may update stock for many products, and each update must cost the same
whatever the number recorded; its locking also serializes a server and a CLI rebuild writing at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

OVERRIDES_DB = "product_overrides.db"
FIELDS = ("price", "in_stock")  # what a live update may change (the payload-only fields)
SCHEMA = """
CREATE TABLE IF NOT EXISTS overrides (
    product_id TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,    -- JSON: the live value
    catalog TEXT NOT NULL,  -- JSON: the catalog's value when the override was made
    at TEXT NOT NULL,       -- when it was made (ISO 8601)
    PRIMARY KEY (product_id, field)
) WITHOUT ROWID
"""


class OverrideStoreError(ValueError):
    """The overrides file cannot be read or written (corrupt, unwritable, a full disk)."""


class OverrideStore:
    """The live price/stock overrides of one data dir. Each call opens its own connection, so one
    store serves a threaded server; every read-modify-write is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path  # the SQLite file (created on the first update)

    @classmethod
    def at(cls, data_dir: Path, path: Path | None = None) -> OverrideStore:
        """The store at `path`, or at its default place in `data_dir`."""
        return cls(path if path is not None else data_dir / OVERRIDES_DB)

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction, committed on success. A write one (BEGIN IMMEDIATE) waits for other writers, up
        to 30 s; a read one waits for nobody (WAL): a server switching collections reads while it holds
        every request back, and must not wait there for an ingest's write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unreadable(exc) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a 2xx for an update means it survives a power cut
            db.execute(SCHEMA)
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from exc
        finally:
            db.close()

    def _unreadable(self, exc: Exception) -> OverrideStoreError:
        # Never guess: treating it as empty would silently undo every live price and stock change.
        return OverrideStoreError(
            f"cannot use the live price/stock overrides in {self.path}: {exc}. Restore the file from a "
            "backup (deleting it reverts every live update to the catalog's values at the next rebuild)"
        )

    def read(self) -> dict[str, dict[str, dict]]:
        """Everything recorded: {product_id: {field: {"value", "catalog", "at"}}} ({} if nothing)."""
        if not self.path.is_file():
            return {}
        with self._transaction(write=False) as db:
            return self._all(db)

    @staticmethod
    def _all(db: sqlite3.Connection) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for pid, name, value, catalog, at in db.execute(
            "SELECT product_id, field, value, catalog, at FROM overrides ORDER BY product_id, field"
        ):
            out.setdefault(pid, {})[name] = {
                "value": json.loads(value),
                "catalog": json.loads(catalog),
                "at": at,
            }
        return out

    def values(self) -> dict[str, dict]:
        """{product_id: {field: value}}: what to write over the catalog's payloads."""
        return {pid: {f: o["value"] for f, o in fields.items()} for pid, fields in self.read().items()}

    def record(self, product_id: str, fields: dict, current: dict) -> None:
        """Remember a live update of `fields` on a product whose payload is `current` right now.

        A field without an override yet takes `current` as the catalog's value (nothing else changes it
        between rebuilds); one that has an override keeps the catalog value it has."""
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"only {', '.join(FIELDS)} can be overridden, got {unknown}")
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._transaction() as db:
            for name, value in fields.items():
                row = db.execute(
                    "SELECT catalog FROM overrides WHERE product_id = ? AND field = ?", (product_id, name)
                ).fetchone()
                catalog = json.loads(row[0]) if row else current.get(name)
                # Kept even when it equals the catalog's value: a server switching collections
                # must write it over an older override it applied there.
                db.execute(
                    "INSERT OR REPLACE INTO overrides VALUES (?, ?, ?, ?, ?)",
                    (product_id, name, json.dumps(value), json.dumps(catalog), at),
                )

    def reconcile(self, catalog: dict[str, dict], complete: bool) -> dict[str, dict]:
        """Drop overrides the catalog has moved past; returns {product_id: {field: value}} to apply.

        `catalog` maps product id -> its payload from the catalog file. An override whose field now has
        another value in the catalog is dropped (logged), and, if `complete` (the whole catalog, no
        --limit), so is every override of a product the catalog no longer has."""
        if not self.path.is_file():
            return {}
        keep: dict[str, dict] = {}
        with self._transaction() as db:
            for pid, fields in self._all(db).items():
                for name, override in fields.items():
                    if pid not in catalog:
                        if not complete:
                            continue
                        why = "the product is not in the catalog any more"
                    elif (now := catalog[pid].get(name)) != override["catalog"]:
                        why = f"the catalog changed it from {override['catalog']!r} to {now!r}"
                    else:
                        keep.setdefault(pid, {})[name] = override["value"]
                        continue
                    log.info(
                        "live %s of %s (%r, set %s) dropped: %s",
                        name,
                        pid,
                        override["value"],
                        override["at"],
                        why,
                    )
                    db.execute("DELETE FROM overrides WHERE product_id = ? AND field = ?", (pid, name))
        return keep


def apply_overrides(index, overrides: dict[str, dict]) -> int:
    """Write `overrides` ({product_id: {field: value}}) into the payloads of `index` where they differ;
    products the collection does not hold are skipped. Returns how many payloads changed."""
    if not overrides:
        return 0
    changed = 0
    for record in index.get(list(overrides)):
        fields = overrides[record.product_id]
        if any(record.payload.get(name) != value for name, value in fields.items()):
            index.set_payload(record.product_id, fields)
            changed += 1
    return changed


__all__ = ["FIELDS", "OVERRIDES_DB", "OverrideStore", "OverrideStoreError", "apply_overrides"]

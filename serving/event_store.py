"""The event store behind `POST /events`: shopper events in an embedded SQLite database (WAL, durable)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from encoders.sequence import EVENT_TYPES
from training.events import Event, EventError

log = logging.getLogger("shopguide.event_store")

SCHEMA_VERSION = 3  # stored in PRAGMA user_version; bump it (and migrate) when the schema or weights change
BUSY_TIMEOUT_MS = 5000  # how long a writer waits for another process (e.g. the CLI) to finish its write
# Popularity weight per event type: deeper intent counts more. Search events have no product and no weight.
# The weights live in the database's triggers, so changing them means a new SCHEMA_VERSION and a rebuild.
POPULARITY_WEIGHTS = {"view": 1.0, "click": 2.0, "cart": 4.0, "purchase": 8.0}
# How much an event on a served result counts as engagement with the module that served it (a view is
# not engagement: opening a product page is what a click already did).
ENGAGEMENT_WEIGHTS = {"click": 1.0, "cart": 2.0, "purchase": 4.0}


class EventStoreError(RuntimeError):
    """The store cannot be opened or used as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class Impression:
    """One module served to a user (a product page's "similar", "for_you", ...), by its request_id."""

    request_id: str
    user_id: str
    module: str
    ts: float


@dataclass(frozen=True)
class ModuleStats:
    """What a module earned: how often it was served and the weighted engagement with what it served."""

    impressions: int
    engagement: float  # sum of ENGAGEMENT_WEIGHTS over events whose request_id is one of its impressions


@dataclass(frozen=True)
class FeedItem:
    """One served feed slot as logged (see serving/explore.py for what the fields mean to a policy)."""

    request_id: str  # the feed response's; events carrying it (and the same user) are this slate's
    user_id: str
    position: int  # 0-based slot in the slate
    product_id: str  # what was shown
    propensity: float  # P(the logging policy shows product_id at this position | the slot's candidates)
    greedy_product_id: str  # what the model alone would have shown there
    candidates: int  # products the slot chose from (1 = no exploration)
    policy: str  # the logging policy spec: "greedy", "epsilon:0.1", "thompson"
    model_version: str  # the model that ranked the slate
    arm: str | None  # the A/B arm ("A", "B"), None when no test ran
    ts: float
    # Read back only (writes ignore them): an event of that type with this request_id, product and user.
    clicked: bool = False
    purchased: bool = False


@dataclass(frozen=True)
class AddResult:
    """What `add` did with a batch."""

    accepted: int  # new events stored
    duplicates: int  # events whose event_id was already stored (idempotent re-sends); not stored again


class EventStore(ABC):
    """Where shopper events live; a small interface so a server database can replace SQLite later."""

    @abstractmethod
    def add(self, events: Sequence[Event]) -> AddResult:
        """Store a batch: all of it or none of it, durable when this returns. Idempotent by event_id."""

    @abstractmethod
    def history(self, user_id: str, limit: int | None = None) -> list[Event]:
        """The user's events oldest -> newest; with `limit`, the last `limit` of them (still oldest first)."""

    @abstractmethod
    def recent(self, user_id: str, limit: int = 50) -> list[Event]:
        """The user's last `limit` events, newest first."""

    @abstractmethod
    def purchased(self, user_id: str) -> set[str]:
        """Product ids the user has purchased."""

    def delete_user(self, user_id: str) -> int:
        """Remove all the user's events (and their share of popularity) and impressions; returns how many
        events were removed."""
        return self.forget_user(user_id)[0]

    @abstractmethod
    def forget_user(self, user_id: str) -> tuple[int, int]:
        """Remove the user's events, impressions and served feed items in one transaction; returns
        (events, impressions) (module impressions; feed items are not counted)."""

    @abstractmethod
    def add_feed_items(self, items: Sequence[FeedItem]) -> None:
        """Log served feed slots in one write (idempotent by request_id and position). Durable against a
        killed process, not against power loss (a log is not a fact a client was promised)."""

    @abstractmethod
    def feed_items(self, batch: int = 10_000) -> Iterator[FeedItem]:
        """Every logged feed slot with `clicked` / `purchased` set, read in batches (for evaluation)."""

    @abstractmethod
    def feed_product_stats(self, product_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """product_id -> (feed impressions, impressions clicked) for those that were served."""

    @abstractmethod
    def add_impressions(self, impressions: Sequence[Impression]) -> None:
        """Record served modules (idempotent by request_id), durable when this returns."""

    @abstractmethod
    def module_stats(self, user_id: str | None = None) -> dict[str, ModuleStats]:
        """module -> its impressions and engagement, for one user or (None) over all users. Engagement
        counts a user's events on requests served to that same user."""

    @abstractmethod
    def popular(
        self,
        limit: int = 100,
        since: float | None = None,
        filter_ids: Callable[[str], bool] | None = None,
    ) -> list[tuple[str, float]]:
        """(product_id, score) by weighted interaction score, most popular first.

        `since`: count only events with ts >= since. `filter_ids`: keep only products it returns True for.
        """

    @abstractmethod
    def co_occurring(
        self,
        product_id: str,
        limit: int = 20,
        types: Sequence[str] | None = None,
        exclude_user: str | None = None,
    ) -> list[tuple[str, int]]:
        """(product_id, users) for products that users of `product_id` also interacted with, most first.

        `types`: count only events of these types, on both sides (("cart", "purchase") is "bought
        together"). `exclude_user`: leave this user out (a shopper is not their own evidence)."""

    @abstractmethod
    def iter_events(self, batch: int = 10_000) -> Iterator[Event]:
        """Every stored event in arrival order, read in batches (a training snapshot)."""

    @abstractmethod
    def count(self) -> int:
        """How many events are stored."""

    @abstractmethod
    def users(self) -> int:
        """How many distinct users have events stored."""

    @abstractmethod
    def close(self) -> None:
        """Release the database; idempotent."""

    def __enter__(self) -> EventStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _weight_case(column: str) -> str:
    """SQL CASE giving an event's popularity weight (built from POPULARITY_WEIGHTS, not hand-copied)."""
    arms = " ".join(f"WHEN '{name}' THEN {weight!r}" for name, weight in POPULARITY_WEIGHTS.items())
    return f"CASE {column} {arms} ELSE 0.0 END"


_WEIGHTED_TYPES = ", ".join(f"'{name}'" for name in POPULARITY_WEIGHTS)
_ALL_TYPES = ", ".join(f"'{name}'" for name in EVENT_TYPES)

# product_stats is kept equal to "sum of weights over stored events" by triggers, so the invariant holds
# inside every transaction whoever writes (this class, a CLI, a migration) and popular() is an index read.
_SCHEMA = f"""
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order; AUTOINCREMENT never reuses a deleted seq
    event_id TEXT UNIQUE NOT NULL,
    user_id TEXT NOT NULL,
    product_id TEXT,
    type TEXT NOT NULL CHECK (type IN ({_ALL_TYPES})),
    query TEXT,
    request_id TEXT,
    ts REAL NOT NULL,        -- client time; the server's receive time when the client sent none
    received REAL NOT NULL,  -- server time the batch was stored
    CHECK (product_id IS NOT NULL OR type = 'search')
);
CREATE INDEX events_user_seq ON events (user_id, seq);
CREATE INDEX events_product_user ON events (product_id, user_id);  -- also serves co_occurring
CREATE INDEX events_ts ON events (ts);
CREATE TABLE product_stats (
    product_id TEXT PRIMARY KEY,
    score REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX product_stats_score ON product_stats (score DESC, product_id);
CREATE TRIGGER events_score_insert AFTER INSERT ON events
WHEN NEW.product_id IS NOT NULL AND NEW.type IN ({_WEIGHTED_TYPES})
BEGIN
    INSERT INTO product_stats (product_id, score) VALUES (NEW.product_id, {_weight_case("NEW.type")})
    ON CONFLICT (product_id) DO UPDATE SET score = score + excluded.score;
END;
CREATE TRIGGER events_score_delete AFTER DELETE ON events
WHEN OLD.product_id IS NOT NULL AND OLD.type IN ({_WEIGHTED_TYPES})
BEGIN
    UPDATE product_stats SET score = score - {_weight_case("OLD.type")} WHERE product_id = OLD.product_id;
    DELETE FROM product_stats WHERE product_id = OLD.product_id AND score <= 0;
END;
"""
# Version 2: which module served which request (product page impressions), so a module's engagement
# rate can be learned per user. Events find their impression through request_id.
_SCHEMA_V2 = """
CREATE TABLE served (
    request_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    module TEXT NOT NULL,
    ts REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX served_user_module ON served (user_id, module);
CREATE INDEX events_request ON events (request_id) WHERE request_id IS NOT NULL;
"""
# Version 3: every served feed slot with its propensity (exploration, off-policy evaluation, A/B).
# `clicked` / `purchased` are set by a trigger when an event of that type arrives carrying the slot's
# request_id, product and user, and feed_product_stats keeps per-product counts of feed impressions
# and clicked impressions (Thompson sampling reads them per request, so they must be an index read).
# The feed logs a slate before it answers, so its clicks come later; events that predate their row
# (replayed logs) are credited when the row is inserted.
_SCHEMA_V3 = """
CREATE TABLE feed_items (
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL CHECK (position >= 0),
    user_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    propensity REAL NOT NULL CHECK (propensity > 0 AND propensity <= 1),
    greedy_product_id TEXT NOT NULL,
    candidates INTEGER NOT NULL CHECK (candidates >= 1),
    policy TEXT NOT NULL,
    model_version TEXT NOT NULL,
    arm TEXT,
    ts REAL NOT NULL,
    clicked INTEGER NOT NULL DEFAULT 0,
    purchased INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (request_id, position)
) WITHOUT ROWID;
CREATE INDEX feed_items_user ON feed_items (user_id);
CREATE TABLE feed_product_stats (
    product_id TEXT PRIMARY KEY,
    impressions INTEGER NOT NULL,
    clicks INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER feed_items_insert AFTER INSERT ON feed_items
BEGIN
    INSERT INTO feed_product_stats (product_id, impressions, clicks) VALUES (NEW.product_id, 1, 0)
    ON CONFLICT (product_id) DO UPDATE SET impressions = impressions + 1;
    -- Events that arrived before their slot (replayed or imported logs) are credited too.
    UPDATE feed_items SET
        clicked = EXISTS (SELECT 1 FROM events WHERE request_id = NEW.request_id AND type = 'click'
                          AND product_id = NEW.product_id AND user_id = NEW.user_id),
        purchased = EXISTS (SELECT 1 FROM events WHERE request_id = NEW.request_id AND type = 'purchase'
                            AND product_id = NEW.product_id AND user_id = NEW.user_id)
    WHERE request_id = NEW.request_id AND position = NEW.position AND EXISTS (
        SELECT 1 FROM events WHERE request_id = NEW.request_id AND type IN ('click', 'purchase')
        AND product_id = NEW.product_id AND user_id = NEW.user_id
    );
END;
CREATE TRIGGER feed_items_clicked AFTER UPDATE OF clicked ON feed_items
WHEN NEW.clicked != OLD.clicked
BEGIN
    UPDATE feed_product_stats SET clicks = clicks + NEW.clicked - OLD.clicked
    WHERE product_id = NEW.product_id;
END;
CREATE TRIGGER feed_items_delete AFTER DELETE ON feed_items
BEGIN
    UPDATE feed_product_stats SET impressions = impressions - 1, clicks = clicks - OLD.clicked
    WHERE product_id = OLD.product_id;
    DELETE FROM feed_product_stats WHERE product_id = OLD.product_id AND impressions <= 0;
END;
CREATE TRIGGER events_feed_reward AFTER INSERT ON events
WHEN NEW.request_id IS NOT NULL AND NEW.type IN ('click', 'purchase')
BEGIN
    UPDATE feed_items SET clicked = 1
    WHERE NEW.type = 'click' AND request_id = NEW.request_id AND product_id = NEW.product_id
      AND user_id = NEW.user_id AND clicked = 0;
    UPDATE feed_items SET purchased = 1
    WHERE NEW.type = 'purchase' AND request_id = NEW.request_id AND product_id = NEW.product_id
      AND user_id = NEW.user_id AND purchased = 0;
END;
"""
# version -> the script that takes a store from it to the next version (run inside one transaction).
_MIGRATIONS = {1: _SCHEMA_V2, 2: _SCHEMA_V3}

_COLUMNS = "event_id, user_id, product_id, type, query, request_id, ts"
# ON CONFLICT(event_id) DO NOTHING rather than INSERT OR IGNORE: OR IGNORE also swallows NOT NULL and
# CHECK failures, so a malformed row would be silently dropped and reported as a "duplicate".
_INSERT_SQL = (
    f"INSERT INTO events ({_COLUMNS}, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_POPULAR_SQL = "SELECT product_id, score FROM product_stats ORDER BY score DESC, product_id LIMIT ? OFFSET ?"
# INDEXED BY: without ANALYZE statistics the planner prefers walking the product_id index (to skip the
# group-by sort), which reads every event; a recent window should be a short range over the ts index.
_POPULAR_SINCE_SQL = f"""
SELECT product_id, SUM({_weight_case("type")}) AS score FROM events INDEXED BY events_ts
WHERE ts >= ? AND product_id IS NOT NULL AND type IN ({_WEIGHTED_TYPES})
GROUP BY product_id ORDER BY score DESC, product_id
"""
_ENGAGEMENT_CASE = " ".join(f"WHEN '{name}' THEN {weight!r}" for name, weight in ENGAGEMENT_WEIGHTS.items())
_ENGAGED_TYPES = ", ".join(f"'{name}'" for name in ENGAGEMENT_WEIGHTS)
# Engagement joins events to impressions of the same user: a request_id is only evidence for the user
# it was served to (another user's client cannot raise or lower someone's module interest).
_MODULE_STATS_SQL = """
SELECT module, COUNT(*) FROM served {where} GROUP BY module
"""
_MODULE_ENGAGEMENT_SQL = f"""
SELECT s.module, SUM(CASE e.type {_ENGAGEMENT_CASE} ELSE 0.0 END)
FROM events AS e JOIN served AS s ON s.request_id = e.request_id AND s.user_id = e.user_id
WHERE e.request_id IS NOT NULL AND e.type IN ({_ENGAGED_TYPES}) {{and_user}}
GROUP BY s.module
"""
_INSERT_SERVED_SQL = (
    "INSERT INTO served (request_id, user_id, module, ts) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_FEED_COLUMNS = (
    "request_id, user_id, position, product_id, propensity, greedy_product_id, candidates, policy, "
    "model_version, arm, ts"
)
_INSERT_FEED_SQL = (
    f"INSERT INTO feed_items ({_FEED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (request_id, position) DO NOTHING"
)


def _co_occurring_sql(types: Sequence[str] | None, exclude_user: bool) -> str:
    """Users who touched the product (with `types`), then the other products they touched (with `types`)."""
    typed = f" AND type IN ({', '.join('?' * len(types))})" if types else ""
    others = " AND user_id != ?" if exclude_user else ""
    return f"""
WITH buyers AS (SELECT DISTINCT user_id FROM events WHERE product_id = ?{typed}{others})
SELECT e.product_id, COUNT(DISTINCT e.user_id) AS shared FROM events AS e JOIN buyers USING (user_id)
WHERE e.product_id IS NOT NULL AND e.product_id != ?{typed.replace("type", "e.type")}
GROUP BY e.product_id ORDER BY shared DESC, e.product_id LIMIT ?
"""


def _check_storable(event: Event) -> None:
    """Refuse, before the transaction starts, what Event itself lets through but a TEXT column must not."""
    if not isinstance(event, Event):
        raise TypeError(f"EventStore.add takes Event objects, got {type(event).__name__}")
    for name in ("query", "request_id"):
        value = getattr(event, name)
        if value is not None and not isinstance(value, str):
            raise EventError(f"event {event.event_id!r}: {name} must be a string, got {value!r}")


def _event(row: tuple) -> Event:
    event_id, user_id, product_id, type_, query, request_id, ts = row
    return Event(event_id, user_id, product_id, type_, query=query, request_id=request_id, ts=ts)


class SQLiteEventStore(EventStore):
    """Events in one SQLite file, WAL mode, synchronous=FULL; safe to share between threads.

    Threads: one write connection and one read connection, each used under its own lock
    (`check_same_thread=False` is safe because the lock, not the thread, owns the connection). Two
    connections because in WAL mode readers never wait for a writer's fsync: a recommendation request
    reading history is not held up by an in-flight `POST /events`. Processes: WAL lets another process
    (the CLI) open the same file; writers queue for up to BUSY_TIMEOUT_MS.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise EventStoreError(f"event store path {self.path} is a directory; give a file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EventStoreError(
                f"cannot create the folder for the event store {self.path}: {exc}; "
                "give a path in a writable folder"
            ) from exc
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()
        try:
            self._set_up()
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")  # a bug cannot write outside add's transaction
        except BaseException:
            self._writer.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so Python never opens hidden ones.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
        except sqlite3.Error as exc:
            raise EventStoreError(
                f"cannot open the event store {self.path}: {exc}; check the path exists and is writable"
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise EventStoreError(
                    f"event store {self.path}: SQLite refused WAL mode (got {mode!r}); "
                    "put the file on a local filesystem"
                )
            # FULL, not NORMAL: in WAL mode NORMAL fsyncs only at checkpoints, so an acknowledged batch
            # survives a killed process but can vanish on power loss or an OS crash. FULL fsyncs the
            # WAL on every commit (about a millisecond here), so `add` returning means it is on disk.
            conn.execute("PRAGMA synchronous = FULL")  # per connection, not stored in the file
        except sqlite3.Error as exc:
            conn.close()
            raise EventStoreError(
                f"cannot use the event store {self.path}: {exc}; "
                "check it is a shopguide event store in a writable folder"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_up(self) -> None:
        """Create the schema in a fresh file, or check the version of an existing one."""
        conn = self._writer
        try:
            # IMMEDIATE: two processes opening a fresh file at once must not both create the schema.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                    if tables:
                        raise EventStoreError(
                            f"{self.path} is a SQLite database but not a shopguide event store "
                            f"(tables {sorted(t[0] for t in tables)}); give another path"
                        )
                    self._run_script(conn, _SCHEMA + _SCHEMA_V2 + _SCHEMA_V3)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version < SCHEMA_VERSION:
                    # Same transaction as the version check: a second process opening the file waits,
                    # then finds it migrated.
                    for step in range(version, SCHEMA_VERSION):
                        self._run_script(conn, _MIGRATIONS[step])
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise EventStoreError(
                        f"event store {self.path} has schema version {version}, this code reads "
                        f"version {SCHEMA_VERSION}; it was written by a newer shopguide, so upgrade "
                        "shopguide (or give another path)"
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise EventStoreError(f"cannot set up the event store {self.path}: {exc}") from exc

    @staticmethod
    def _run_script(conn: sqlite3.Connection, script: str) -> None:
        # executescript would COMMIT our open transaction first; run statement by statement inside it.
        statements, buffer = [], ""
        for line in script.splitlines(keepends=True):
            buffer += line
            if sqlite3.complete_statement(buffer):
                statements.append(buffer)
                buffer = ""
        for statement in statements:
            conn.execute(statement)

    def add(self, events: Sequence[Event]) -> AddResult:
        events = list(events)
        for event in events:
            _check_storable(event)
        if not events:
            return AddResult(accepted=0, duplicates=0)
        received = time.time()
        rows = [
            (
                e.event_id,
                e.user_id,
                e.product_id,
                e.type,
                e.query,
                e.request_id,
                float(e.ts) if e.ts is not None else received,
                received,
            )
            for e in events
        ]
        with self._write_lock:
            conn = self._writer
            # IMMEDIATE takes the write lock up front: a deferred transaction that upgrades from read to
            # write can fail with SQLITE_BUSY at once instead of waiting out busy_timeout.
            conn.execute("BEGIN IMMEDIATE")
            try:
                # rowcount sums direct changes only (not the triggers'): 1 per new event, 0 per
                # duplicate. A re-sent event_id with different content is still a duplicate and the
                # first write wins: events are facts, and a retry must never rewrite one.
                accepted = conn.executemany(_INSERT_SQL, rows).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # some errors (disk full, I/O) already rolled back
                    conn.execute("ROLLBACK")
                raise
        return AddResult(accepted=accepted, duplicates=len(rows) - accepted)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def history(self, user_id: str, limit: int | None = None) -> list[Event]:
        # Arrival order (seq), not client ts: client clocks drift, and seq is what the index holds.
        if limit is None:
            rows = self._read(f"SELECT {_COLUMNS} FROM events WHERE user_id = ? ORDER BY seq", (user_id,))
            return [_event(row) for row in rows]
        return self.recent(user_id, limit)[::-1]

    def recent(self, user_id: str, limit: int = 50) -> list[Event]:
        if limit <= 0:
            return []
        rows = self._read(
            f"SELECT {_COLUMNS} FROM events WHERE user_id = ? ORDER BY seq DESC LIMIT ?", (user_id, limit)
        )
        return [_event(row) for row in rows]

    def purchased(self, user_id: str) -> set[str]:
        rows = self._read(
            "SELECT DISTINCT product_id FROM events WHERE user_id = ? AND type = 'purchase'", (user_id,)
        )
        return {row[0] for row in rows}

    def _write(self, work: Callable[[sqlite3.Connection], object], durable: bool = True) -> object:
        """Run `work` in one IMMEDIATE transaction on the write connection; rolled back if it fails.

        durable=False commits without an fsync (synchronous=NORMAL for this transaction: 0.02 ms
        instead of about 1 ms, p99 4 ms here): the write survives a killed process, and the next
        durable commit syncs it too, since the WAL is appended in order."""
        with self._write_lock:
            conn = self._writer
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")
        return result

    def forget_user(self, user_id: str) -> tuple[int, int]:
        # The delete trigger takes each event's weight back out of product_stats in this transaction.
        # No tombstone is kept: an event_id re-sent after the deletion is stored again as new.
        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            events = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            served = conn.execute("DELETE FROM served WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("DELETE FROM feed_items WHERE user_id = ?", (user_id,))
            return events, served

        with self._write_lock:
            # Without it SQLite only unlinks deleted rows: their bytes stay in the file's free space,
            # readable by anyone with the file. With it they are overwritten with zeros.
            self._writer.execute("PRAGMA secure_delete = ON")
        result = self._write(work)
        self._checkpoint_wal()
        return result  # type: ignore[return-value]

    def _checkpoint_wal(self) -> None:
        """Copy the write-ahead log into the database file and truncate it: until then the log still
        holds the pages as they were before a deletion, forgotten rows included."""
        with self._write_lock:
            busy, _, _ = self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # a reader in another process held the log for longer than BUSY_TIMEOUT_MS
            log.warning(
                "event store %s: the write-ahead log could not be truncated after a deletion (a reader "
                "held it); deleted rows stay in %s-wal until the next checkpoint",
                self.path,
                self.path.name,
            )

    def add_impressions(self, impressions: Sequence[Impression]) -> None:
        rows = [(i.request_id, i.user_id, i.module, float(i.ts)) for i in impressions]
        if rows:
            self._write(lambda conn: conn.executemany(_INSERT_SERVED_SQL, rows))

    def add_feed_items(self, items: Sequence[FeedItem]) -> None:
        rows = [
            (
                i.request_id,
                i.user_id,
                int(i.position),
                i.product_id,
                float(i.propensity),
                i.greedy_product_id,
                int(i.candidates),
                i.policy,
                i.model_version,
                i.arm,
                float(i.ts),
            )
            for i in items
        ]
        if rows:
            self._write(lambda conn: conn.executemany(_INSERT_FEED_SQL, rows), durable=False)

    def feed_items(self, batch: int = 10_000) -> Iterator[FeedItem]:
        # Keyset pagination on the primary key: short reads, writers are never held up for long.
        after: tuple = ("", -1)
        while True:
            rows = self._read(
                f"SELECT {_FEED_COLUMNS}, clicked, purchased FROM feed_items "
                "WHERE (request_id, position) > (?, ?) ORDER BY request_id, position LIMIT ?",
                (*after, batch),
            )
            if not rows:
                return
            for row in rows:
                yield FeedItem(*row[:11], clicked=bool(row[11]), purchased=bool(row[12]))
            after = (rows[-1][0], rows[-1][2])

    def feed_product_stats(self, product_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        ids = list(dict.fromkeys(product_ids))
        if not ids:
            return {}
        rows = self._read(
            "SELECT product_id, impressions, clicks FROM feed_product_stats "
            f"WHERE product_id IN ({', '.join('?' * len(ids))})",
            tuple(ids),
        )
        return {pid: (impressions, clicks) for pid, impressions, clicks in rows}

    def module_stats(self, user_id: str | None = None) -> dict[str, ModuleStats]:
        params: tuple = () if user_id is None else (user_id,)
        impressions = self._read(
            _MODULE_STATS_SQL.format(where="" if user_id is None else "WHERE user_id = ?"), params
        )
        engaged = dict(
            self._read(
                _MODULE_ENGAGEMENT_SQL.format(and_user="" if user_id is None else "AND e.user_id = ?"),
                params,
            )
        )
        return {module: ModuleStats(count, float(engaged.get(module, 0.0))) for module, count in impressions}

    def popular(
        self,
        limit: int = 100,
        since: float | None = None,
        filter_ids: Callable[[str], bool] | None = None,
    ) -> list[tuple[str, float]]:
        if limit <= 0:
            return []
        if since is not None:
            # A window needs the events themselves: a range scan over the ts index, then a group-by.
            rows = self._read(_POPULAR_SINCE_SQL, (float(since),))
            return [(pid, score) for pid, score in rows if filter_ids is None or filter_ids(pid)][:limit]
        if filter_ids is None:
            return [(pid, score) for pid, score in self._read(_POPULAR_SQL, (limit, 0))]
        # Page through the score index and filter outside the lock, so a filter that is slow (or that
        # calls this store) neither blocks other readers nor deadlocks. Pages read at different moments
        # can shift under concurrent adds; `seen` keeps a product from appearing twice.
        page_size = max(2 * limit, 256)
        picked: list[tuple[str, float]] = []
        seen: set[str] = set()
        offset = 0
        while len(picked) < limit:
            rows = self._read(_POPULAR_SQL, (page_size, offset))
            for pid, score in rows:
                if pid not in seen and filter_ids(pid):
                    seen.add(pid)
                    picked.append((pid, score))
                    if len(picked) == limit:
                        break
            if len(rows) < page_size:
                break
            offset += page_size
        return picked

    def co_occurring(
        self,
        product_id: str,
        limit: int = 20,
        types: Sequence[str] | None = None,
        exclude_user: str | None = None,
    ) -> list[tuple[str, int]]:
        # Cost grows with the events of everyone who touched product_id: fine per product page, not for
        # a blockbuster product on every request (cache it or precompute it offline there).
        if limit <= 0:
            return []
        types = tuple(types or ())
        unknown = sorted(set(types) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; known: {list(EVENT_TYPES)}")
        params = (product_id, *types, *((exclude_user,) if exclude_user is not None else ()))
        params += (product_id, *types, limit)
        rows = self._read(_co_occurring_sql(types, exclude_user is not None), params)
        return [(pid, n) for pid, n in rows]

    def iter_events(self, batch: int = 10_000) -> Iterator[Event]:
        # Keyset pagination on seq: each batch is one short read, so writers are never held up for long.
        after = 0
        while True:
            rows = self._read(
                f"SELECT seq, {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, batch)
            )
            if not rows:
                return
            for row in rows:
                yield _event(row[1:])
            after = rows[-1][0]

    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM events")[0][0]

    def users(self) -> int:
        return self._read("SELECT COUNT(DISTINCT user_id) FROM events")[0][0]

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._reader.close()
            self._writer.close()  # the last connection to close checkpoints the WAL into the main file

    def __repr__(self) -> str:
        return f"SQLiteEventStore({str(self.path)!r})"

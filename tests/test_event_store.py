"""The SQLite event store: idempotency, atomicity, durability across kill -9, popularity, threads."""

from __future__ import annotations

import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from serving import event_store
from serving.event_store import (
    POPULARITY_WEIGHTS,
    SCHEMA_VERSION,
    AddResult,
    EventStoreError,
    SQLiteEventStore,
)
from training.events import Event, EventError

REPO = Path(__file__).resolve().parents[1]


def view(event_id: str, user: str = "u1", product: str = "p1", type_: str = "view", ts: float = 1.0) -> Event:
    return Event(event_id, user, product, type_, ts=ts)


@pytest.fixture
def store(tmp_path: Path):
    with SQLiteEventStore(tmp_path / "events.db") as opened:
        yield opened


def test_add_counts_new_events_and_resends_as_duplicates(store: SQLiteEventStore) -> None:
    batch = [view("e1"), view("e2"), view("e3")]
    assert store.add(batch) == AddResult(accepted=3, duplicates=0)
    assert store.add(batch) == AddResult(accepted=0, duplicates=3)
    assert store.add([view("e3"), view("e4")]) == AddResult(accepted=1, duplicates=1)
    assert store.count() == 4
    assert [e.event_id for e in store.history("u1")] == ["e1", "e2", "e3", "e4"]
    assert store.popular() == [("p1", 4.0)]  # the re-sends added no popularity either


def test_repeated_event_id_inside_one_batch_counts_once(store: SQLiteEventStore) -> None:
    assert store.add([view("e1"), view("e1"), view("e2"), view("e1")]) == AddResult(2, 2)
    assert store.count() == 2


def test_resend_with_different_content_is_a_duplicate_and_first_write_wins(store: SQLiteEventStore) -> None:
    store.add([view("e1", product="p1", type_="view")])
    assert store.add([view("e1", product="p9", type_="purchase")]) == AddResult(0, 1)
    (stored,) = store.history("u1")
    assert (stored.product_id, stored.type) == ("p1", "view")
    assert store.popular() == [("p1", 1.0)]


def test_a_batch_that_fails_midway_stores_nothing(store: SQLiteEventStore) -> None:
    store.add([view("before", product="p0")])
    broken = view("bad")
    object.__setattr__(broken, "user_id", None)  # bypasses Event's checks: the database must refuse it
    batch = [view("e1", type_="purchase"), view("e2", type_="cart"), broken, view("e3")]
    with pytest.raises(sqlite3.IntegrityError):
        store.add(batch)
    assert store.count() == 1
    assert store.popular() == [("p0", 1.0)]  # the trigger's score updates were rolled back too
    # The connection is not left inside the failed transaction: the next batch goes through whole.
    assert store.add([view("e1"), view("e2")]) == AddResult(2, 0)
    assert store.count() == 3


def test_unstorable_fields_are_refused_before_anything_is_written(store: SQLiteEventStore) -> None:
    odd = Event.from_dict({"event_id": "e2", "user_id": "u1", "product_id": "p1", "type": "view"})
    object.__setattr__(odd, "request_id", {"not": "a string"})
    with pytest.raises(EventError, match="request_id"):
        store.add([view("e1"), odd])
    with pytest.raises(TypeError, match="Event objects"):
        store.add([{"event_id": "e3"}])  # type: ignore[list-item]
    assert store.count() == 0


def test_history_order_and_limit_and_recent_newest_first(store: SQLiteEventStore) -> None:
    # Arrival order, not client ts: e3 arrives last although its clock says it is oldest.
    store.add([view("e1", ts=10), view("e2", ts=20)])
    store.add([view("e3", ts=5), view("other", user="u2")])
    assert [e.event_id for e in store.history("u1")] == ["e1", "e2", "e3"]
    assert [e.event_id for e in store.history("u1", limit=2)] == ["e2", "e3"]
    assert [e.event_id for e in store.history("u1", limit=50)] == ["e1", "e2", "e3"]
    assert store.history("u1", limit=0) == []
    assert [e.event_id for e in store.recent("u1")] == ["e3", "e2", "e1"]
    assert [e.event_id for e in store.recent("u1", limit=1)] == ["e3"]
    assert store.history("nobody") == [] and store.recent("nobody") == []


def test_events_round_trip_and_missing_ts_becomes_receive_time(store: SQLiteEventStore) -> None:
    search = Event("s1", "u1", None, "search", query="red dress", request_id="r1", ts=None)
    before = time.time()
    store.add([search, view("e1", ts=123.5)])
    after = time.time()
    stored_search, stored_view = store.history("u1")
    assert stored_search.query == "red dress" and stored_search.request_id == "r1"
    assert stored_search.product_id is None and before <= stored_search.ts <= after
    assert stored_view == view("e1", ts=123.5)


def test_purchased(store: SQLiteEventStore) -> None:
    store.add(
        [
            view("e1", product="p1", type_="purchase"),
            view("e2", product="p2", type_="cart"),
            view("e3", product="p3", type_="purchase"),
            view("e4", product="p1", type_="purchase"),
            view("e5", user="u2", product="p9", type_="purchase"),
        ]
    )
    assert store.purchased("u1") == {"p1", "p3"}
    assert store.purchased("nobody") == set()


def test_popular_weights_ignores_search_and_honours_since(store: SQLiteEventStore) -> None:
    assert POPULARITY_WEIGHTS == {"view": 1.0, "click": 2.0, "cart": 4.0, "purchase": 8.0}
    store.add(
        [
            view("e1", product="p1", type_="view", ts=100),
            view("e2", product="p2", type_="purchase", ts=100),
            view("e3", product="p3", type_="click", ts=200),
            view("e4", product="p3", type_="cart", ts=300),
            Event("s1", "u1", None, "search", query="shoes", ts=300),
        ]
    )
    assert store.popular() == [("p2", 8.0), ("p3", 6.0), ("p1", 1.0)]
    assert store.popular(limit=2) == [("p2", 8.0), ("p3", 6.0)]
    assert store.popular(since=200) == [("p3", 6.0)]
    assert store.popular(since=300) == [("p3", 4.0)]
    assert store.popular(since=301) == []
    assert store.popular(since=0) == store.popular()
    assert store.popular(filter_ids=lambda pid: pid != "p2") == [("p3", 6.0), ("p1", 1.0)]
    assert store.popular(since=0, filter_ids=lambda pid: pid != "p3", limit=1) == [("p2", 8.0)]


def test_popular_filter_pages_past_the_first_page_and_may_call_the_store(store: SQLiteEventStore) -> None:
    # 600 products, scores 1..600; the filter keeps only the 3 least popular, so it must page to the end.
    store.add([view(f"e{i}-{j}", product=f"p{i}") for i in range(1, 601) for j in range(i % 5 + 1)])
    store.add([view("buy", product="p1", type_="purchase")])  # p1 scores 1 + 8 = 9
    least = {"p5", "p10", "p15"}  # i % 5 == 0: one view each
    kept = store.popular(limit=10, filter_ids=lambda pid: pid in least and pid not in store.purchased("u1"))
    assert sorted(kept) == [("p10", 1.0), ("p15", 1.0), ("p5", 1.0)]


def test_popular_without_since_is_an_index_read_not_a_scan(store: SQLiteEventStore) -> None:
    plan = " ".join(
        row[-1]
        for row in sqlite3.connect(store.path).execute(
            f"EXPLAIN QUERY PLAN {event_store._POPULAR_SQL}", (10, 0)
        )
    )
    assert "product_stats_score" in plan and "TEMP B-TREE" not in plan, plan


def test_delete_user_removes_events_and_their_popularity(store: SQLiteEventStore) -> None:
    store.add(
        [
            view("a1", user="a", product="shared", type_="purchase"),
            view("a2", user="a", product="only_a", type_="cart"),
            Event("a3", "a", None, "search", query="hats"),
            view("b1", user="b", product="shared", type_="view"),
        ]
    )
    assert store.delete_user("a") == 3
    assert store.history("a") == [] and store.purchased("a") == set()
    assert store.popular() == [("shared", 1.0)]  # only_a's row is gone, not left at score 0
    assert store.count() == 1 and store.users() == 1
    assert store.delete_user("a") == 0


def test_popularity_table_matches_a_recount_after_random_adds_resends_and_deletes(tmp_path: Path) -> None:
    rng = random.Random(7)
    types = ["view", "click", "cart", "purchase"]
    with SQLiteEventStore(tmp_path / "events.db") as store:
        for step in range(40):
            batch = [
                view(
                    f"e{rng.randrange(400)}",
                    f"u{rng.randrange(8)}",
                    f"p{rng.randrange(12)}",
                    rng.choice(types),
                )
                for _ in range(10)
            ]
            store.add(batch)
            if step % 7 == 6:
                store.delete_user(f"u{rng.randrange(8)}")
        expected: Counter[str] = Counter()
        for user in range(8):
            for event in store.history(f"u{user}"):
                expected[event.product_id] += POPULARITY_WEIGHTS[event.type]
        assert dict(store.popular(limit=1000)) == dict(+expected)
        assert store.popular(limit=1000) == store.popular(limit=1000, since=0)


def test_co_occurring_counts_users_not_events(store: SQLiteEventStore) -> None:
    store.add(
        [
            view("a1", user="a", product="p1"),
            view("a2", user="a", product="p2"),
            view("a3", user="a", product="p2", type_="purchase"),
            view("a4", user="a", product="p3"),
            view("b1", user="b", product="p1"),
            view("b2", user="b", product="p2"),
            Event("b3", "b", None, "search", query="socks"),
            view("c1", user="c", product="p2"),
            view("c2", user="c", product="p4"),
        ]
    )
    assert store.co_occurring("p1") == [("p2", 2), ("p3", 1)]
    assert store.co_occurring("p1", limit=1) == [("p2", 2)]
    assert store.co_occurring("unknown") == []


def test_reopen_keeps_everything_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folder" / "events.db"  # parents are created
    with SQLiteEventStore(path) as store:
        store.add([view("e1", type_="cart"), view("e2", user="u2")])
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._reader.execute("PRAGMA synchronous").fetchone()[0] == 2
    with SQLiteEventStore(path) as store:
        assert store.count() == 2 and store.users() == 2
        assert store.add([view("e1")]) == AddResult(0, 1)
        assert store.popular() == [("p1", 5.0)]
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    # The server and a CLI may hold the same file open; WAL allows it.
    with SQLiteEventStore(tmp_path / "events.db") as server, SQLiteEventStore(tmp_path / "events.db") as cli:
        server.add([view("e1")])
        assert cli.add([view("e1"), view("e2")]) == AddResult(1, 1)
        assert server.count() == 2 and [e.event_id for e in server.recent("u1")] == ["e2", "e1"]


def test_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SQLiteEventStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(EventStoreError, match=r"schema version 99.*upgrade shopguide") as info:
        SQLiteEventStore(path)
    assert str(path) in str(info.value)


def test_bad_paths_are_refused_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(EventStoreError, match="is a directory"):
        SQLiteEventStore(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(EventStoreError, match="cannot create the folder") as info:
        SQLiteEventStore(tmp_path / "a_file" / "events.db")
    assert "a_file" in str(info.value)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(EventStoreError, match="garbage.db"):
        SQLiteEventStore(garbage)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(EventStoreError, match="not a shopguide event store"):
        SQLiteEventStore(other)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_folder_is_refused_naming_the_path(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(EventStoreError, match="locked"):
            SQLiteEventStore(locked / "events.db")
    finally:
        locked.chmod(0o700)


def test_concurrent_adds_from_threads(store: SQLiteEventStore) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        try:
            for start in range(0, 200, 10):
                batch = [
                    view(f"w{worker}-{i}", user=f"u{worker}", product=f"p{i % 7}")
                    for i in range(start, start + 10)
                ]
                assert store.add(batch) == AddResult(10, 0)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                store.history("u0", limit=50)
                store.popular(limit=5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert store.count() == 800 and store.users() == 4
    assert sum(score for _, score in store.popular()) == 800.0
    assert [e.event_id for e in store.history("u2")] == [f"w2-{i}" for i in range(200)]


CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from serving.event_store import SQLiteEventStore
from training.events import Event

store = SQLiteEventStore(sys.argv[1])
batch = 0
while True:
    store.add([Event(f"b{batch}-{i}", f"u{i % 3}", f"p{i}", "view") for i in range(5)])
    print(f"acked {batch}", flush=True)
    batch += 1
"""


def test_every_acknowledged_batch_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    lines: queue.Queue[str] = queue.Queue()
    drain = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True)
    drain.start()
    acked = []
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 30:
            try:
                acked.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(
                    f"child acked only {len(acked)} batches: {child.stderr.read() if child.poll() else ''}"
                )
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: it is likely inside an add right now
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    drain.join(timeout=10)  # the pipe ends with the child: collect acks printed just before the kill
    while not lines.empty():
        acked.append(lines.get())
    batches = [int(line.split()[1]) for line in acked if line.startswith("acked")]
    assert batches == list(range(len(batches)))

    with SQLiteEventStore(path) as store:
        stored = Counter(e.event_id for user in ("u0", "u1", "u2") for e in store.history(user))
        assert max(stored.values()) == 1  # nothing stored twice
        for batch in batches:
            assert all(stored[f"b{batch}-{i}"] == 1 for i in range(5)), f"acked batch {batch} was lost"
        # The batch in flight at the kill is all there or not there at all.
        assert store.count() in (5 * len(batches), 5 * len(batches) + 5)

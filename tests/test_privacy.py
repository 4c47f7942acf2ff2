"""Forgetting a shopper (DELETE /users/{id}): nothing keyed by their id is left anywhere we store it.

Checked over the HTTP API with the real recommender and event store: the events, product-page
impressions, logged feed slots and the cached user vector go; every table of the SQLite store is back
to what it was before the shopper arrived (popularity counters included); no text anywhere in the
database file (or its write-ahead log) still holds the id; the next training snapshot (what
`shopguide train update` reads) and the histories built from it hold none of their events; and the
server's logs and metrics never held the id at all.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.api import ApiSettings, create_app
from serving.event_store import SQLiteEventStore
from tests.serving_fixtures import API_KEY, local_backend, serving_data_copy, tiny_ids
from tests.test_api import ok
from training.session_data import histories_from_events

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LEAVING = "privacy-leaver-7f3a9c"  # distinctive: a substring match anywhere means a trace was left
STAYING = "privacy-stayer-2b81d0"  # another shopper, whose data must stay exactly as it was
SECRET_QUERY = "zebra-striped umbrella for my sister 7f3a9c"  # a search only the leaving shopper made


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    data_dir = serving_data_copy(tmp_path_factory, "privacy")
    recommender, backend = local_backend(data_dir)
    client = TestClient(create_app(backend, ApiSettings(api_key=API_KEY)), raise_server_exceptions=False)
    yield client, recommender, data_dir
    client.close()
    recommender.close()


def _tables(db: Path) -> dict[str, list[tuple]]:
    """Every table's rows (sorted), read through a connection of our own, as another process would;
    sqlite_sequence (AUTOINCREMENT's high-water mark per table name) holds no user data."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if row[0] != "sqlite_sequence"
        ]
        return {name: sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr) for name in names}
    finally:
        conn.close()


def _rows_mentioning(tables: dict[str, list[tuple]], needle: str) -> dict[str, int]:
    """Table -> rows with a text (or blob) column containing `needle`."""
    found = {}
    for name, rows in tables.items():
        hits = [
            row
            for row in rows
            if any(
                (isinstance(v, str) and needle in v) or (isinstance(v, bytes) and needle.encode() in v)
                for v in row
            )
        ]
        if hits:
            found[name] = len(hits)
    return found


def _shop(client: TestClient, user: str, products: list[str], prefix: str, query: str = "red bag") -> None:
    """A shopper's visit: views, a search, the product page (module impressions), a click and a
    purchase credited to a page module, a cart, and two feeds (a cached user vector, feed slots)."""
    events = [
        {"event_id": f"{prefix}-v{i}", "user_id": user, "product_id": pid, "type": "view"}
        for i, pid in enumerate(products)
    ]
    events.append({"event_id": f"{prefix}-s", "user_id": user, "type": "search", "query": query})
    assert ok(client.post("/events", json={"events": events}, headers=AUTH))["accepted"] == len(events)
    page = ok(client.get(f"/products/{products[0]}/page", params={"user_id": user, "k": 3}))
    module = page["modules"][0]
    clicked = module["items"][0]["product_id"]
    follow_up = [
        {"event_id": f"{prefix}-c", "user_id": user, "product_id": clicked, "type": "click",
         "request_id": module["request_id"]},
        {"event_id": f"{prefix}-p", "user_id": user, "product_id": clicked, "type": "purchase",
         "request_id": module["request_id"]},
        {"event_id": f"{prefix}-k", "user_id": user, "product_id": products[1], "type": "cart"},
    ]  # fmt: skip
    assert ok(client.post("/events", json={"events": follow_up}, headers=AUTH))["accepted"] == 3
    for _ in range(2):
        feed = ok(client.get(f"/users/{user}/feed", params={"k": 5}))
        assert feed["personalized"] is True


def test_delete_leaves_no_trace_of_the_shopper(
    served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    client, recommender, data_dir = served
    db = data_dir / "events.db"
    caplog.set_level(logging.DEBUG)  # everything any logger says during the visit and the deletion
    _shop(client, STAYING, tiny_ids("Blue", "Watches")[:3], "stay")
    before = _tables(db)
    stayer_events = ok(client.get(f"/users/{STAYING}/events"))["events"]

    _shop(client, LEAVING, tiny_ids("Red", "Handbags")[:4], "leave", SECRET_QUERY)
    during = _tables(db)
    assert _rows_mentioning(during, LEAVING).keys() >= {"events", "served"}  # the check can fail
    assert LEAVING in recommender._user_cache  # the GRU's user vector was cached for the feed

    body = ok(client.delete(f"/users/{LEAVING}", headers=AUTH))
    assert body["deleted_events"] == 8 and body["deleted_impressions"] == 3, body
    assert body["deleted_cached_vectors"] == 1
    assert LEAVING not in recommender._user_cache

    after = _tables(db)
    assert _rows_mentioning(after, LEAVING) == {}
    assert _rows_mentioning(after, SECRET_QUERY) == {}
    # Stronger: every table is exactly as before the shopper came, aggregates included (popularity
    # and feed counters took their events back out), and the other shopper's data is untouched.
    assert after == before, {name: (len(before[name]), len(after.get(name, []))) for name in before}
    assert ok(client.get(f"/users/{STAYING}/events"))["events"] == stayer_events
    assert ok(client.get(f"/users/{LEAVING}/events"))["events"] == []
    feed = ok(client.get(f"/users/{LEAVING}/feed", params={"k": 5}))
    assert feed["personalized"] is False  # back to a cold start: nothing of them is known

    # Nothing the server logged or printed holds the shopper's id or their search (the test's own
    # HTTP client logs its URLs: not the server's), and metrics label routes, not ids.
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert server_log and LEAVING not in server_log and SECRET_QUERY not in server_log
    out, err = capfd.readouterr()
    assert LEAVING not in out + err
    assert LEAVING not in client.get("/metrics").text


def test_the_next_training_snapshot_holds_none_of_their_events(served) -> None:
    client, _, data_dir = served
    user = "privacy-trainee-5e11aa"
    _shop(client, user, tiny_ids("Green", "Tshirts")[:3], "train")
    # What `shopguide train update` (and `shopguide worker`) read: the store, opened like the CLI does.
    with SQLiteEventStore(data_dir / "events.db") as store:
        assert any(e.user_id == user for e in store.iter_events())
        assert user in histories_from_events(store.iter_events())
    ok(client.delete(f"/users/{user}", headers=AUTH))
    with SQLiteEventStore(data_dir / "events.db") as store:
        snapshot = list(store.iter_events())
    assert snapshot, "the other shoppers' events are still there"
    assert not [e for e in snapshot if e.user_id == user or user in (e.query or "")]
    assert not [e for e in snapshot if e.event_id.startswith("train-")]
    histories = histories_from_events(snapshot)
    assert user not in histories and histories  # the GRU's training data: no trace of the user


def test_the_database_files_hold_no_bytes_of_the_deleted_shopper(served) -> None:
    """SQLite leaves deleted rows in free pages and in its write-ahead log unless told otherwise: the
    raw bytes of events.db and events.db-wal must not contain the id or the search either."""
    client, _, data_dir = served
    user = "privacy-forensic-91c4e2"
    _shop(client, user, tiny_ids("Red", "Watches")[:3], "forensic", SECRET_QUERY)
    files = [p for p in data_dir.glob("events.db*") if p.is_file()]
    assert any(user.encode() in p.read_bytes() for p in files)  # it was written somewhere
    ok(client.delete(f"/users/{user}", headers=AUTH))
    leaked = {
        p.name: [needle for needle in (user, SECRET_QUERY) if needle.encode() in p.read_bytes()]
        for p in data_dir.glob("events.db*")
        if p.is_file()
    }
    assert not any(leaked.values()), f"deleted data still readable in the files: {leaked}"

"""Event schema and shopper simulator: valid, deterministic events that follow the latent tastes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.catalog import load_catalog
from training.events import Event, EventError, read_events, write_events
from training.simulator import SimulatorConfig, simulate_sessions, summarize


def test_event_schema_rejects_bad_events_with_the_field_named() -> None:
    ok = Event.from_dict({"event_id": "e1", "user_id": 7, "product_id": 101, "type": "view"})
    assert (ok.user_id, ok.product_id) == ("7", "101")
    bad = [
        ({"event_id": "e", "user_id": "u", "product_id": "p", "type": "like"}, "not one of"),
        ({"event_id": "e", "user_id": "u", "type": "search"}, "needs a non-empty query"),
        ({"event_id": "e", "user_id": "u", "type": "click"}, "needs a product_id"),
        ({"event_id": "e", "user_id": "u", "product_id": "p", "type": "view", "price": 3}, "unknown field"),
        ({"user_id": "u", "product_id": "p", "type": "view"}, "missing field"),
        ({"event_id": "e", "user_id": " ", "product_id": "p", "type": "view"}, "user_id must be"),
        ({"event_id": "e", "user_id": "u", "product_id": "p", "type": "view", "ts": float("nan")}, "finite"),
    ]
    for data, message in bad:
        with pytest.raises(EventError, match=message):
            Event.from_dict(data)


def test_events_round_trip_through_jsonl(tmp_path: Path) -> None:
    events = [
        Event("e1", "u1", None, "search", query="rote Schuhe ✓", ts=1.5),
        Event("e2", "u1", "101", "click", request_id="r9", ts=2.0),
    ]
    path = tmp_path / "events.jsonl"
    assert write_events(events, path) == 2
    assert list(read_events(path)) == events
    path.write_text(path.read_text() + '{"event_id": "e3", "user_id": "u1", "type": "nope"}\n')
    with pytest.raises(EventError, match=r"events.jsonl:3"):
        list(read_events(path))


@pytest.fixture
def simulated(tiny_catalog: Path):
    products = load_catalog(tiny_catalog).products
    events, shoppers = simulate_sessions(
        products, SimulatorConfig(shoppers=40, days=1, seed=3), progress=False
    )
    return products, events, shoppers


def test_simulator_is_deterministic_and_valid(simulated, tiny_catalog: Path) -> None:
    products, events, shoppers = simulated
    again, _ = simulate_sessions(products, SimulatorConfig(shoppers=40, days=1, seed=3), progress=False)
    assert again == events
    other, _ = simulate_sessions(products, SimulatorConfig(shoppers=40, days=1, seed=4), progress=False)
    assert other != events
    assert len({e.event_id for e in events}) == len(events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    stock = {p.id: p.in_stock for p in products}
    assert all(stock[e.product_id] for e in events if e.type == "purchase")
    summary = summarize(events)
    assert summary["events"] == len(events) and set(summary["by_type"]) <= {
        "view",
        "click",
        "cart",
        "purchase",
        "search",
    }
    assert len(shoppers) == 40


def test_simulated_behaviour_follows_latent_tastes(simulated) -> None:
    products, events, shoppers = simulated
    by_id = {p.id: p for p in products}
    taste = {s.user_id: s for s in shoppers}
    viewed = [(taste[e.user_id], by_id[e.product_id]) for e in events if e.type == "view"]
    assert viewed
    # Gender: only the shopper's own (the tiny catalog has no Unisex products).
    assert all(p.gender == s.gender for s, p in viewed if s.gender in ("Men", "Women"))
    # Article types: favourites dominate (20% of sessions explore).
    favourite_share = sum(p.articleType in s.article_types for s, p in viewed) / len(viewed)
    assert favourite_share > 0.6
    searches = Counter(e.query for e in events if e.type == "search")
    assert searches and all(q == q.lower() for q in searches)


@pytest.mark.dataset
def test_real_catalog_shoppers_prefer_their_colours(fashion_catalog: Path) -> None:
    products = load_catalog(fashion_catalog).products
    events, shoppers = simulate_sessions(
        products, SimulatorConfig(shoppers=100, days=3, seed=0), progress=False
    )
    by_id, taste = {p.id: p for p in products}, {s.user_id: s for s in shoppers}

    def favourite_share(kind: str) -> float:
        pairs = [(taste[e.user_id], by_id[e.product_id]) for e in events if e.type == kind]
        return sum(p.baseColour in s.colours for s, p in pairs) / len(pairs)

    # Views already lean to favourite colours (softmax over utility); clicks lean further (sigmoid).
    base_rate = sum(p.baseColour in s.colours for s in shoppers for p in products[:2000]) / (
        2000 * len(shoppers)
    )
    assert base_rate < favourite_share("view") < favourite_share("click")


def test_cli_simulate_sessions_writes_events_and_profiles(tiny_catalog: Path, tmp_path: Path, capsys) -> None:
    from serving.cli import main

    out = tmp_path / "sim" / "events.jsonl"
    args = ["simulate", "sessions", "--catalog", str(tiny_catalog), "--shoppers", "5", "--days", "2"]
    assert main([*args, "--seed", "1", "--out", str(out)]) == 0
    events = list(read_events(out))
    assert events and {e.user_id for e in events} <= {f"u{i:06d}" for i in range(5)}
    assert (tmp_path / "sim" / "events.jsonl.shoppers.json").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main([*args, "--shoppers", "0", "--out", str(out)]) == 2

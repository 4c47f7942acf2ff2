"""Exploration on feed slots (serving/explore.py): slot policies and propensities, the feed log in the
event store (schema version 3), and the whole loop through the HTTP API on the tiny catalog."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import integrate, stats

from serving.api import ApiSettings, LocalBackend, create_app
from serving.cli import main
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.event_store import SCHEMA_VERSION, FeedItem, SQLiteEventStore
from serving.explore import EXPLORE_REASON, ExploreSettings, explore_slate, slot_alternatives
from serving.recommend import Recommender, RecommenderConfig
from tests.serving_fixtures import API_KEY, serving_data_copy, tiny_ids
from tests.test_api import assert_recommendation, ok, post_events, views
from training.events import Event
from training.offpolicy import parse_policy
from training.online_metrics import rate_interval

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def settings(spec: str, **kwargs) -> ExploreSettings:
    return ExploreSettings(parse_policy(spec), **kwargs)


# ---- slot policies ------------------------------------------------------------------------------------
def test_greedy_keeps_the_slate_and_logs_propensity_one() -> None:
    decisions = explore_slate(["a", "b"], ["x", "y"], settings("greedy"), np.random.default_rng(0))
    assert [(d.product_id, d.greedy_product_id, d.propensity, d.candidates) for d in decisions] == [
        ("a", "a", 1.0, 1),
        ("b", "b", 1.0, 1),
    ]
    # epsilon 0 and no alternatives are greedy too (no pool is needed)
    assert not settings("epsilon:0").explores and not settings("epsilon:0.5", alternatives=0).explores


def test_alternatives_are_dealt_round_robin_and_never_shared() -> None:
    assert slot_alternatives(3, ["p0", "p1", "p2", "p3", "p4"], 2) == [["p0", "p3"], ["p1", "p4"], ["p2"]]
    with pytest.raises(ValueError, match="must not contain products of the slate"):
        explore_slate(["a"], ["a"], settings("epsilon:0.5"), np.random.default_rng(0))


def test_epsilon_greedy_shows_items_as_often_as_their_logged_propensity() -> None:
    rng = np.random.default_rng(0)
    policy = settings("epsilon:0.4", alternatives=2)
    pool = ["x0", "x1", "y0"]  # slot 0 gets x0, y0; slot 1 only x1: 3 and 2 candidates
    shown: Counter = Counter()
    logged: dict[tuple[int, str], float] = {}
    draws = 20_000
    for _ in range(draws):
        slate = explore_slate(["a", "b"], pool, policy, rng)
        assert len({d.product_id for d in slate}) == 2  # never a product twice
        for d in slate:
            shown[d.position, d.product_id] += 1
            logged[d.position, d.product_id] = d.propensity
    expected = {
        (0, "a"): 0.6 + 0.4 / 3,
        (0, "x0"): 0.4 / 3,
        (0, "y0"): 0.4 / 3,
        (1, "b"): 0.8,
        (1, "x1"): 0.2,
    }
    assert logged == pytest.approx(expected)
    for key, p in expected.items():
        assert shown[key] / draws == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / draws))


def test_thompson_propensities_match_the_exact_probability_of_winning() -> None:
    # One slot, two candidates with known Beta posteriors: P(model's pick wins) = integral f_a F_b.
    samples = 1000
    policy = settings("thompson", alternatives=1, thompson_samples=samples)
    evidence = {"a": (40, 4), "x": (100, 14)}  # (impressions, clicks)
    prior_a = (20 * 0.1, 20 * 0.9)  # the model's pick: lift 2 x 0.05
    prior_x = (20 * 0.05, 20 * 0.95)
    a = stats.beta(prior_a[0] + 4, prior_a[1] + 36)
    x = stats.beta(prior_x[0] + 14, prior_x[1] + 86)
    p_a = integrate.quad(lambda t: a.pdf(t) * x.cdf(t), 0, 1)[0]
    rng = np.random.default_rng(1)
    estimates: dict[str, list[float]] = {"a": [], "x": []}
    for _ in range(200):
        [d] = explore_slate(["a"], ["x"], policy, rng, evidence)
        estimates[d.product_id].append(d.propensity)
    share_a = len(estimates["a"]) / 200
    assert share_a == pytest.approx(p_a, abs=4 * np.sqrt(p_a * (1 - p_a) / 200))
    se = np.sqrt(p_a * (1 - p_a) / samples)  # what the docstring promises
    assert np.mean(estimates["a"]) == pytest.approx(p_a, abs=4 * se)
    assert np.mean(estimates["x"]) == pytest.approx(1 - p_a, abs=4 * se)
    assert all(0 < p <= 1 for p in estimates["a"] + estimates["x"])


def test_bad_exploration_settings_fail_when_configured() -> None:
    config = RecommenderConfig.from_dict({"explore_policy": "epsilon:0.05", "explore_alternatives": 2})
    assert ExploreSettings.from_config(config).policy.epsilon == 0.05
    for bad, message in (
        ({"explore_policy": "epsilon:2"}, "between 0 and 1"),
        ({"explore_policy": "logging"}, "use one of: greedy, epsilon"),
        ({"explore_alternatives": -1}, "explore_alternatives"),
        ({"thompson_prior_ctr": 0.6}, "thompson_prior_ctr"),
    ):
        with pytest.raises(ValueError, match=message):
            RecommenderConfig.from_dict(bad)


# ---- the feed log in the event store ------------------------------------------------------------------
def item(request: str, position: int, product: str, user: str = "u", arm: str | None = None) -> FeedItem:
    return FeedItem(request, user, position, product, 0.5, product, 2, "epsilon:0.5", "m1", arm, 1.0)


def test_clicks_and_purchases_are_credited_to_the_slot_they_carry(tmp_path: Path) -> None:
    with SQLiteEventStore(tmp_path / "events.db") as store:
        store.add_feed_items([item("r1", 0, "p1"), item("r1", 1, "p2"), item("r2", 0, "p1", user="v")])
        store.add_feed_items([item("r1", 0, "p9")])  # idempotent by (request_id, position)
        store.add(
            [
                Event("e1", "u", "p1", "click", request_id="r1"),
                Event("e2", "u", "p1", "click", request_id="r1"),  # a second click: still one clicked slot
                Event("e3", "u", "p1", "purchase", request_id="r1"),
                Event("e4", "intruder", "p2", "click", request_id="r1"),  # not the user it was served to
                Event("e5", "u", "p3", "click", request_id="r1"),  # not in the slate
                Event("e6", "v", "p1", "view", request_id="r2"),  # a view is not a click
            ]
        )
        logged = {(i.request_id, i.position): i for i in store.feed_items(batch=2)}  # pages of 2
        assert set(logged) == {("r1", 0), ("r1", 1), ("r2", 0)}
        assert logged["r1", 0].product_id == "p1" and logged["r1", 0].clicked and logged["r1", 0].purchased
        assert not logged["r1", 1].clicked and not logged["r2", 0].clicked
        assert logged["r2", 0] == item("r2", 0, "p1", user="v")
        assert store.feed_product_stats(["p1", "p2", "nope"]) == {"p1": (2, 1), "p2": (1, 0)}
        assert store.forget_user("u") == (4, 0)  # (events, module impressions); feed rows go too
        assert [(i.request_id, i.user_id) for i in store.feed_items()] == [("r2", "v")]
        assert store.feed_product_stats(["p1", "p2"]) == {"p1": (1, 0)}
        # A replayed log: the click is stored before its slot, and is credited when the slot arrives.
        store.add([Event("e7", "w", "p4", "click", request_id="r3")])
        store.add_feed_items([item("r3", 0, "p4", user="w"), item("r3", 1, "p5", user="w")])
        assert [(i.product_id, i.clicked) for i in store.feed_items() if i.request_id == "r3"] == [
            ("p4", True),
            ("p5", False),
        ]
        assert store.feed_product_stats(["p4", "p5"]) == {"p4": (1, 1), "p5": (1, 0)}


def test_a_version_2_store_is_migrated_to_the_feed_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SQLiteEventStore(path) as store:
        store.add([Event("e1", "u", "p1", "cart", request_id="r1")])
    raw = sqlite3.connect(path)  # what shopguide with schema version 2 wrote
    raw.executescript(
        "DROP TRIGGER events_feed_reward; DROP TABLE feed_items; DROP TABLE feed_product_stats; "
        "PRAGMA user_version = 2;"
    )
    raw.close()
    with SQLiteEventStore(path) as store:
        assert [e.event_id for e in store.history("u")] == ["e1"] and store.popular() == [("p1", 4.0)]
        store.add_feed_items([item("r9", 0, "p1")])
        store.add([Event("e2", "u", "p1", "click", request_id="r9")])
        assert [i.clicked for i in store.feed_items()] == [True]
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    raw.close()


# ---- through the HTTP API -----------------------------------------------------------------------------
@dataclass
class App:
    client: TestClient
    recommender: Recommender
    data_dir: Path
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.client.close()
            self.recommender.close()
            self.closed = True

    def log(self, request_id: str | None = None) -> list[FeedItem]:
        rows = self.recommender.events.feed_items()
        return sorted(
            (r for r in rows if request_id in (None, r.request_id)), key=lambda r: (r.request_id, r.position)
        )


@pytest.fixture
def make_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[dict], App]]:
    """An app over a private copy of the tiny catalog's data (its event store holds simulated events
    without request ids, so every feed-log number below comes from this test)."""
    opened: list[App] = []

    def make(config: dict) -> App:
        data_dir = serving_data_copy(tmp_path_factory, "explore")
        recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
        recommender.reconfigure(config)
        client = TestClient(
            create_app(LocalBackend(recommender), ApiSettings(api_key=API_KEY)), raise_server_exceptions=False
        )
        opened.append(App(client, recommender, data_dir))
        return opened[-1]

    yield make
    for app in opened:
        app.close()


def test_explored_feed_logs_every_slot_and_the_ab_report_counts_its_clicks(make_app, tmp_path: Path) -> None:
    app = make_app({"explore_policy": "epsilon:0.5", "explore_seed": 3})
    user = "explorer"
    post_events(app.client, views(user, tiny_ids("Red", "Tshirts")[:3]))
    body = ok(app.client.get(f"/users/{user}/feed", params={"k": 6}))
    assert_recommendation(body, 6)
    assert body["policy"] == "epsilon:0.5" and body["personalized"] is True
    logged = app.log(body["request_id"])
    assert [r.product_id for r in logged] == [i["product_id"] for i in body["items"]]
    assert [r.position for r in logged] == list(range(6))
    for row, shown in zip(logged, body["items"], strict=True):
        assert row.user_id == user and row.policy == "epsilon:0.5" and row.arm is None
        assert row.model_version == body["model_version"] and row.candidates == 4  # 3 alternatives each
        assert shown["propensity"] == pytest.approx(row.propensity)
        explored = row.product_id != row.greedy_product_id
        assert row.propensity == pytest.approx(0.5 / 4 if explored else 0.5 + 0.5 / 4)
        assert shown["reasons"][0].startswith(EXPLORE_REASON.format("")) == explored
    assert any(r.product_id != r.greedy_product_id for r in logged)  # with seed 3 it does
    assert len({r.greedy_product_id for r in logged} | {r.product_id for r in logged}) > 6

    first, second, third = (i["product_id"] for i in body["items"][:3])
    elsewhere = next(pid for pid in tiny_ids() if pid not in {r.product_id for r in logged})
    rid = body["request_id"]
    post_events(
        app.client,
        [
            {"event_id": "c1", "user_id": user, "product_id": first, "type": "click", "request_id": rid},
            {"event_id": "c2", "user_id": user, "product_id": second, "type": "click", "request_id": rid},
            {"event_id": "b1", "user_id": user, "product_id": first, "type": "purchase", "request_id": rid},
            # Not credited: another user's click on the slate, and a click on a product it did not show.
            {"event_id": "x1", "user_id": "other", "product_id": third, "type": "click", "request_id": rid},
            {"event_id": "x2", "user_id": user, "product_id": elsewhere, "type": "click", "request_id": rid},
        ],
    )
    # The embedded index is held by this app: the report reads the catalog folder ingest recorded.
    out = tmp_path / "ab.json"
    assert main(["ab", "report", "--data-dir", str(app.data_dir), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["arms"]) == ["all"] and report["differences"] == {}
    arm = report["arms"]["all"]
    assert (arm["impressions"], arm["clicks"], arm["purchases"], arm["users"]) == (6, 2, 1, 1)
    assert arm["ctr"] == pytest.approx(dict(zip(("rate", "low", "high"), rate_interval(2, 6), strict=True)))
    assert arm["cvr"]["rate"] == pytest.approx(1 / 6)
    guard = arm["guardrails"]
    assert report["catalog_size"] == 72 and "catalog folder" in report["catalog_source"]
    assert guard["catalog_coverage"] == pytest.approx(6 / 72) and 0 < guard["exposure_gini"] < 1
    assert 0 < guard["category_coverage"] <= 1

    estimates = tmp_path / "ope.json"
    args = ["eval", "offpolicy", "--data-dir", str(app.data_dir), "--policy", "greedy", "--policy", "logging"]
    assert main([*args, "--json", str(estimates)]) == 0
    greedy, on_policy = json.loads(estimates.read_text())["estimates"]
    assert greedy["n"] == on_policy["n"] == 6 and on_policy["ips"] == pytest.approx(2 / 6)

    deleted = ok(app.client.delete(f"/users/{user}", headers=AUTH))
    assert deleted["deleted_events"] == 7  # 3 views, 3 clicks, 1 purchase ("other" keeps theirs)
    assert app.log() == []  # the shopper's served slots are forgotten with them
    assert app.recommender.events.feed_product_stats([first, second]) == {}
    app.close()  # the index is free again: the report reads the served products from it
    assert main(["ab", "report", "--data-dir", str(app.data_dir), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["catalog_source"].startswith("the index") and report["catalog_size"] == 72
    assert report["overall"]["impressions"] == 0  # the shopper was forgotten


def test_cold_start_thompson_and_the_default_are_logged_too(make_app) -> None:
    app = make_app({"explore_policy": "thompson", "thompson_samples": 200})
    body = ok(app.client.get("/users/brand-new/feed", params={"k": 5}))  # no events: cold start
    assert body["personalized"] is False and body["policy"] == "thompson"
    logged = app.log(body["request_id"])
    assert [r.product_id for r in logged] == [i["product_id"] for i in body["items"]]
    assert all(0 < r.propensity <= 1 and r.candidates == 4 and r.policy == "thompson" for r in logged)
    assert [i["propensity"] for i in body["items"]] == pytest.approx([r.propensity for r in logged])

    app.recommender.reconfigure({})  # the default: greedy, deterministic feeds
    first = ok(app.client.get("/users/brand-new/feed", params={"k": 5}))
    again = ok(app.client.get("/users/brand-new/feed", params={"k": 5}))
    assert first["policy"] == "greedy" and [i["product_id"] for i in first["items"]] == [
        i["product_id"] for i in again["items"]
    ]
    assert {i["propensity"] for i in first["items"]} == {1.0}
    assert {(r.propensity, r.candidates) for r in app.log(first["request_id"])} == {(1.0, 1)}
    # The product page's "for you" module is a feed too: its slots are logged under its request_id.
    page = ok(app.client.get("/products/101/page", params={"user_id": "brand-new", "k": 3}))
    for_you = next(m for m in page["modules"] if m["name"] == "for_you")
    assert [r.product_id for r in app.log(for_you["request_id"])] == [
        i["product_id"] for i in for_you["items"]
    ]

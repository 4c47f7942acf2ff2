"""The storefront's API: static files, facets, visitor tokens on POST /events, and the product page
whose modules are ordered by the shopper's predicted interest (tiny catalog, in-process, no Ray)."""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.api import STATIC_DIR, ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.event_store import SCHEMA_VERSION, Impression, ModuleStats, SQLiteEventStore
from serving.recommend import FILLED, PAGE_MODULES, Recommender
from tests.serving_fixtures import API_KEY, serving_data_copy, tiny_ids
from tests.test_api import assert_error, assert_recommendation, ids_of, metric, ok
from training.events import Event

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEFAULT_ORDER = ["similar", "for_you", "bought_together"]
VISITOR_ID = re.compile(r"^v-[0-9a-f]{16}$")


@dataclass
class App:
    client: TestClient
    recommender: Recommender


def _app(data_dir: Path, events_db: Path | None = None, api_key: str | None = API_KEY) -> App:
    args = AppArgs(data_dir=str(data_dir), events_db=str(events_db) if events_db else None)
    recommender = build_recommender(resolve_paths(args))
    # No query encoders: nothing here embeds text or photos.
    client = TestClient(
        create_app(LocalBackend(recommender), ApiSettings(api_key=api_key)), raise_server_exceptions=False
    )
    return App(client, recommender)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The tiny catalog with its simulated shoppers' events (popularity, co-occurrence)."""
    served = _app(serving_data_copy(tmp_path_factory, "page"))
    yield served
    served.client.close()
    served.recommender.close()


@pytest.fixture
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], App]]:
    """Apps over their own copy of the index and an empty event store: exact counts, no global drift."""
    opened: list[App] = []

    def make() -> App:
        data_dir = serving_data_copy(tmp_path_factory, "page-fresh")
        served = _app(data_dir, events_db=data_dir.parent / "empty-events.db")
        served.recommender.config.page_prior_ttl_s = 0.0  # read the global rates on every page
        opened.append(served)
        return served

    yield make
    for served in opened:
        served.client.close()
        served.recommender.close()


def visitor_headers(client: TestClient) -> tuple[str, dict[str, str]]:
    body = ok(client.get("/visitor"))
    return body["visitor_id"], {"X-Visitor-Token": f"{body['visitor_id']}.{body['token']}"}


def event(user: str, event_id: str, type_: str = "view", product: str | None = "101", **extra) -> dict:
    return {"event_id": event_id, "user_id": user, "product_id": product, "type": type_, **extra}


def stored(client: TestClient, user: str) -> list[str]:
    return [e["event_id"] for e in ok(client.get(f"/users/{user}/events"))["events"]]


def module(page: dict, name: str) -> dict:
    (found,) = [m for m in page["modules"] if m["name"] == name]
    return found


def names(page: dict) -> list[str]:
    return [m["name"] for m in page["modules"]]


# ---- the storefront's files ---------------------------------------------------------------------------
def test_storefront_is_served_at_the_root_and_kept_out_of_the_schema(app: App) -> None:
    page = app.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        assert asset in page.text
        response = app.client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    assert_error(app.client.get("/static/nope.js"), 404)
    paths = ok(app.client.get("/openapi.json"))["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    # Counted under the mount, not as "unmatched" (a bounded label however many files there are).
    assert metric(app.client, "shopguide_requests_total", route="/static", status="200") >= 2


def test_storefront_loads_nothing_from_elsewhere() -> None:
    # The machine may be offline: no CDN, web font or remote image may be referenced anywhere.
    remote = re.compile(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|@font-face", re.IGNORECASE)
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} == {"index.html", "app.js", "style.css"}
    for path in files:
        found = remote.findall(path.read_text())
        assert not found, f"{path.name} references {found}"


def test_facets_list_each_filter_fields_catalog_values(app: App) -> None:
    body = ok(app.client.get("/catalog/facets"))
    assert body == app.recommender.vocabulary()
    assert body["baseColour"] == ["Blue", "Green", "Red"] and body["gender"] == ["Men", "Women"]
    assert body["masterCategory"] == ["Accessories", "Apparel"]


def test_popular_browse_respects_filters_and_says_why(app: App) -> None:
    body = ok(app.client.get("/catalog/popular", params={"k": 5, "baseColour": "Blue", "gender": "Women"}))
    assert_recommendation(body, 5)
    assert set(ids_of(body)) <= set(tiny_ids("Blue", gender="Women"))
    assert all("popular among the matches" in i["reasons"] for i in body["items"])
    assert_error(app.client.get("/catalog/popular", params={"baseColour": "Mauve"}), 422, "Mauve")


# ---- visitor tokens -------------------------------------------------------------------------------------
def test_visitor_ids_are_new_each_time_and_signed_with_a_key_derived_from_the_api_key(app: App) -> None:
    first, second = ok(app.client.get("/visitor")), ok(app.client.get("/visitor"))
    assert first["visitor_id"] != second["visitor_id"]
    secret = hashlib.sha256(b"visitor:" + API_KEY.encode()).digest()
    for body in (first, second):
        assert VISITOR_ID.match(body["visitor_id"]), body
        assert body["token"] == hmac.new(secret, body["visitor_id"].encode(), hashlib.sha256).hexdigest()
        assert API_KEY not in body["token"]


def test_a_visitor_posts_its_own_browsing_events_without_the_api_key(app: App) -> None:
    me, headers = visitor_headers(app.client)
    batch = [
        event(me, f"{me}-1", "view"),
        event(me, f"{me}-2", "click", request_id="r-1"),
        event(me, f"{me}-3", "cart"),
        event(me, f"{me}-4", "search", product=None, query="red bag"),
    ]
    assert ok(app.client.post("/events", json={"events": batch}, headers=headers)) == {
        "accepted": 4,
        "duplicates": 0,
    }
    assert stored(app.client, me) == [f"{me}-4", f"{me}-3", f"{me}-2", f"{me}-1"]
    # Every ingress replica derives the same signing key from the API key: another app instance agrees.
    other = TestClient(create_app(LocalBackend(app.recommender), ApiSettings(api_key=API_KEY)))
    assert (
        ok(other.post("/events", json={"events": [event(me, f"{me}-5")]}, headers=headers))["accepted"] == 1
    )


def _other_key_token(visitor_id: str) -> str:
    secret = hashlib.sha256(b"visitor:another-key").digest()
    return hmac.new(secret, visitor_id.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("case", "status", "detail"),
    [
        ("no credentials", 401, "X-Visitor-Token"),
        ("wrong token", 403, "visitor token is not valid"),
        ("no dot", 403, "visitor token is not valid"),
        ("token of another visitor", 403, "visitor token is not valid"),
        ("token from another api key", 403, "visitor token is not valid"),
        ("wrong bearer with a good token", 403, "API key is not valid"),
        ("event for another user", 403, "own visitor id"),
        ("purchase", 403, "a purchase"),
        ("one purchase in the batch", 403, "events[1] is a purchase"),
    ],
)
def test_a_visitor_token_cannot_do_more(app: App, case: str, status: int, detail: str) -> None:
    me, headers = visitor_headers(app.client)
    token = headers["X-Visitor-Token"].split(".")[1]
    someone, _ = visitor_headers(app.client)
    batch = [event(me, f"{me}-a")]
    if case == "no credentials":
        headers = {}
    elif case == "wrong token":
        headers = {"X-Visitor-Token": f"{me}.{'0' * 64}"}
    elif case == "no dot":
        headers = {"X-Visitor-Token": token}
    elif case == "token of another visitor":
        headers = {"X-Visitor-Token": f"{someone}.{token}"}
    elif case == "token from another api key":
        headers = {"X-Visitor-Token": f"{me}.{_other_key_token(me)}"}
    elif case == "wrong bearer with a good token":
        headers = {**headers, "Authorization": "Bearer guess-123"}
    elif case == "event for another user":
        batch = [event(me, f"{me}-a"), event(someone, f"{me}-b")]
    elif case == "purchase":
        batch = [event(me, f"{me}-a", "purchase")]
    else:
        batch = [event(me, f"{me}-a", "view"), event(me, f"{me}-b", "purchase")]
    response = app.client.post("/events", json={"events": batch}, headers=headers)
    assert_error(response, status, detail)
    assert stored(app.client, me) == [] and stored(app.client, someone) == []  # the batch is refused whole


def test_the_api_key_still_posts_anything(app: App) -> None:
    me, headers = visitor_headers(app.client)
    purchase = [event(me, f"{me}-buy", "purchase"), event("someone-else", f"{me}-other")]
    assert ok(app.client.post("/events", json={"events": purchase}, headers=AUTH))["accepted"] == 2
    # A visitor token cannot delete a shopper, even itself: DELETE stays with the API key.
    assert_error(app.client.delete(f"/users/{me}", headers=headers), 401)


def test_without_an_api_key_writes_stay_open(app: App) -> None:
    with TestClient(create_app(LocalBackend(app.recommender), ApiSettings(api_key=None))) as open_client:
        body = ok(open_client.get("/visitor"))  # still issued (signed with a per-process secret)
        assert VISITOR_ID.match(body["visitor_id"])
        anyone = [event("open-page-user", "open-1", "purchase")]
        assert ok(open_client.post("/events", json={"events": anyone}))["accepted"] == 1
        assert ok(open_client.delete("/users/open-page-user"))["deleted_events"] == 1


# ---- the product page -----------------------------------------------------------------------------------
def test_page_has_the_product_and_three_modules_of_k_items(app: App) -> None:
    user = "page-browser"
    ok(app.client.post("/events", json={"events": [event(user, "pb-1", product="150")]}, headers=AUTH))
    page = ok(app.client.get("/products/101/page", params={"user_id": user, "k": 5}))
    assert page["request_id"] and page["user_id"] == user
    assert page["product"] == ok(app.client.get("/products/101"))
    assert sorted(names(page)) == sorted(PAGE_MODULES)
    request_ids = {page["request_id"], *(m["request_id"] for m in page["modules"])}
    assert len(request_ids) == 4, "each module needs its own request_id for click attribution"
    interests = [m["interest"] for m in page["modules"]]
    assert interests == sorted(interests, reverse=True)
    for found in page["modules"]:
        assert found["title"] and found["model_version"]
        assert_recommendation(found, 5)
        assert "101" not in ids_of(found), f"{found['name']} shows the page's own product"
    assert all("Brand0 Men Red Handbag" in i["reasons"][0] for i in module(page, "similar")["items"])
    for_you = module(page, "for_you")["items"]
    assert "150" not in [i["product_id"] for i in for_you]  # already seen
    assert all(i["reasons"][0].startswith("similar to ") for i in for_you if FILLED not in i["reasons"])


def test_page_without_a_user_is_cold_start_and_records_nothing(app: App) -> None:
    before = app.recommender.events.module_stats(None)
    page = ok(app.client.get("/products/120/page", params={"k": 4}))
    assert page["user_id"] is None and names(page) == DEFAULT_ORDER
    assert all(
        re.match(r"^(popular|trending) ", i["reasons"][0]) for i in module(page, "for_you")["items"]
    ), module(page, "for_you")
    assert app.recommender.events.module_stats(None) == before


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({}, 404, "'nope' is not in the catalog"),
        ({"k": 0}, 422, "query.k"),
        ({"k": 101}, 422, "query.k"),
        ({"user_id": ""}, 422, "query.user_id"),
    ],
)
def test_page_bad_requests(app: App, params: dict, status: int, detail: str) -> None:
    product = "nope" if status == 404 else "101"
    assert_error(app.client.get(f"/products/{product}/page", params=params), status, detail)


def test_bought_together_counts_other_shoppers_carts_and_purchases(fresh) -> None:
    served = fresh()
    evidence = [
        event("s1", "s1-a", "cart", "101"),
        event("s1", "s1-b", "purchase", "150"),
        event("s2", "s2-a", "purchase", "101"),
        event("s2", "s2-b", "cart", "150"),
        event("s3", "s3-a", "cart", "101"),
        event("s3", "s3-b", "purchase", "170"),
        event("s4", "s4-a", "view", "101"),  # browsing is not buying together
        event("s4", "s4-b", "purchase", "160"),
        event("me", "me-a", "cart", "101"),  # the shopper's own basket is not evidence
        event("me", "me-b", "cart", "165"),
    ]
    ok(served.client.post("/events", json={"events": evidence}, headers=AUTH))
    page = ok(served.client.get("/products/101/page", params={"user_id": "me", "k": 6}))
    bought = module(page, "bought_together")
    assert_recommendation(bought, 6)
    assert bought["model_version"] == "co-occurrence"
    title = "Brand0 Men Red Handbag"
    assert [(i["product_id"], i["reasons"]) for i in bought["items"][:2]] == [
        ("150", [f"bought together with {title} by 2 shoppers"]),
        ("170", [f"bought together with {title} by 1 shopper"]),
    ]
    # The rest: popular products of the same category first, each labelled as filler.
    rest = bought["items"][2:]
    assert all(FILLED in i["reasons"] and i["reasons"][0].startswith("popular in ") for i in rest)
    payloads = {p["product_id"]: p for p in served.recommender.payloads()}
    assert payloads["160"]["subCategory"] != "Bags"  # so it is not a same-category filler either
    assert "160" not in ids_of(bought) and "165" not in ids_of(bought)
    assert all(payloads[i["product_id"]]["subCategory"] == "Bags" for i in rest)


def test_a_new_shopper_sees_the_default_order_and_the_priors(fresh) -> None:
    served = fresh()
    page = ok(served.client.get("/products/101/page", params={"user_id": "newcomer", "k": 3}))
    assert names(page) == DEFAULT_ORDER
    assert [m["interest"] for m in page["modules"]] == [PAGE_MODULES[n][1] for n in DEFAULT_ORDER]


def test_a_shopper_who_buys_from_bought_together_sees_it_first(fresh) -> None:
    served = fresh()
    client = served.client
    user = "basket-filler"
    orders = []
    for round_ in range(3):
        page = ok(client.get(f"/products/{tiny_ids('Blue')[round_]}/page", params={"user_id": user, "k": 4}))
        orders.append(names(page))
        bought = module(page, "bought_together")
        pick, request_id = bought["items"][0]["product_id"], bought["request_id"]
        engaged = [
            event(user, f"bt-{round_}-click", "click", pick, request_id=request_id),
            event(user, f"bt-{round_}-buy", "purchase", pick, request_id=request_id),
        ]
        ok(client.post("/events", json={"events": engaged}, headers=AUTH))
    assert orders[0] == DEFAULT_ORDER
    page = ok(client.get("/products/130/page", params={"user_id": user, "k": 4}))
    assert names(page)[0] == "bought_together", page["modules"]
    # The documented formula, from the stored impressions and engagement. Only this shopper has been
    # served, so the global rates are theirs; the page was ranked before its own impressions were stored.
    a = served.recommender.config.page_prior_strength
    stats = served.recommender.events.module_stats(user)
    assert stats == served.recommender.events.module_stats(None)
    assert stats["bought_together"] == ModuleStats(impressions=4, engagement=3 * (1 + 4))
    assert stats["similar"] == stats["for_you"] == ModuleStats(impressions=4, engagement=0.0)
    for found in page["modules"]:
        shown, engaged = stats[found["name"]].impressions - 1, stats[found["name"]].engagement
        prior = (engaged + a * PAGE_MODULES[found["name"]][1]) / (shown + a)
        assert found["interest"] == pytest.approx((engaged + a * prior) / (shown + a), abs=1e-6)
    # A newcomer starts from the global rates: one shopper's buying has taught the shop something.
    newcomer = ok(client.get("/products/130/page", params={"user_id": "newcomer", "k": 4}))
    assert names(newcomer)[0] == "bought_together"


def test_engagement_only_counts_for_the_user_it_was_served_to(fresh) -> None:
    served = fresh()
    page = ok(served.client.get("/products/101/page", params={"user_id": "owner", "k": 2}))
    request_id = module(page, "for_you")["request_id"]
    intruder = [event("intruder", "in-1", "purchase", "150", request_id=request_id)]
    ok(served.client.post("/events", json={"events": intruder}, headers=AUTH))
    stats = served.recommender.events.module_stats("owner")
    assert stats["for_you"] == ModuleStats(impressions=1, engagement=0.0)
    assert served.recommender.events.module_stats(None)["for_you"].engagement == 0.0


def test_forgetting_a_shopper_deletes_their_impressions(fresh) -> None:
    served = fresh()
    ok(served.client.get("/products/101/page", params={"user_id": "private", "k": 2}))
    ok(served.client.get("/products/102/page", params={"user_id": "other", "k": 2}))
    assert sum(s.impressions for s in served.recommender.events.module_stats("private").values()) == 3
    body = ok(served.client.delete("/users/private", headers=AUTH))
    assert body["deleted_impressions"] == 3
    assert served.recommender.events.module_stats("private") == {}
    assert sum(s.impressions for s in served.recommender.events.module_stats(None).values()) == 3


# ---- the event store's side ---------------------------------------------------------------------------
def test_co_occurring_by_type_and_without_the_asking_user(tmp_path: Path) -> None:
    with SQLiteEventStore(tmp_path / "events.db") as store:
        store.add(
            [
                Event("a1", "a", "p1", "cart"),
                Event("a2", "a", "p2", "purchase"),
                Event("a3", "a", "p3", "view"),
                Event("b1", "b", "p1", "purchase"),
                Event("b2", "b", "p2", "cart"),
                Event("c1", "c", "p1", "view"),
                Event("c2", "c", "p4", "purchase"),
            ]
        )
        assert store.co_occurring("p1") == [("p2", 2), ("p3", 1), ("p4", 1)]  # unchanged: any type
        bought = ("cart", "purchase")
        assert store.co_occurring("p1", types=bought) == [("p2", 2)]
        assert store.co_occurring("p1", types=bought, exclude_user="a") == [("p2", 1)]
        assert store.co_occurring("p1", limit=0, types=bought) == []
        with pytest.raises(ValueError, match="unknown event type"):
            store.co_occurring("p1", types=("like",))


def test_impressions_are_idempotent_and_counted_per_user(tmp_path: Path) -> None:
    with SQLiteEventStore(tmp_path / "events.db") as store:
        store.add_impressions([Impression("r1", "u", "similar", 1.0), Impression("r2", "u", "for_you", 1.0)])
        store.add_impressions([Impression("r1", "u", "similar", 2.0), Impression("r3", "v", "similar", 1.0)])
        store.add(
            [
                Event("e1", "u", "p1", "click", request_id="r1"),
                Event("e2", "u", "p1", "cart", request_id="r1"),
            ]
        )
        store.add([Event("e3", "u", "p1", "view", request_id="r2")])  # a view is not engagement
        assert store.module_stats("u") == {"similar": ModuleStats(1, 3.0), "for_you": ModuleStats(1, 0.0)}
        assert store.module_stats(None) == {"similar": ModuleStats(2, 3.0), "for_you": ModuleStats(1, 0.0)}
        assert store.forget_user("u") == (3, 2)  # (events, impressions)
        assert store.module_stats(None) == {"similar": ModuleStats(1, 0.0)}


def test_a_version_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SQLiteEventStore(path) as store:
        store.add([Event("e1", "u", "p1", "cart", request_id="r1")])
    # Make it what shopguide with schema version 1 wrote: no impressions table, no request_id index.
    raw = sqlite3.connect(path)
    raw.executescript(
        "DROP TABLE served; DROP INDEX events_request; DROP TRIGGER events_feed_reward; "
        "DROP TABLE feed_items; DROP TABLE feed_product_stats; PRAGMA user_version = 1;"
    )
    raw.close()
    with SQLiteEventStore(path) as store:
        assert [e.event_id for e in store.history("u")] == ["e1"] and store.popular() == [("p1", 4.0)]
        store.add_impressions([Impression("r1", "u", "similar", 1.0)])
        assert store.module_stats("u") == {"similar": ModuleStats(1, 2.0)}
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    indexes = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    raw.close()
    assert {"served_user_module", "events_request"} <= indexes

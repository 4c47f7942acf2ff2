"""The HTTP contract of serving/api.py over the tiny catalog, in-process (LocalBackend, no Ray)."""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from index import Filters
from serving.api import ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.recommend import FILLED, MAPPED
from tests.serving_fixtures import (
    API_KEY,
    UNSEEN_BY_GRU,
    ingest_into_memory_qdrant,
    serving_data_copy,
    tiny_ids,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WRONG_AUTH = {"Authorization": "Bearer guess-123"}
ROUTES = {
    "/healthz",
    "/metrics",
    "/products/{product_id}",
    "/products/{product_id}/image",
    "/products/{product_id}/similar",
    "/search",
    "/search/image",
    "/users/{user_id}/feed",
    "/events",
    "/users/{user_id}/events",
    "/users/{user_id}",
    "/visitor",
    "/catalog/facets",
    "/catalog/popular",
    "/products/{product_id}/page",
}
POPULARITY_REASON = re.compile(r"^(popular|trending) ")


@dataclass
class Served:
    client: TestClient
    catalog: Path
    payloads: dict[str, dict]  # product id -> payload (title, price, in_stock, gender, ...)
    versions: dict[str, str]  # component -> model version, as /healthz reports them
    behavior_ids: set[str]  # products the GRU knows (the others have no behavior vector)


# Every test runs on both index backends: the embedded index (DATA_DIR/index) and the server backend
# through qdrant-client's in-process ":memory:" mode holding the same catalog (server mode's contract).
@pytest.fixture(scope="module", params=["embedded", "server"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from encoders import get_image_encoder, get_text_encoder

    data_dir = serving_data_copy(tmp_path_factory, f"api-{request.param}")
    store = ingest_into_memory_qdrant(data_dir) if request.param == "server" else None
    qdrant_url = ":memory:" if store is not None else None
    recommender = build_recommender(
        resolve_paths(AppArgs(data_dir=str(data_dir), qdrant_url=qdrant_url)), store=store
    )
    assert type(recommender.index).__name__ == ("ServerIndex" if store else "EdgeIndex")
    encoders = json.loads((data_dir / "ingest.json").read_text())["encoders"]
    backend = LocalBackend(
        recommender,
        get_text_encoder(encoders["text_encoder"], **encoders.get("text_encoder_args", {})),
        get_image_encoder(encoders["image_encoder"], **encoders.get("image_encoder_args", {})),
    )
    # raise_server_exceptions=False: a 5xx must show up as a response the tests can assert on.
    client = TestClient(create_app(backend, ApiSettings(api_key=API_KEY)), raise_server_exceptions=False)
    payloads = {p["product_id"]: p for p in recommender.payloads()}
    yield Served(
        client,
        Path(recommender.manifest["catalog"]),
        payloads,
        recommender.model_versions(),
        set(recommender.sequence.item_ids),
    )
    client.close()
    recommender.close()
    if store is not None:
        store.close()


@pytest.fixture(scope="module")
def client(served: Served) -> TestClient:
    return served.client


# ---- helpers ----------------------------------------------------------------------------------------
def ids_of(body: dict) -> list[str]:
    return [item["product_id"] for item in body["items"]]


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response, status: int, detail_contains: str | None = None) -> dict:
    """A 4xx with a JSON body {"error", "detail"} (and never a 5xx)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"], body
    if detail_contains is not None:
        assert detail_contains in json.dumps(body["detail"]), body
    return body


def assert_recommendation(body: dict, k: int) -> None:
    """The response shape every recommendation endpoint shares, with exactly k items."""
    assert body["request_id"] and body["model_version"]
    assert len(body["items"]) == k, [i["product_id"] for i in body["items"]]
    assert len({i["product_id"] for i in body["items"]}) == k, "an item appears twice"
    for item in body["items"]:
        assert {"product_id", "score", "title", "image_url", "reasons"} <= set(item)
        assert item["image_url"] == f"/products/{item['product_id']}/image"
        assert item["title"] and item["reasons"] and all(isinstance(r, str) and r for r in item["reasons"])


def assert_all_pass(served: Served, body: dict, filters: Filters) -> None:
    failing = [
        i["product_id"] for i in body["items"] if not filters.matches(served.payloads[i["product_id"]])
    ]
    assert not failing, f"items {failing} do not pass {filters}"


def photo(served: Served, product_id: str) -> bytes:
    return (served.catalog / "images" / f"{product_id}.jpg").read_bytes()


def metric(client: TestClient, name: str, **labels: str) -> float | None:
    """The sum of the /metrics samples called `name` whose labels include `labels` (None: no sample)."""
    text = ok_text(client.get("/metrics"))
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


def ok_text(response) -> str:
    assert response.status_code == 200, response.text
    return response.text


def post_events(client: TestClient, events: list[dict]) -> dict:
    return ok(client.post("/events", json={"events": events}, headers=AUTH))


def views(user: str, product_ids: list[str], prefix: str = "") -> list[dict]:
    return [
        {"event_id": f"{user}-{prefix}{n}", "user_id": user, "product_id": pid, "type": "view"}
        for n, pid in enumerate(product_ids)
    ]


# ---- ops and catalog --------------------------------------------------------------------------------
def test_healthz_reports_index_size_and_model_versions(client: TestClient, served: Served) -> None:
    body = ok(client.get("/healthz"))
    assert body["status"] == "ok" and body["products"] == 72
    assert body["model_versions"] == served.versions
    assert body["model_versions"]["user_encoder"].startswith("gru_sequence")


def test_product_attributes_and_photo(client: TestClient, served: Served) -> None:
    body = ok(client.get("/products/105"))
    assert body["product_id"] == "105" and body["title"] == "Brand0 Women Red Handbag"
    assert (body["gender"], body["articleType"], body["baseColour"]) == ("Women", "Handbags", "Red")
    assert isinstance(body["price"], float) and isinstance(body["in_stock"], bool)
    image = client.get("/products/105/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == photo(served, "105")


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = ok(client.get("/openapi.json"))["paths"]
    assert set(paths) == ROUTES
    assert set(paths["/users/{user_id}"]) == {"delete"} and set(paths["/events"]) == {"post"}
    assert "multipart/form-data" in paths["/search/image"]["post"]["requestBody"]["content"]


def test_metrics_count_requests_per_route_index_size_and_models(client: TestClient, served: Served) -> None:
    ok(client.get("/products/101/similar", params={"k": 3}))
    assert_error(client.get("/products/nope/similar"), 404)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")

    similar_route = "/products/{product_id}/similar"
    assert metric(client, "shopguide_requests_total", route=similar_route, method="GET", status="200") >= 1
    assert metric(client, "shopguide_requests_total", route=similar_route, method="GET", status="404") >= 1
    assert metric(client, "shopguide_request_seconds_count", route=similar_route) >= 2
    assert metric(client, "shopguide_index_products") == 72
    assert metric(client, "shopguide_events") is not None
    for component, version in served.versions.items():
        assert metric(client, "shopguide_model_info", component=component, version=version) == 1
    assert (
        "shopguide_errors" in response.text
    )  # the 5xx counter is declared (see test_a_crash_is_a_json_500_without_internals_and_is_counted)


# ---- similar items ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fused", "image", "text", "behavior"])
def test_similar_in_every_mode_returns_k_items(client: TestClient, served: Served, mode: str) -> None:
    body = ok(client.get("/products/101/similar", params={"k": 6, "mode": mode}))
    assert_recommendation(body, 6)
    assert body["mode"] == mode and "101" not in ids_of(body)
    assert body["model_version"] == served.versions[mode]
    assert all(any("Brand0 Men Red Handbag" in r for r in i["reasons"]) for i in body["items"])


def test_similar_looks_like_the_product(client: TestClient, served: Served) -> None:
    body = ok(client.get("/products/101/similar", params={"k": 3, "mode": "image"}))
    assert all(served.payloads[pid]["articleType"] == "Handbags" for pid in ids_of(body))


def test_similar_filters_restrict_every_item(client: TestClient, served: Served) -> None:
    params = {
        "k": 10,
        "gender": "Women",
        "baseColour": ["Blue", "Green"],
        "max_price": 60.0,
        "in_stock": True,
    }
    body = ok(client.get("/products/101/similar", params=params))
    assert_recommendation(body, 10)
    wanted = Filters(gender=("Women",), baseColour=("Blue", "Green"), max_price=60.0, in_stock=True)
    assert_all_pass(served, body, wanted)
    cheap = ok(client.get("/products/101/similar", params={"k": 72, "min_price": 30, "max_price": 40}))
    assert cheap["items"] and all(30 <= i["price"] <= 40 for i in cheap["items"])
    passing = [p for p, payload in served.payloads.items() if 30 <= payload["price"] <= 40 and p != "101"]
    assert sorted(ids_of(cheap)) == sorted(passing)  # everything that passes, nothing else


EVERY_FILTER = {
    "masterCategory": "Accessories",
    "subCategory": "Watches",
    "articleType": "Watches",
    "gender": "Men",
    "baseColour": ["Red", "Blue"],  # repeatable: any of them
    "min_price": 5,
    "max_price": 80,
    "in_stock": True,
}


@pytest.mark.parametrize("endpoint", ["similar", "search", "image search", "feed"])
def test_every_filter_on_every_recommendation_endpoint(client: TestClient, served: Served, endpoint) -> None:
    wanted = Filters(
        masterCategory=("Accessories",),
        subCategory=("Watches",),
        articleType=("Watches",),
        gender=("Men",),
        baseColour=("Red", "Blue"),
        min_price=5,
        max_price=80,
        in_stock=True,
    )
    passing = [pid for pid, payload in served.payloads.items() if wanted.matches(payload) and pid != "101"]
    assert len(passing) >= 4  # so k=4 must come back full
    params = {"k": 4, **EVERY_FILTER}
    if endpoint == "similar":
        response = client.get("/products/101/similar", params=params)
    elif endpoint == "search":
        response = client.get("/search", params={"q": "something nice", **params})
    elif endpoint == "image search":
        files = {"image": ("a.jpg", photo(served, "150"), "image/jpeg")}
        response = client.post("/search/image", params=params, files=files)
    else:
        post_events(client, views("filter-user", tiny_ids("Green", "Handbags")[:2]))
        response = client.get("/users/filter-user/feed", params=params)
    body = ok(response)
    assert_recommendation(body, 4)
    assert_all_pass(served, body, wanted)
    second = ok(client.get("/products/101/similar", params=params))
    assert second["request_id"] != body["request_id"]


def test_similar_with_fewer_matches_than_k_returns_all_matches(client: TestClient) -> None:
    params = {"k": 10, "articleType": "Handbags", "baseColour": "Red", "gender": "Men"}
    body = ok(client.get("/products/101/similar", params=params))
    assert sorted(ids_of(body)) == ["102", "103", "104"]  # 101 itself is never similar to itself
    whole = ok(client.get("/products/101/similar", params={"k": 1000}))
    assert len(whole["items"]) == 71


def test_products_the_gru_never_saw_are_mapped_and_labelled(client: TestClient, served: Served) -> None:
    """Cold start: products without shopper data get behavior vectors from their content, and every
    behavior link that rests on such a vector says so."""
    unseen = set(tiny_ids(*UNSEEN_BY_GRU))
    assert unseen and not unseen & served.behavior_ids
    body = ok(client.get("/products/170/similar", params={"k": 5, "mode": "behavior"}))  # 170: unseen
    assert_recommendation(body, 5)
    assert all(MAPPED in i["reasons"] and FILLED not in i["reasons"] for i in body["items"])
    # A product the GRU knows: every other product is a behavior neighbour now (none filled), and
    # exactly the unseen ones are labelled as placed by content.
    whole = ok(client.get("/products/101/similar", params={"k": 71, "mode": "behavior"}))
    assert_recommendation(whole, 71)
    assert not any(FILLED in i["reasons"] for i in whole["items"])
    mapped = {i["product_id"] for i in whole["items"] if MAPPED in i["reasons"]}
    assert mapped == set(served.payloads) - served.behavior_ids - {"101"} and unseen <= mapped
    only_unseen = {"k": 4, "mode": "behavior", "baseColour": "Green", "articleType": "Tshirts"}
    body = ok(client.get("/products/101/similar", params=only_unseen))
    assert set(ids_of(body)) <= unseen and all(MAPPED in i["reasons"] for i in body["items"])


def test_without_the_mapping_unseen_products_are_filled_from_content(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from index import EdgeStore
    from serving.event_store import SQLiteEventStore
    from serving.recommend import Recommender, RecommenderConfig

    data_dir = serving_data_copy(tmp_path_factory, "api-unmapped")
    recommender = Recommender(
        data_dir,
        EdgeStore(data_dir / "index"),
        SQLiteEventStore(data_dir / "events.db"),
        data_dir / "models" / "sequence",
        RecommenderConfig(map_new_products=False),
    )
    try:
        unseen = set(tiny_ids(*UNSEEN_BY_GRU))
        body = recommender.similar("170", 5, mode="behavior")
        assert len(body["items"]) == 5 and all(FILLED in i["reasons"] for i in body["items"])
        # A product the GRU knows: behavior neighbours first, then the unseen ones filled in, labelled.
        whole = recommender.similar("101", 71, mode="behavior")
        filled = [FILLED in i["reasons"] for i in whole["items"]]
        assert len(filled) == 71 and filled == sorted(filled), "filler comes after real neighbours"
        known = set(recommender.sequence.item_ids)
        without_vectors = {p["product_id"] for p in recommender.payloads()} - known - {"101"}
        assert unseen <= without_vectors
        assert {i["product_id"] for i in whole["items"] if FILLED in i["reasons"]} == without_vectors
        assert not any(MAPPED in i["reasons"] for i in whole["items"])
    finally:
        recommender.close()


def test_diversity_reorders_and_keeps_k(client: TestClient, served: Served) -> None:
    plain = ok(client.get("/products/101/similar", params={"k": 10, "diversity": 0}))
    diverse = ok(client.get("/products/101/similar", params={"k": 10, "diversity": 0.9}))
    assert_recommendation(diverse, 10)
    assert ids_of(diverse) != ids_of(plain)
    # Near-duplicates are pushed down: the diverse list covers more article types in its top 5.
    articles = [{served.payloads[p]["articleType"] for p in ids_of(body)[:5]} for body in (plain, diverse)]
    assert len(articles[1]) > len(articles[0])


def test_exclude_leaves_products_out_and_keeps_k(client: TestClient) -> None:
    first = ids_of(ok(client.get("/products/101/similar", params={"k": 5})))
    again = ok(client.get("/products/101/similar", params={"k": 5, "exclude": ",".join(first[:3]) + ", ,"}))
    assert_recommendation(again, 5)
    assert not set(first[:3]) & set(ids_of(again))


# ---- search -----------------------------------------------------------------------------------------
def test_search_understands_a_question(client: TestClient, served: Served) -> None:
    body = ok(client.get("/search", params={"q": "do you have red handbags for women?"}))
    understood = body["understood"]["filters"]
    assert understood == {"baseColour": ["Red"], "articleType": ["Handbags"], "gender": ["Women"]}
    assert body["understood"]["query"]
    assert sorted(ids_of(body)) == tiny_ids("Red", "Handbags", "Women")  # all 4 matches, nothing else
    assert all(any(r.startswith("matches your search") for r in i["reasons"]) for i in body["items"])


def test_search_understands_a_price_phrase(client: TestClient, served: Served) -> None:
    # The tiny catalog's prices are around 10-100 (derived from BASE_PRICE), so "under 30" bites.
    body = ok(client.get("/search", params={"q": "blue watches under 30", "k": 24}))
    assert body["understood"]["filters"]["max_price"] == 30
    assert body["items"]
    assert_all_pass(served, body, Filters(baseColour=("Blue",), articleType=("Watches",), max_price=30.0))
    passing = [p for p in tiny_ids("Blue", "Watches") if served.payloads[p]["price"] <= 30]
    assert sorted(ids_of(body)) == sorted(passing)


def test_text_search_ranks_matching_products_first(client: TestClient) -> None:
    # Explicit filters covering the whole catalog override the understood ones, so the ranking alone
    # must put the 8 red handbags first.
    everything = {"baseColour": ["Red", "Blue", "Green"], "articleType": ["Handbags", "Watches", "Tshirts"]}
    body = ok(client.get("/search", params={"q": "red handbag", "k": 72, "mode": "text", **everything}))
    assert_recommendation(body, 72)
    assert sorted(ids_of(body)[:8]) == tiny_ids("Red", "Handbags")


def test_search_reasons_follow_the_filters_applied(client: TestClient, served: Served) -> None:
    body = ok(client.get("/search", params={"q": "red handbag", "k": 4, "baseColour": "Blue"}))
    assert_all_pass(served, body, Filters(baseColour=("Blue",)))
    assert body["understood"]["filters"].get("baseColour") == ["Blue"]
    assert not any("Red" in r for i in body["items"] for r in i["reasons"])


def test_search_like_a_product_but_in_another_colour(client: TestClient, served: Served) -> None:
    body = ok(client.get("/search", params={"q": "something like this but in blue", "like": "101", "k": 4}))
    assert body["understood"]["filters"]["baseColour"] == ["Blue"]
    assert sorted(ids_of(body)) == tiny_ids("Blue", "Handbags", "Men")  # like's article and gender
    assert all(i["reasons"][0] == "like Brand0 Men Red Handbag" for i in body["items"])


def test_search_like_reasons_are_readable(client: TestClient) -> None:
    body = ok(client.get("/search", params={"q": "in blue", "like": "101", "k": 2}))
    assert not any("<like>" in r for i in body["items"] for r in i["reasons"])


def test_search_with_filters_only_ranks_the_matches(client: TestClient, served: Served) -> None:
    body = ok(client.get("/search", params={"q": "green", "articleType": "Watches", "gender": "Men", "k": 3}))
    assert_recommendation(body, 3)
    assert_all_pass(served, body, Filters(baseColour=("Green",), articleType=("Watches",), gender=("Men",)))


def test_image_search_finds_the_photo_product(client: TestClient, served: Served) -> None:
    # 130 is Women / Blue / Handbags #1; 126 (the Men variant) has the very same photo: a tie.
    files = {"image": ("whatever.bin", photo(served, "130"), "application/octet-stream")}
    body = ok(client.post("/search/image", params={"k": 3, "mode": "image"}, files=files))
    assert_recommendation(body, 3)
    assert body["mode"] == "image" and body["model_version"] == served.versions["image"]
    assert set(ids_of(body)[:2]) == {"126", "130"} and body["items"][0]["score"] > 0.99
    assert all(i["reasons"] == ["looks like your photo"] for i in body["items"])
    filtered = ok(
        client.post("/search/image", params={"k": 5, "mode": "image", "gender": "Women"}, files=files)
    )
    assert_recommendation(filtered, 5)
    assert ids_of(filtered)[0] == "130"
    assert_all_pass(served, filtered, Filters(gender=("Women",)))


@pytest.mark.parametrize("mode", ["fused", "text"])
def test_image_search_in_the_other_spaces(client: TestClient, served: Served, mode: str) -> None:
    files = {"image": ("a.jpg", photo(served, "130"), "image/jpeg")}
    body = ok(client.post("/search/image", params={"k": 5, "mode": mode}, files=files))
    assert_recommendation(body, 5)
    assert body["mode"] == mode and body["model_version"] == served.versions[mode]
    if mode == "fused":  # look + description: at least the kind of product is right
        assert all(served.payloads[pid]["articleType"] == "Handbags" for pid in ids_of(body)[:3])


def test_image_search_reads_png_as_well(client: TestClient, served: Served) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo(served, "150"))).save(buffer, "PNG")
    files = {"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")}  # the name lies; content decides
    body = ok(client.post("/search/image", params={"k": 2, "mode": "image"}, files=files))
    assert set(ids_of(body)) == {"150", "154"}


# ---- feed and events --------------------------------------------------------------------------------
def test_feed_cold_start_for_an_unknown_user(client: TestClient) -> None:
    body = ok(client.get("/users/never-seen/feed", params={"k": 8}))
    assert_recommendation(body, 8)
    assert body["personalized"] is False and body["model_version"] == "popularity"
    assert all(POPULARITY_REASON.match(i["reasons"][0]) for i in body["items"]), body["items"]


def test_feed_follows_posted_views_and_explains_them(client: TestClient, served: Served) -> None:
    user = "red-handbag-fan"
    cold = ids_of(ok(client.get(f"/users/{user}/feed", params={"k": 8})))
    viewed = tiny_ids("Red", "Handbags")[:3]
    assert post_events(client, views(user, viewed)) == {"accepted": 3, "duplicates": 0}
    body = ok(client.get(f"/users/{user}/feed", params={"k": 8}))
    assert_recommendation(body, 8)
    assert body["personalized"] is True and body["model_version"] == served.versions["behavior"]
    assert ids_of(body) != cold
    titles = {served.payloads[pid]["title"] for pid in viewed}
    for item in body["items"]:
        explained = [r for r in item["reasons"] if r.startswith("similar to ") and r.endswith(" you viewed")]
        assert explained and explained[0][len("similar to ") : -len(" you viewed")] in titles, item


def test_feed_falls_back_to_content_for_products_the_model_never_saw(
    client: TestClient, served: Served
) -> None:
    user = "green-tshirt-fan"
    viewed = tiny_ids(*UNSEEN_BY_GRU)[:2]
    post_events(client, views(user, viewed))
    body = ok(client.get(f"/users/{user}/feed", params={"k": 6, "articleType": "Tshirts"}))
    assert_recommendation(body, 6)
    assert body["personalized"] is True and body["model_version"] == "content-fallback"
    assert_all_pass(served, body, Filters(articleType=("Tshirts",)))
    assert all(i["reasons"][0].startswith("similar to Brand") for i in body["items"])


def test_feed_filters_restrict_every_item(client: TestClient, served: Served) -> None:
    user = "filtered-shopper"
    post_events(client, views(user, tiny_ids("Red", "Watches")[:2]))
    params = {"k": 5, "baseColour": "Blue", "gender": "Women", "diversity": 0.5}
    body = ok(client.get(f"/users/{user}/feed", params=params))
    assert_recommendation(body, 5)
    assert_all_pass(served, body, Filters(baseColour=("Blue",), gender=("Women",)))


def test_purchased_products_never_appear_in_the_feed(client: TestClient, served: Served) -> None:
    user = "buyer"
    post_events(client, views(user, tiny_ids("Blue", "Watches")[:2]))
    top = ids_of(ok(client.get(f"/users/{user}/feed", params={"k": 3})))
    purchase = {"event_id": f"{user}-buy", "user_id": user, "product_id": top[0], "type": "purchase"}
    post_events(client, [purchase])
    everything = ok(client.get(f"/users/{user}/feed", params={"k": 1000}))
    assert top[0] not in ids_of(everything) and len(everything["items"]) > 60
    # Even when the filters leave the purchased product as the best (or only) candidate.
    payload = served.payloads[top[0]]
    narrow = {key: payload[key] for key in ("gender", "articleType", "baseColour")}
    body = ok(client.get(f"/users/{user}/feed", params={"k": 10, **narrow}))
    assert top[0] not in ids_of(body)


def test_posting_events_is_idempotent_by_event_id(client: TestClient) -> None:
    user = "retrying-client"
    batch = views(user, tiny_ids("Green", "Watches")[:3])
    assert post_events(client, batch) == {"accepted": 3, "duplicates": 0}
    assert post_events(client, batch) == {"accepted": 0, "duplicates": 3}
    extra = views(user, ["101"], prefix="new")
    assert post_events(client, batch[:1] + extra) == {"accepted": 1, "duplicates": 1}
    assert len(ok(client.get(f"/users/{user}/events"))["events"]) == 4


def test_user_events_are_newest_first_and_limited(client: TestClient) -> None:
    user = "chronicler"
    batch = [
        {"event_id": "c1", "user_id": user, "product_id": "101", "type": "view", "ts": 1_780_000_000.0},
        {"event_id": "c2", "user_id": user, "product_id": "101", "type": "cart", "request_id": "r-1"},
        {"event_id": "c3", "user_id": user, "type": "search", "query": "red bag"},
    ]
    post_events(client, batch)
    body = ok(client.get(f"/users/{user}/events", params={"limit": 2}))
    assert body["user_id"] == user
    assert [e["event_id"] for e in body["events"]] == ["c3", "c2"]
    assert body["events"][0]["query"] == "red bag" and body["events"][1]["request_id"] == "r-1"
    everything = ok(client.get(f"/users/{user}/events"))["events"]
    assert [e["event_id"] for e in everything] == ["c3", "c2", "c1"] and everything[2][
        "ts"
    ] == 1_780_000_000.0
    assert ok(client.get("/users/nobody-at-all/events")) == {"user_id": "nobody-at-all", "events": []}


def test_delete_user_forgets_events_and_returns_to_cold_start(client: TestClient) -> None:
    user = "leaving-shopper"
    post_events(client, views(user, tiny_ids("Red", "Tshirts")[:3]))
    assert ok(client.get(f"/users/{user}/feed", params={"k": 4}))["personalized"] is True
    assert ok(client.get("/products/101/page", params={"user_id": user, "k": 2}))["modules"]
    body = ok(client.delete(f"/users/{user}", headers=AUTH))
    assert body == {  # the GRU's vector, and the product page's three module impressions
        "user_id": user,
        "deleted_events": 3,
        "deleted_impressions": 3,
        "deleted_cached_vectors": 1,
    }
    assert ok(client.get(f"/users/{user}/events"))["events"] == []
    feed = ok(client.get(f"/users/{user}/feed", params={"k": 4}))
    assert feed["personalized"] is False and feed["model_version"] == "popularity"
    again = ok(client.delete(f"/users/{user}", headers=AUTH))
    assert again["deleted_events"] == 0 and again["deleted_impressions"] == 0


# ---- auth --------------------------------------------------------------------------------------------
def test_writes_need_the_api_key_which_is_never_echoed(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    event = {"events": views("auth-user", ["101"])}
    caplog.set_level(logging.DEBUG)
    responses = [
        client.post("/events", json=event),
        client.post("/events", json=event, headers=WRONG_AUTH),
        client.post("/events", json=event, headers={"Authorization": f"Basic {API_KEY}"}),
        client.delete("/users/auth-user"),
        client.delete("/users/auth-user", headers=WRONG_AUTH),
    ]
    assert [r.status_code for r in responses] == [401, 403, 401, 401, 403]
    for response in responses:
        assert_error(response, response.status_code)
    assert responses[0].headers["www-authenticate"] == "Bearer"
    assert ok(client.get("/users/auth-user/events"))["events"] == []  # nothing was written
    responses.append(client.post("/events", json=event, headers=AUTH))
    responses.append(
        client.post("/events", content=b'{"events": [', headers={**AUTH, "content-type": "application/json"})
    )
    responses.append(client.delete("/users/auth-user", headers=AUTH))
    assert [r.status_code for r in responses[-3:]] == [200, 400, 200]
    for response in responses:
        shown = response.text + json.dumps(dict(response.headers))
        assert API_KEY not in shown and "guess-123" not in shown
    assert API_KEY not in caplog.text and "guess-123" not in caplog.text


def test_without_an_api_key_writes_are_open(served: Served) -> None:
    backend = served.client.app.state.backend
    with TestClient(create_app(backend, ApiSettings(api_key=None))) as open_client:
        assert ok(open_client.post("/events", json={"events": views("open-user", ["102"])}))["accepted"] == 1
        assert ok(open_client.delete("/users/open-user"))["deleted_events"] == 1


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "params", "status", "detail"),
    [
        ("GET", "/products/nope", {}, 404, "not in the catalog"),
        ("GET", "/products/nope/image", {}, 404, "not in the catalog"),
        ("GET", "/products/..%2F..%2Fetc%2Fpasswd/image", {}, 404, None),
        ("GET", "/products/nope/similar", {}, 404, "'nope' is not in the catalog"),
        ("GET", "/search", {"q": "bag", "like": "nope"}, 404, "not in the catalog"),
        ("GET", "/no/such/route", {}, 404, None),
        ("GET", "/products/101/similar", {"k": 0}, 422, "query.k"),
        ("GET", "/products/101/similar", {"k": -3}, 422, "query.k"),
        ("GET", "/products/101/similar", {"k": 1001}, 422, "query.k"),
        ("GET", "/products/101/similar", {"k": "ten"}, 422, "query.k"),
        ("GET", "/search", {"q": "bag", "k": 0}, 422, "query.k"),
        ("GET", "/search", {"q": "bag", "k": 1001}, 422, "query.k"),
        ("GET", "/users/u/feed", {"k": 0}, 422, "query.k"),
        ("GET", "/users/u/feed", {"k": 1001}, 422, "query.k"),
        ("GET", "/products/101/similar", {"baseColour": "Purple"}, 422, "unknown baseColour 'Purple'"),
        ("GET", "/products/101/similar", {"gender": "Robots"}, 422, "known values: Men, Women"),
        ("GET", "/search", {"q": "bag", "articleType": "Spaceships"}, 422, "unknown articleType"),
        ("GET", "/users/u/feed", {"masterCategory": "Food"}, 422, "unknown masterCategory"),
        ("GET", "/users/u/feed", {"subCategory": "Nope"}, 422, "unknown subCategory"),
        ("GET", "/products/101/similar", {"min_price": 50, "max_price": 10}, 422, "above max_price"),
        ("GET", "/products/101/similar", {"min_price": -1}, 422, "query.min_price"),
        ("GET", "/products/101/similar", {"max_price": "nan"}, 422, "query.max_price"),
        ("GET", "/products/101/similar", {"in_stock": "maybe"}, 422, "query.in_stock"),
        ("GET", "/products/101/similar", {"mode": "vibes"}, 422, "query.mode"),
        ("GET", "/products/101/similar", {"diversity": 1.5}, 422, "query.diversity"),
        ("GET", "/products/101/similar", {"exclude": ",".join(map(str, range(1001)))}, 422, "1000"),
        ("GET", "/search", {"mode": "behavior", "q": "bag"}, 422, "query.mode"),
        ("GET", "/search", {}, 422, "give a query"),
        ("GET", "/search", {"q": "   "}, 422, "give a query"),
        ("GET", "/search", {"q": "x" * 1001}, 422, "query.q"),
        ("GET", "/users/u/events", {"limit": 0}, 422, "query.limit"),
        ("GET", "/users/u/events", {"limit": 10_001}, 422, "query.limit"),
        ("PUT", "/events", {}, 405, None),
    ],
)
def test_bad_requests_get_a_json_4xx(client: TestClient, method, path, params, status, detail) -> None:
    assert_error(client.request(method, path, params=params), status, detail)


def _event(**fields) -> dict:
    return {"event_id": "bad-1", "user_id": "bad-user", "product_id": "101", "type": "view", **fields}


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b'{"events": [', 400, "JSON"),
        (b"not json at all", 400, "JSON"),
        (b"[1, 2]", 422, "body"),
        (b'{"events": []}', 422, "events"),
        (json.dumps({"events": [_event(type="like")]}).encode(), 422, "type"),
        (json.dumps({"events": [_event(product_id="nope")]}).encode(), 422, "unknown product id(s) ['nope']"),
        (json.dumps({"events": [_event(colour="red")]}).encode(), 422, "colour"),
        (
            json.dumps({"events": [_event(type="search", product_id=None)]}).encode(),
            422,
            "needs a non-empty query",
        ),
        (json.dumps({"events": [_event(product_id=None)]}).encode(), 422, "needs a product_id"),
        (json.dumps({"events": [_event(user_id="")]}).encode(), 422, "user_id"),
        (json.dumps({"events": [_event(user_id="u" * 201)]}).encode(), 422, "longer than"),
        (
            b'{"events": [{"event_id": "n", "user_id": "u", "product_id": "101", "type": "view", '
            b'"ts": NaN}]}',
            422,
            "finite",
        ),
        (json.dumps({"events": [_event(event_id=f"b{i}") for i in range(1001)]}).encode(), 422, "events"),
        (b'{"events": [' + b'{"x": "' + b"y" * (3 * 1024 * 1024) + b'"}]}', 413, "limit"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_stored(
    client: TestClient, body: bytes, status, detail
) -> None:
    response = client.post("/events", content=body, headers={**AUTH, "content-type": "application/json"})
    assert_error(response, status, detail)
    assert ok(client.get("/users/bad-user/events"))["events"] == []
    assert ok(client.get("/users/u/events"))["events"] == []


def test_a_bad_event_in_a_batch_stores_none_of_it(client: TestClient) -> None:
    batch = [
        _event(event_id="fine", user_id="batch-user"),
        _event(event_id="bad", user_id="batch-user", product_id="nope"),
    ]
    assert_error(client.post("/events", json={"events": batch}, headers=AUTH), 422, "nothing was stored")
    assert ok(client.get("/users/batch-user/events"))["events"] == []


def test_boolean_ids_are_refused(client: TestClient) -> None:
    response = client.post(
        "/events", json={"events": [_event(event_id=True, user_id="bool-user")]}, headers=AUTH
    )
    assert_error(response, 422)


@pytest.mark.parametrize(
    ("name", "content", "status", "detail"),
    [
        ("text.jpg", b"this is not a photo, whatever its name says", 415, "not an image"),
        ("script.png", b"#!/bin/sh\necho hi\n", 415, "not an image"),
        ("empty.jpg", b"", 422, "empty"),
        ("truncated.jpg", b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50, 422, "corrupt or truncated"),
        ("truncated.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "corrupt or truncated"),
        ("big.jpg", b"\xff\xd8\xff" + bytes(10 * 1024 * 1024), 413, "limit"),  # just over 10 MB
        ("huge.jpg", b"\xff\xd8\xff" + bytes(12 * 1024 * 1024), 413, "limit"),  # refused by Content-Length
    ],
)
def test_bad_uploads_are_refused_by_content(client: TestClient, name, content, status, detail) -> None:
    response = client.post("/search/image", files={"image": (name, content, "image/jpeg")})
    assert_error(response, status, detail)


@pytest.mark.parametrize(
    ("width", "height", "detail"),
    [
        (20000, 20000, "decompression bomb"),  # over twice Pillow's limit: Pillow refuses to open it
        (10000, 10000, "decompression bomb"),  # between Pillow's limit and twice it: Pillow only warns
        (10000, 5000, "50,000,000 pixels"),  # under Pillow's limit: only serving/uploads.py's check
    ],
)
def test_a_decompression_bomb_is_refused(client: TestClient, width: int, height: int, detail: str) -> None:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")  # all black: a few KB on the wire
    assert len(buffer.getvalue()) < 100_000
    response = client.post("/search/image", files={"image": ("small.png", buffer.getvalue(), "image/png")})
    assert_error(response, 413, detail)


def test_an_oversized_chunked_upload_is_cut_off(client: TestClient) -> None:
    boundary = "sgboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():  # a generator: sent chunked, without a Content-Length to check up front
        yield head + b"\xff\xd8\xff"
        for _ in range(12):
            yield bytes(1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/search/image", content=body(), headers=headers)
    assert_error(response, 413, "limit")


PHOTO = object()  # stands for a real catalog photo in the parameters below


@pytest.mark.parametrize(
    ("kwargs", "status", "detail"),
    [
        ({"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 415, "multipart/form-data"),
        ({"files": {"photo": ("a.jpg", PHOTO, "image/jpeg")}}, 422, "field `image`"),
        (
            {"data": {"image": "a string, not a file"}, "files": {"other": ("a.jpg", PHOTO, "image/jpeg")}},
            422,
            "field `image`",
        ),
        ({"files": {"image": ("a.jpg", PHOTO, "image/jpeg")}, "params": {"k": 0}}, 422, "query.k"),
        (
            {"files": {"image": ("a.jpg", PHOTO, "image/jpeg")}, "params": {"mode": "behavior"}},
            422,
            "query.mode",
        ),
        (
            {"files": {"image": ("a.jpg", PHOTO, "image/jpeg")}, "params": {"baseColour": "Mauve"}},
            422,
            "Mauve",
        ),
    ],
)
def test_bad_image_search_requests(client: TestClient, served: Served, kwargs, status, detail) -> None:
    if "files" in kwargs:
        kwargs["files"] = {
            field: (name, photo(served, "101") if content is PHOTO else content, kind)
            for field, (name, content, kind) in kwargs["files"].items()
        }
    assert_error(client.post("/search/image", **kwargs), status, detail)


def test_refused_bodies_are_counted_in_metrics(client: TestClient) -> None:
    def refused() -> float:
        return metric(client, "shopguide_requests_total", route="/search/image", status="413") or 0.0

    before = refused()
    huge = {"image": ("huge.jpg", b"\xff\xd8\xff" + bytes(12 * 1024 * 1024), "image/jpeg")}
    assert_error(client.post("/search/image", files=huge), 413, "the body is")
    assert refused() == before + 1


# ---- failures of the server itself ------------------------------------------------------------------
class _BrokenBackend:
    """Answers `stats` (so /metrics works) and crashes on everything else."""

    async def call(self, method: str, *args, **kwargs):
        if method == "stats":
            return {"products": 0, "events": 0, "model_versions": {}}
        raise RuntimeError(f"disk on fire while calling {method} with {API_KEY}")


def test_a_crash_is_a_json_500_without_internals_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="shopguide.api")
    with TestClient(create_app(_BrokenBackend()), raise_server_exceptions=False) as broken:
        response = broken.get("/products/101/similar")
        body = assert_error(response, 500, "error id")
        assert "disk on fire" not in response.text
        error_id = re.search(r"error id (\w+)", body["detail"]).group(1)
        assert error_id in caplog.text and "disk on fire" in caplog.text  # found in the log by its id
        metrics = broken.get("/metrics").text
        assert 'shopguide_errors_total{route="/products/{product_id}/similar"} 1.0' in metrics


def test_a_starting_server_answers_503() -> None:
    with TestClient(create_app(None), raise_server_exceptions=False) as starting:
        assert_error(starting.get("/healthz"), 503, "starting")
        assert_error(starting.get("/products/101/similar"), 503, "starting")

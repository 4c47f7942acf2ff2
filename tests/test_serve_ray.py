"""The shopguide application on a real local Ray Serve, spoken to over HTTP (one cluster per module)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.deployments import AppArgs, build_app, compose_app
from serving.server import DEFAULT_CONFIG, deployment_options, ray_environment
from tests.conftest import free_port
from tests.serving_fixtures import API_KEY, serving_data_copy, tiny_ids

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP_NAME = "shopguide"
# Small enough that 30 concurrent photo searches overflow the ingress: 1 running + 1 queued.
TIGHT_INGRESS = {
    "max_ongoing_requests": 1,
    "max_queued_requests": 1,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
}


@dataclass
class RayServe:
    http: httpx.Client
    data_dir: Path
    catalog: Path
    logs_dir: Path


def _deploy(data_dir: Path, ingress_options: dict | None = None) -> None:
    """serve.run the application with infra/serve/shopguide.yaml's deployment options (as `shopguide
    serve` does), the Ingress's optionally overridden."""
    from ray import serve

    options = deployment_options(DEFAULT_CONFIG)
    if ingress_options:
        options["Ingress"] = {**options["Ingress"], **ingress_options}
    serve.run(
        compose_app(AppArgs(data_dir=str(data_dir), api_key=API_KEY), options),
        name=APP_NAME,
        route_prefix="/",
    )


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory):
    import ray._private.ray_constants as constants

    # `shopguide serve`'s settings, undone afterwards: its local-only mode would refuse the two-node
    # cluster of a test that runs later in the same process (tests/test_reembed_ray.py).
    saved_env, saved_cluster = dict(os.environ), constants.ENABLE_RAY_CLUSTER
    ray_environment()  # what `shopguide serve` runs with
    import ray
    from ray import serve

    data_dir = serving_data_copy(tmp_path_factory, "ray")
    # address="local": always a fresh cluster of our own, never one another process started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    http = None
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(data_dir)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        catalog = Path(json.loads((data_dir / "ingest.json").read_text())["catalog"])
        logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        yield RayServe(http, data_dir, catalog, logs_dir)
    finally:
        if http is not None:
            http.close()
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)
        constants.ENABLE_RAY_CLUSTER = saved_cluster


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _ids(body: dict) -> list[str]:
    return [item["product_id"] for item in body["items"]]


def _photo(served: RayServe, product_id: str) -> dict:
    return {
        "image": ("photo.jpg", (served.catalog / "images" / f"{product_id}.jpg").read_bytes(), "image/jpeg")
    }


def _assert_error(response: httpx.Response, status: int, error: str, detail: str) -> None:
    """A JSON error body with the message meant for the caller, never a (remote) traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": error, "detail": detail}


# ---- the builder `serve run infra/serve/shopguide.yaml` uses (no cluster needed) ----------------------
def test_build_app_takes_the_yaml_args(tmp_path_factory: pytest.TempPathFactory) -> None:
    from pydantic import ValidationError
    from ray.serve import Application

    data_dir = serving_data_copy(tmp_path_factory, "builder")
    assert isinstance(build_app({"data_dir": str(data_dir)}), Application)
    with pytest.raises(ValidationError, match="data_dirr"):
        build_app({"data_dirr": str(data_dir)})
    with pytest.raises(ValidationError, match="extra"):
        AppArgs(data_dir=str(data_dir), replicas=2)
    with pytest.raises(FileNotFoundError, match="shopguide ingest"):
        build_app({"data_dir": str(data_dir / "missing")})


def test_the_yaml_configures_every_deployment() -> None:
    options = deployment_options(DEFAULT_CONFIG)
    assert set(options) == {"Ingress", "Recommender", "TextEncoder", "ImageEncoder"}
    assert options["Ingress"]["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert options["Recommender"]["num_replicas"] == 1  # one process owns the embedded index


# ---- over HTTP ----------------------------------------------------------------------------------------
def test_healthz_through_the_replicas(ray_serve: RayServe) -> None:
    body = _ok(ray_serve.http.get("/healthz"))
    assert body["status"] == "ok" and body["products"] == 72
    assert body["model_versions"]["user_encoder"].startswith("gru_sequence")


def test_recommendations_over_http(ray_serve: RayServe) -> None:
    http = ray_serve.http
    similar = _ok(http.get("/products/101/similar", params={"k": 5, "articleType": "Handbags"}))
    assert len(similar["items"]) == 5 and "101" not in _ids(similar)
    assert set(_ids(similar)) <= set(tiny_ids(article="Handbags"))
    search = _ok(http.get("/search", params={"q": "do you have red handbags for women?"}))
    assert search["understood"]["filters"]["baseColour"] == ["Red"]
    assert sorted(_ids(search)) == tiny_ids("Red", "Handbags", "Women")
    photo = _ok(http.post("/search/image", params={"k": 2, "mode": "image"}, files=_photo(ray_serve, "130")))
    assert set(_ids(photo)) == {"126", "130"}  # the photo's product and its identical twin
    feed = _ok(http.get("/users/ray-newcomer/feed", params={"k": 6}))
    assert len(feed["items"]) == 6 and feed["personalized"] is False
    product = _ok(http.get("/products/105"))
    assert product["title"] == "Brand0 Women Red Handbag"
    image = http.get("/products/105/image")
    assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
    assert "shopguide_index_products 72.0" in http.get("/metrics").text


def test_events_need_the_key_and_change_the_feed(ray_serve: RayServe) -> None:
    http = ray_serve.http
    user = "ray-shopper"
    events = {
        "events": [
            {"event_id": f"ray-{pid}", "user_id": user, "product_id": pid, "type": "view"}
            for pid in tiny_ids("Red", "Handbags")[:3]
        ]
    }
    unauthorized = http.post("/events", json=events)
    forbidden = http.post("/events", json=events, headers={"Authorization": "Bearer guess-123"})
    assert (unauthorized.status_code, forbidden.status_code) == (401, 403)
    assert unauthorized.json()["error"] == "unauthorized" and forbidden.json()["error"] == "forbidden"
    assert _ok(http.post("/events", json=events, headers=AUTH)) == {"accepted": 3, "duplicates": 0}
    assert _ok(http.post("/events", json=events, headers=AUTH)) == {"accepted": 0, "duplicates": 3}
    feed = _ok(http.get(f"/users/{user}/feed", params={"k": 5}))
    assert feed["personalized"] is True
    assert all(any(r.endswith(" you viewed") for r in item["reasons"]) for item in feed["items"])
    assert http.delete(f"/users/{user}").status_code == 401
    assert _ok(http.delete(f"/users/{user}", headers=AUTH))["deleted_events"] == 3
    assert _ok(http.get(f"/users/{user}/feed", params={"k": 5}))["personalized"] is False
    for response in (unauthorized, forbidden):
        assert API_KEY not in response.text + str(response.headers)
    # Nothing the cluster logged (the replicas, the proxy, the controller) holds the key.
    leaked = [
        p.name for p in ray_serve.logs_dir.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()
    ]
    assert not leaked, f"the API key appears in Ray's logs: {leaked}"


def test_errors_raised_in_the_recommender_replica_keep_their_message(ray_serve: RayServe) -> None:
    http = ray_serve.http
    # Raised inside the Recommender replica: Ray wraps them; the client must see the plain message.
    _assert_error(
        http.get("/products/nope/similar"), 404, "not found", "product 'nope' is not in the catalog"
    )
    _assert_error(http.get("/products/nope"), 404, "not found", "product 'nope' is not in the catalog")
    response = http.get("/products/101/similar", params={"baseColour": "Purple"})
    assert response.status_code == 422 and response.json()["error"] == "invalid request"
    assert response.json()["detail"].startswith("unknown baseColour 'Purple'; known values: Blue, Green, Red")
    bad_event = {"events": [{"event_id": "x", "user_id": "u", "product_id": "nope", "type": "view"}]}
    _assert_error(
        http.post("/events", json=bad_event, headers=AUTH),
        422,
        "invalid request",
        "unknown product id(s) ['nope']; nothing was stored",
    )
    for response in (
        http.get("/products/nope/similar"),
        http.get("/search", params={"q": "x", "like": "nope"}),
    ):
        assert "Traceback" not in response.text and "RayTaskError" not in response.text


def test_overload_is_a_503_with_retry_after(ray_serve: RayServe) -> None:
    """Beyond max_ongoing_requests + max_queued_requests of the ingress, Ray Serve sheds load."""
    _deploy(ray_serve.data_dir, TIGHT_INGRESS)
    files = _photo(ray_serve, "150")

    def photo_search(_: int) -> httpx.Response:
        return ray_serve.http.post("/search/image", params={"k": 5}, files=files)

    with ThreadPoolExecutor(max_workers=30) as pool:
        responses = list(pool.map(photo_search, range(30)))
    statuses = sorted(r.status_code for r in responses)
    shed = [r for r in responses if r.status_code == 503]
    assert shed, f"no request was shed: {statuses}"
    assert all(r.headers.get("retry-after") == "1" for r in shed), [dict(r.headers) for r in shed]
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    assert statuses.count(200) >= 1
    assert len(_ok(ray_serve.http.post("/search/image", params={"k": 5}, files=files))["items"]) == 5


def test_a_promoted_model_is_followed_through_ray_and_a_broken_one_is_logged(
    ray_serve: RayServe, tmp_path: Path
) -> None:
    """The Recommender replica follows the registry (no restart, no redeploy); a model that fails to
    load leaves the old one serving, shows in /healthz and is written to the replica's log file."""
    import time

    from encoders.sequence import SequenceEncoder
    from training.registry import ModelRegistry

    registry = ModelRegistry(ray_serve.data_dir / "models" / "registry")
    model = SequenceEncoder.load(ray_serve.data_dir / "models" / "sequence")
    SequenceEncoder(model.model, model.item_ids).save(tmp_path / "copy")
    good = registry.register(tmp_path / "copy", "full").version
    assert registry.promote(good, lambda _: {"NDCG@10": 0.5}).promoted

    def health_within(seconds: float, check) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            body = _ok(ray_serve.http.get("/healthz"))
            if check(body) or time.monotonic() > deadline:
                return body
            time.sleep(0.25)

    body = health_within(15, lambda b: b["model_versions"]["user_encoder_version"] == good)
    assert body["model_versions"]["user_encoder_version"] == good  # the default poll is 2 s
    broken = registry.register(tmp_path / "copy", "full").version
    (registry.path(broken) / "sequence_model.pt").write_bytes(b"not a checkpoint")
    assert registry.promote(broken, lambda _: {"NDCG@10": 0.5}).promoted
    body = health_within(15, lambda b: "refresh_error" in b)
    assert broken in body["refresh_error"] and body["model_versions"]["user_encoder_version"] == good
    assert len(_ok(ray_serve.http.get("/users/nobody-yet/feed", params={"k": 3}))["items"]) == 3
    logged = [
        p.name
        for p in (ray_serve.logs_dir / "serve").glob("replica_*Recommender*.log")
        if f"cannot load user-encoder model {broken}" in p.read_text(errors="replace")
    ]
    assert logged, "the failed refresh is in the Recommender replica's log file"
    registry.rollback()  # leave the registry live on the good model for any later test

"""PATCH /products/{id}: payload-only price and stock updates, seen by the next query; bad input refused."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serving.api import ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from tests.serving_fixtures import API_KEY, serving_data_copy

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    recommender = build_recommender(
        resolve_paths(AppArgs(data_dir=str(serving_data_copy(tmp_path_factory, "patch"))))
    )
    with TestClient(create_app(LocalBackend(recommender), ApiSettings(api_key=API_KEY))) as test_client:
        yield test_client
    recommender.close()


def test_price_and_stock_change_and_the_next_query_sees_it(client: TestClient) -> None:
    before = client.get("/products/101").json()
    vectors_before = client.get("/products/101/similar?k=5").json()["items"]
    response = client.patch("/products/101", json={"price": 12.5, "in_stock": False}, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["price"] == 12.5 and response.json()["in_stock"] is False
    assert client.get("/products/101").json()["title"] == before["title"]  # the rest of the payload stays
    # Filters see the new values at once...
    cheap = client.get("/products/105/similar", params={"k": 5, "max_price": 13, "in_stock": "false"}).json()
    assert "101" in [i["product_id"] for i in cheap["items"]]
    in_stock = client.get("/products/105/similar", params={"k": 71, "in_stock": "true"}).json()
    assert "101" not in [i["product_id"] for i in in_stock["items"]]
    # ...and the vectors are untouched: the product's neighbours are the same.
    assert client.get("/products/101/similar?k=5").json()["items"] == vectors_before


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"price": -1}, 422, "greater than or equal to 0"),
        ({"price": "cheap"}, 422, "valid number"),
        ({"in_stock": "yes"}, 422, "valid boolean"),
        ({"title": "new name"}, 422, "Extra inputs"),
        ({}, 422, "only price and in_stock"),
        ({"price": None}, 422, "finite number"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(
    client: TestClient, body: dict, status: int, text: str
) -> None:
    before = client.get("/products/102").json()
    response = client.patch("/products/102", json=body, headers=AUTH)
    assert response.status_code == status and text in str(response.json()["detail"])
    assert client.get("/products/102").json() == before


def test_unknown_product_and_auth(client: TestClient) -> None:
    assert client.patch("/products/nope", json={"price": 1}, headers=AUTH).status_code == 404
    assert client.patch("/products/101", json={"price": 1}).status_code == 401
    assert (
        client.patch(
            "/products/101", json={"price": 1}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 403
    )


def test_cli_update_when_no_server_runs(tmp_path_factory: pytest.TempPathFactory, capsys) -> None:
    from serving.cli import main

    data_dir = str(serving_data_copy(tmp_path_factory, "patch-cli"))
    assert (
        main(["products", "update", "103", "--price", "9.99", "--out-of-stock", "--data-dir", data_dir]) == 0
    )
    assert capsys.readouterr().out.strip() == "103: price 9.99, in stock False"
    assert main(["products", "update", "103", "--data-dir", data_dir]) == 2
    assert "nothing to change" in capsys.readouterr().err
    assert main(["products", "update", "nope", "--price", "1", "--data-dir", data_dir]) == 2
    assert "not in the index" in capsys.readouterr().err
    assert main(["products", "update", "103", "--price", "-2", "--data-dir", data_dir]) == 2

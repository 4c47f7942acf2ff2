"""PATCH /products/{id}: payload-only price and stock updates, seen by the next query and kept by rebuilds."""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from index import EdgeStore
from serving.api import ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from tests.serving_fixtures import API_KEY, serving_data_copy
from training.ingest import ALIAS, run_ingest
from training.overrides import OverrideStore, OverrideStoreError

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
    capsys.readouterr()  # what building the serving data printed (when this test runs first)
    assert (
        main(["products", "update", "103", "--price", "9.99", "--out-of-stock", "--data-dir", data_dir]) == 0
    )
    assert capsys.readouterr().out.strip() == "103: price 9.99, in stock False"
    assert main(["products", "update", "103", "--data-dir", data_dir]) == 2
    assert "nothing to change" in capsys.readouterr().err
    assert main(["products", "update", "nope", "--price", "1", "--data-dir", data_dir]) == 2
    assert "not in the index" in capsys.readouterr().err
    assert main(["products", "update", "103", "--price", "-2", "--data-dir", data_dir]) == 2
    # Recorded for rebuilds: in DATA_DIR by default, or in the file --overrides-db names.
    assert OverrideStore.at(Path(data_dir)).values() == {"103": {"price": 9.99, "in_stock": False}}
    elsewhere = Path(data_dir).parent / "elsewhere.db"
    args = ["--data-dir", data_dir, "--overrides-db", str(elsewhere)]
    assert main(["products", "update", "104", "--price", "5", *args]) == 0
    assert OverrideStore(elsewhere).values() == {"104": {"price": 5.0}}
    assert set(OverrideStore.at(Path(data_dir)).values()) == {"103"}
    capsys.readouterr()
    assert main(["products", "overrides", "--data-dir", data_dir]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listed] == [["103", "in_stock", "False"], ["103", "price", "9.99"]]
    assert "(catalog: True;" in listed[0]
    assert main(["products", "overrides", "--data-dir", data_dir, "--overrides-db", str(elsewhere)]) == 0
    assert capsys.readouterr().out.startswith("104  price")
    assert main(["products", "overrides", "--data-dir", str(Path(data_dir).parent / "empty")]) == 0
    assert "no live price/stock updates recorded" in capsys.readouterr().out


# ---- live updates survive rebuilds (training/overrides.py) --------------------------------------------
def _payloads(data_dir: Path, ids: list[str], collection: str | None = None) -> dict[str, dict]:
    """What the live collection (or `collection`) holds for `ids`, read the way a second process would."""
    store = EdgeStore(data_dir / "index")
    try:
        index = store.open_collection(collection) if collection else store.open(ALIAS)
        return {r.product_id: r.payload for r in index.get(ids)}
    finally:
        store.close()


def _catalog_with(catalog: Path, target: Path, prices: dict[str, str], drop: set[str]) -> Path:
    """A copy of `catalog` with a price column (set for `prices`, blank = derived) and `drop` removed."""
    shutil.copytree(catalog, target)
    with (catalog / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with (target / "products.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*rows[0], "price"])
        writer.writerows([*row, prices.get(row[0], "")] for row in rows[1:] if row[0] not in drop)
    return target


def test_live_updates_survive_a_reingest_until_the_catalog_changes(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from serving.cli import main

    data_dir = serving_data_copy(tmp_path_factory, "overrides-ingest")
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    catalog = Path(recommender.manifest["catalog"])
    catalog_price = recommender.product("101")["price"]
    recommender.update_product("101", {"price": 12.5, "in_stock": False})
    recommender.update_product("102", {"in_stock": False})
    recommender.close()
    assert main(["products", "update", "103", "--price", "7", "--data-dir", str(data_dir)]) == 0

    # The same catalog again: every live update stays, and no payload is rewritten.
    assert _reingest(catalog, data_dir).products_indexed == 0
    after = _payloads(data_dir, ["101", "102", "103"])
    assert (after["101"]["price"], after["101"]["in_stock"]) == (12.5, False)
    assert after["102"]["in_stock"] is False and after["103"]["price"] == 7.0

    # The shop's new catalog prices 101 itself and no longer has 103: those updates give way to it.
    changed = _catalog_with(catalog, tmp_path / "catalog", {"101": "20"}, drop={"103"})
    summary = _reingest(changed, data_dir)
    assert summary.products_deleted == 1
    after = _payloads(data_dir, ["101", "102", "103"])
    assert after["101"]["price"] == 20.0 != catalog_price
    assert after["101"]["in_stock"] is False  # the catalog did not change the stock: the update stays
    assert after["102"]["in_stock"] is False and "103" not in after
    assert {pid: sorted(f) for pid, f in OverrideStore.at(data_dir).read().items()} == {
        "101": ["in_stock"],
        "102": ["in_stock"],
    }


def _reingest(catalog: Path, data_dir: Path):
    store = EdgeStore(data_dir / "index")
    try:
        return run_ingest(catalog, store, data_dir, progress=False)
    finally:
        store.close()


def test_live_updates_survive_a_reembed_and_reach_the_new_collection_at_the_swap(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.cli import main
    from training.reembed import run_reembed
    from training.vectors import EncoderConfig

    data_dir = serving_data_copy(tmp_path_factory, "overrides-reembed")
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    old = recommender.index.name
    catalog_price = recommender.product("101")["price"]
    recommender.update_product("101", {"price": 12.5})
    # A separate store, as a `shopguide reembed` process has; same towers, another fusion (no embedding).
    config = replace(EncoderConfig(**recommender.manifest["encoders"]), fused_image_weight=0.6)
    with EdgeStore(data_dir / "index") as other:
        summary = run_reembed(Path(recommender.manifest["catalog"]), other, data_dir, config, progress=False)
    assert summary.swapped
    assert _payloads(data_dir, ["101"], summary.collection)["101"]["price"] == 12.5  # written by the re-embed

    # Updates after the re-embed wrote its collection, before the server switches to it: one new, one
    # back to the catalog's value. The server writes both into the new collection before the swap.
    recommender.update_product("102", {"price": 3.0})
    recommender.update_product("101", {"price": catalog_price})
    # An unusable override store stops the switch (the new collection would lack the updates) and
    # keeps the old collection serving; once it is back, the next poll switches.
    saved = recommender.overrides.path
    recommender.overrides.path = saved.parent / "broken-overrides.db"
    recommender.overrides.path.write_bytes(b"not a database, " * 256)
    assert recommender.refresh() == {} and "price/stock overrides" in recommender.refresh_error
    assert recommender.index.name == old and recommender.product("102")["price"] == 3.0
    recommender.overrides.path = saved
    # And one while the server prepares the switch (after it wrote the updates above into the new
    # collection, before the swap): it lands on the old collection, and the swap must bring it along.
    prepare = recommender._read_catalog_values

    def update_while_preparing(index):
        recommender.update_product("105", {"price": 6.5})
        return prepare(index)

    monkeypatch.setattr(recommender, "_read_catalog_values", update_while_preparing)
    assert recommender.refresh()["collection"] == {"from": old, "to": summary.collection}
    monkeypatch.undo()
    assert recommender.product("102")["price"] == 3.0 and recommender.product("105")["price"] == 6.5
    assert recommender.product("101")["price"] == catalog_price

    # Swapped back to the old collection, which missed an update made on the new one.
    recommender.update_product("104", {"in_stock": not recommender.product("104")["in_stock"]})
    wanted = recommender.product("104")["in_stock"]
    assert main(["reembed", "--swap-back", "--data-dir", str(data_dir)]) == 0
    assert recommender.refresh()["collection"] == {"from": summary.collection, "to": old}
    assert recommender.product("104")["in_stock"] is wanted
    assert recommender.product("102")["price"] == 3.0 and recommender.product("101")["price"] == catalog_price
    recommender.close()


def test_override_store_keeps_the_first_catalog_value_and_refuses_a_corrupt_file(tmp_path: Path) -> None:
    store = OverrideStore(tmp_path / "overrides.db")
    assert store.values() == {} and store.reconcile({"1": {"price": 5.0}}, complete=True) == {}
    store.record("1", {"price": 4.0}, {"price": 5.0, "in_stock": True})
    store.record("1", {"price": 3.0}, {"price": 4.0, "in_stock": True})  # the payload already has 4.0
    assert store.read()["1"]["price"]["catalog"] == 5.0 and store.values() == {"1": {"price": 3.0}}
    store.record("2", {"in_stock": False}, {"price": 1.0, "in_stock": True})
    # A partial catalog (--limit) keeps updates of products it does not hold; a complete one drops them.
    assert store.reconcile({"1": {"price": 5.0}}, complete=False) == {"1": {"price": 3.0}}
    assert store.reconcile({"1": {"price": 5.0}}, complete=True) == {"1": {"price": 3.0}}
    assert store.values() == {"1": {"price": 3.0}}
    with store._transaction():  # a writer (an ingest's reconcile) holds the lock: readers do not wait
        started = time.monotonic()
        assert store.values() == {"1": {"price": 3.0}} and time.monotonic() - started < 5
    with pytest.raises(ValueError, match="only price, in_stock"):
        store.record("1", {"title": "x"}, {})
    store.path.write_bytes(b"not a database, " * 256)
    with pytest.raises(OverrideStoreError, match="cannot use the live price/stock overrides"):
        store.values()


def test_an_update_that_cannot_be_recorded_changes_nothing(client: TestClient) -> None:
    """A broken override store: the update is refused (503), and the index keeps the old values, so
    nothing is live that a rebuild would silently revert."""
    recommender = client.app.state.backend.recommender
    before = client.get("/products/106").json()
    saved = recommender.overrides.path
    recommender.overrides.path = saved.parent / "broken-overrides.db"
    recommender.overrides.path.write_bytes(b"not a database, " * 256)
    try:
        response = client.patch("/products/106", json={"price": 1.0}, headers=AUTH)
    finally:
        recommender.overrides.path = saved
    assert response.status_code == 503 and "nothing was changed" in response.json()["detail"]
    assert client.get("/products/106").json() == before

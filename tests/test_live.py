"""The server follows registry and alias without restarts: promotions, A/B, new products, re-embeds."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from encoders.sequence import SequenceEncoder
from index import Record
from serving.api import ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.live import SwapGuard, ab_arm
from serving.recommend import MAPPED
from tests.conftest import ARTICLES, COLOURS
from tests.serving_fixtures import serving_data_copy, tiny_ids
from training.behavior import is_behavior_space
from training.events import Event
from training.registry import ModelRegistry


def _variant(data_dir: Path, tmp: Path, seed: int) -> Path:
    """The fixture's GRU with perturbed weights: another model version with the same vocabulary."""
    encoder = SequenceEncoder.load(data_dir / "models" / "sequence")
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    folder = tmp / f"variant{seed}"
    SequenceEncoder(encoder.model, encoder.item_ids).save(folder)
    return folder


def _register_and_promote(registry: ModelRegistry, folder: Path) -> str:
    version = registry.register(folder, "full").version
    assert registry.promote(version, lambda _: {"NDCG@10": 0.5}).promoted
    return version


@pytest.fixture
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serving_data_copy(tmp_path_factory, "live")


def _shoppers(recommender, n: int = 6) -> list[str]:
    """Shoppers with a history the GRU knows (their feed is ranked by the model)."""
    known = recommender.sequence.item_ids
    events = [
        Event(f"live-{u}-{j}", f"live-shopper-{u}", known[(u * 7 + j) % len(known)], "view", ts=1.0 + j)
        for u in range(n)
        for j in range(3)
    ]
    recommender.events.add(events)
    return [f"live-shopper-{u}" for u in range(n)]


def test_a_promoted_model_is_served_without_restart_and_without_failed_requests(
    data_dir: Path, tmp_path: Path
) -> None:
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    app = create_app(LocalBackend(recommender), ApiSettings())
    registry = ModelRegistry(data_dir / "models" / "registry")
    shoppers = _shoppers(recommender)
    first = recommender.model_versions()
    assert first["user_encoder_version"] == "folder:sequence"
    failures: list[str] = []
    seen_versions: set[str] = set()
    counts = [0]

    def load(client: TestClient, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            user = shoppers[i % len(shoppers)]
            for response in (
                client.get(f"/users/{user}/feed", params={"k": 8}),
                client.get("/products/101/similar", params={"k": 8, "mode": "behavior"}),
            ):
                body = response.json()
                if response.status_code != 200 or len(body.get("items", [])) != 8:
                    failures.append(f"{response.status_code} {str(body)[:200]}")
                else:
                    seen_versions.add(body["model_version"])
            counts[0] += 1
            i += 1

    with _under_load(app, load):
        promoted = []
        for seed in (1, 2, 3):
            promoted.append(_register_and_promote(registry, _variant(data_dir, tmp_path, seed)))
            changes = recommender.refresh()  # what the watcher does every model_poll_s
            assert changes["live_model"]["to"] == promoted[-1]
            assert recommender.model_versions()["user_encoder_version"] == promoted[-1]
            _wait_for_requests(counts, 3)  # let the load run on this model before the next switch
        registry.rollback()
        assert recommender.refresh()["live_model"]["to"] == promoted[-2]
    assert failures == [], failures[:5]
    assert len(seen_versions) >= 4  # requests really ran on the first model and every promoted one
    # Left in the collection: the live model's behavior space and the one retired last (other replicas
    # on a Qdrant server may serve it until their next poll); older ones were dropped.
    behavior = {n for n in recommender.index.spaces if is_behavior_space(n)}
    assert behavior == {recommender._models[promoted[-2]].space.name, recommender._retired_space}
    assert len(behavior) == 2
    assert recommender.refresh() == {}  # nothing changed: nothing done
    recommender.close()


def test_a_reembedded_collection_is_swapped_in_under_load_without_failed_or_empty_responses(
    data_dir: Path,
) -> None:
    """`shopguide reembed` builds a new collection beside the served one and moves the alias; the
    server follows it between requests while shoppers keep asking."""
    from dataclasses import replace

    from index import EdgeStore
    from training.reembed import run_reembed
    from training.vectors import EncoderConfig

    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    app = create_app(LocalBackend(recommender), ApiSettings())
    shoppers = _shoppers(recommender)
    old_collection = recommender.index.name
    failures: list[str] = []
    collections: set[str] = set()

    def load(client: TestClient, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            for response in (
                client.get(f"/users/{shoppers[i % len(shoppers)]}/feed", params={"k": 6}),
                client.get("/products/101/similar", params={"k": 6}),
                client.get("/products/102/similar", params={"k": 6, "mode": "image", "diversity": 0.5}),
                client.get("/healthz"),
            ):
                body = response.json()
                if response.status_code != 200 or ("items" in body and len(body["items"]) != 6):
                    failures.append(f"{response.status_code} {str(body)[:200]}")
                elif "collection" in body:
                    collections.add(body["collection"])
            i += 1

    with _under_load(app, load):
        # A separate store object, as a separate `shopguide reembed` process would have: it never opens
        # the collection the server holds. Same towers, another fusion: a new collection, no embedding.
        live_config = EncoderConfig(**recommender.manifest["encoders"])
        catalog = Path(recommender.manifest["catalog"])
        with EdgeStore(data_dir / "index") as other:
            summary = run_reembed(
                catalog, other, data_dir, replace(live_config, fused_image_weight=0.6), progress=False
            )
        assert summary.swapped
        changes = recommender.refresh()
        assert changes["collection"] == {"from": old_collection, "to": summary.collection}
        for _ in range(20):  # requests keep running on the new collection for a moment
            threading.Event().wait(0.05)
    assert failures == [], failures[:5]
    assert collections == {old_collection, summary.collection}  # requests ran on both sides of the swap
    assert recommender.index.name == summary.collection and recommender.sequence is not None
    assert old_collection in recommender.store.list_collections()  # kept for `reembed --swap-back`
    recommender.close()


@contextlib.contextmanager
def _under_load(app, load: Callable[[TestClient, threading.Event], None], threads: int = 3) -> Iterator[None]:
    """`load(client, stop)` in `threads` threads against the app while the block runs. One app, one
    event loop: the threads share the client (its portal is thread-safe)."""
    stop = threading.Event()
    with TestClient(app) as client:
        workers = [threading.Thread(target=load, args=(client, stop)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        try:
            yield
        finally:
            stop.set()
            for worker in workers:
                worker.join()


def _wait_for_requests(counts: list[int], more: int, timeout_s: float = 60.0) -> None:
    target = counts[0] + more
    waited = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if counts[0] >= target:
            return
        waited.wait(0.05)
    raise AssertionError(f"the load threads made no progress ({counts[0]} rounds)")


def test_the_watcher_follows_promotions(data_dir: Path, tmp_path: Path) -> None:
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    registry = ModelRegistry(data_dir / "models" / "registry")
    recommender.watch(0.05)
    version = _register_and_promote(registry, _variant(data_dir, tmp_path, 4))
    for _ in range(200):
        if recommender.model_versions()["user_encoder_version"] == version:
            break
        threading.Event().wait(0.05)
    assert recommender.model_versions()["user_encoder_version"] == version
    recommender.close()  # stops the watcher


def test_a_broken_promoted_model_keeps_the_old_one_serving(data_dir: Path, tmp_path: Path) -> None:
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    registry = ModelRegistry(data_dir / "models" / "registry")
    version = _register_and_promote(registry, _variant(data_dir, tmp_path, 5))
    (registry.path(version) / "sequence_model.pt").write_bytes(b"not a checkpoint")
    assert recommender.refresh() == {}
    assert "sequence_model.pt" in recommender.refresh_error or version in recommender.refresh_error
    assert recommender.health()["refresh_error"] == recommender.refresh_error
    assert recommender.model_versions()["user_encoder_version"] == "folder:sequence"
    shopper = _shoppers(recommender, 1)[0]
    assert len(recommender.feed(shopper, 5)["items"]) == 5
    recommender.close()


def test_ab_arms_split_shoppers_between_two_versions(data_dir: Path, tmp_path: Path) -> None:
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    registry = ModelRegistry(data_dir / "models" / "registry")
    a = _register_and_promote(registry, _variant(data_dir, tmp_path, 6))
    b = registry.register(_variant(data_dir, tmp_path, 7), "full").version
    with pytest.raises(ValueError, match="not a version"):
        recommender.reconfigure({"ab_versions": [a, "nope"]})
    assert recommender.config.ab_versions == ()  # the bad config did not stick
    recommender.reconfigure({"ab_versions": [a, b], "ab_split": 0.5, "ab_salt": "t1"})
    shoppers = _shoppers(recommender, 40)
    arms = {}
    for user in shoppers:
        body = recommender.feed(user, 5)
        arms[user] = body["arm"]
        expected = recommender._models[a if body["arm"] == "A" else b].space.encoder
        assert body["model_version"] == expected
        assert recommender.feed(user, 5)["arm"] == body["arm"]  # sticky per shopper
    assert set(arms.values()) == {"A", "B"} and 8 <= sum(v == "A" for v in arms.values()) <= 32
    assert all(ab_arm(u, 0.5, "t1") == arm for u, arm in arms.items())
    versions = recommender.model_versions()
    assert (versions["ab_arm_A"], versions["ab_arm_B"]) == (a, b)
    with TestClient(create_app(LocalBackend(recommender), ApiSettings())) as client:  # the HTTP API says too
        assert client.get(f"/users/{shoppers[0]}/feed").json()["arm"] == arms[shoppers[0]]
    recommender.reconfigure({})  # test over: one model again, the arm's space dropped
    assert "arm" not in recommender.feed(shoppers[0], 5)
    assert len([n for n in recommender.index.spaces if is_behavior_space(n)]) == 2  # live + B, retired last
    recommender.close()


def _train_on_browsing_groups(data_dir: Path, tmp_path: Path) -> None:
    """Replace the fixture's GRU by one trained on shoppers who each browse one (colour, article)
    group: a model that has clearly learned which products go together."""
    from encoders.sequence import SequenceModelConfig
    from training.events import write_events
    from training.sequences import TrainConfig, run_train_sequences

    rng = np.random.default_rng(0)
    # Men's and women's versions of a product differ only in the title's gender word: one group.
    groups = [tiny_ids(c, a) for c in COLOURS for a in ARTICLES]
    events = [
        Event(f"g{u}-{j}", f"g{u}", str(rng.choice(groups[u % len(groups)])), "view", ts=1.0 + j)
        for u in range(240)
        for j in range(6)
    ]
    write_events(events, tmp_path / "groups.jsonl")
    run_train_sequences(
        tmp_path / "groups.jsonl",
        tmp_path / "gru",
        model_config=SequenceModelConfig(dim=16, hidden=32),
        train_config=TrainConfig(max_epochs=12, lr=2e-2, batch_size=32, patience=12),
        progress=False,
    )
    shutil.rmtree(data_dir / "models" / "sequence")
    shutil.copytree(tmp_path / "gru", data_dir / "models" / "sequence")


def test_a_product_added_after_training_reaches_the_feed_of_a_shopper_close_to_it(
    data_dir: Path, tmp_path: Path
) -> None:
    _train_on_browsing_groups(data_dir, tmp_path)
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    # The shopper browses Blue Watches; the new product is one more of those, upserted after
    # training (what `shopguide ingest` or a Qdrant-server upsert does), so the GRU has never seen it.
    group = tiny_ids("Blue", "Watches")
    twin = recommender.index.get([group[0]], with_vectors=True)[0]
    rng = np.random.default_rng(0)
    vectors = {}
    for name, vector in twin.vectors.items():
        if not is_behavior_space(name):
            noisy = vector + rng.normal(scale=0.02, size=vector.shape).astype(np.float32)
            vectors[name] = noisy / np.linalg.norm(noisy)
    recommender.index.upsert([Record("9001", vectors, {**twin.payload, "title": "New Blue Watch"})])
    assert recommender.feed("close-shopper", 10)["personalized"] is False  # no events yet: cold start
    changes = recommender.refresh(check_coverage=True)  # the watcher does this every 30 s
    assert changes["mapped_new_products"] == {"folder:sequence": 1}
    history = [
        Event(f"close-{j}", "close-shopper", pid, "view", ts=1.0 + j) for j, pid in enumerate(group[:2])
    ]
    recommender.events.add(history)
    feed = recommender.feed("close-shopper", 10)
    ids = [item["product_id"] for item in feed["items"]]
    # Among the group's other six products, ahead of everything outside the group.
    assert "9001" in ids[:7], ids
    new_item = feed["items"][ids.index("9001")]
    assert MAPPED in new_item["reasons"] and feed["model_version"] == recommender.model_versions()["behavior"]
    # The same shopper without the mapping would never be shown it: it has no behavior vector then.
    assert "9001" not in recommender._models["folder:sequence"].encoder.item_index
    recommender.close()


def test_swap_guard_waits_for_requests_and_lets_nested_ones_through() -> None:
    guard = SwapGuard()
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def request() -> None:
        with guard.shared(), guard.shared():  # nested: a page calling the feed
            inside.set()
            release.wait(5)
            order.append("request done")

    def swap() -> None:
        with guard.exclusive():
            order.append("swapped")

    reader = threading.Thread(target=request)
    reader.start()
    assert inside.wait(5)
    writer = threading.Thread(target=swap)
    writer.start()
    writer.join(0.2)
    assert writer.is_alive() and order == []  # the swap waits for the request in flight
    release.set()
    reader.join(5)
    writer.join(5)
    assert order == ["request done", "swapped"]


def test_query_towers_follow_the_live_manifest(tmp_path: Path) -> None:
    """After a re-embed with another image tower, photo queries are embedded by the new one."""
    import json

    from PIL import Image

    from serving.towers import QueryTower

    tiny = {"model_name": "shopguide-tiny-vit"}
    manifest = tmp_path / "ingest.json"
    manifest.write_text(json.dumps({"encoders": {"image_encoder": "clip", "image_encoder_args": tiny}}))
    tower = QueryTower("image", "clip", tiny, tmp_path, check_every_s=0)
    photo = Image.new("RGB", (64, 64), (200, 30, 30))
    before = tower.encode_images([photo]).shape
    manifest.write_text(json.dumps({"encoders": {"image_encoder": "efficientnet_lite0"}}))
    os.utime(manifest, (time.time() + 5, time.time() + 5))  # a later mtime, whatever the clock's grain
    after = tower.encode_images([photo]).shape
    assert tower.spec == ("efficientnet_lite0", {}) and after == (1, 1280) and before != after

"""The feed's ranking: the GRU's top candidates re-ranked with content similarity to the history."""

from __future__ import annotations

import numpy as np
import pytest

from serving.deployments import AppArgs, build_recommender, resolve_paths
from tests.serving_fixtures import serving_data_copy, tiny_ids
from training.events import Event

K = 6


@pytest.fixture(scope="module")
def recommender(tmp_path_factory: pytest.TempPathFactory):
    data_dir = serving_data_copy(tmp_path_factory, "blend")
    rec = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    viewed = tiny_ids("Red", "Handbags")[:3]
    rec.events.add(
        [Event(f"b{n}", "blend-user", pid, "view", None, None, 1000.0 + n) for n, pid in enumerate(viewed)]
    )
    yield rec
    rec.close()
    rec.store.close()


def feed_with(rec, **config) -> list[dict]:
    rec.reconfigure(config)
    return rec.feed("blend-user", k=K)["items"]


def pool_and_profile(rec) -> tuple[list, np.ndarray]:
    """The GRU's candidate pool for the user (what the blend re-ranks) and the history's content profile."""
    history = [e for e in rec.events.history("blend-user", 50) if e.product_id]
    records = {r.product_id: r for r in rec.index.get([e.product_id for e in history], with_vectors=True)}
    slot = rec._live_slot()
    vector = rec._user_vector("blend-user", history, slot)
    seen = tuple(e.product_id for e in history)
    pool = rec.index.search(
        slot.space.name, vector, 50, exclude_ids=seen, hnsw_ef=rec.config.behavior_hnsw_ef
    )
    return pool, rec._content_profile(history, records)


def test_weight_zero_is_the_gru_alone_and_a_large_weight_ranks_the_pool_by_content(recommender) -> None:
    pool, profile = pool_and_profile(recommender)
    gru_only = [i["product_id"] for i in feed_with(recommender, content_weight=0.0)]
    assert gru_only == [h.product_id for h in pool[:K]]

    fused = {
        r.product_id: r.vectors["fused"]
        for r in recommender.index.get([h.product_id for h in pool], with_vectors=True)
    }
    by_content = sorted(pool, key=lambda h: -float(fused[h.product_id] @ profile))
    content_led = [i["product_id"] for i in feed_with(recommender, content_weight=1000.0)]
    assert content_led == [h.product_id for h in by_content[:K]]

    blended = feed_with(recommender, content_weight=1.0)
    ids = [i["product_id"] for i in blended]
    assert set(ids) <= {h.product_id for h in pool}  # a re-ranking of the GRU's candidates, nothing else
    scores = [i["score"] for i in blended]
    assert scores == sorted(scores, reverse=True)

    def closeness(items: list[str]) -> float:
        return float(np.mean([fused[p] @ profile for p in items]))

    assert closeness(gru_only) <= closeness(ids) <= closeness(content_led)


def test_the_blend_keeps_filters_exclusions_and_diversity(recommender) -> None:
    recommender.reconfigure({"content_weight": 1.0})
    viewed = set(tiny_ids("Red", "Handbags")[:3])
    body = recommender.feed("blend-user", k=K, diversity=0.5)
    assert len(body["items"]) == K and not viewed & {i["product_id"] for i in body["items"]}
    with pytest.raises(ValueError, match="diversity"):
        recommender.feed("blend-user", k=K, diversity=2.0)

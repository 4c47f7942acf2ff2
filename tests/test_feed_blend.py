"""The feed's ranking: the GRU's top candidates re-ranked with content similarity and attribute affinity
to the history."""

from __future__ import annotations

import numpy as np
import pytest

from serving.affinity import AttributePrior, HistoryAffinity
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.recommend import TASTE_REASON, RecommenderConfig
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
    size = max(rec.config.feed_pool_per_item * K, 50)
    pool = rec.index.search(
        slot.space.name, vector, size, exclude_ids=seen, hnsw_ef=rec.config.behavior_hnsw_ef
    )
    return pool, rec._content_profile(history, records)


def pool_affinity(rec, pool) -> dict[str, float]:
    """Each pooled product's attribute affinity to the user's history, as the feed computes it."""
    history = [e for e in rec.events.history("blend-user", 50) if e.product_id]
    records = {r.product_id: r for r in rec.index.get([e.product_id for e in history])}
    scores = rec._history_affinity(history, records).scores([h.payload for h in pool])
    return {h.product_id: float(s) for h, s in zip(pool, scores, strict=True)}


def test_weight_zero_is_the_gru_alone_and_a_large_weight_ranks_the_pool_by_content(recommender) -> None:
    pool, profile = pool_and_profile(recommender)
    gru_only = [i["product_id"] for i in feed_with(recommender, content_weight=0.0, affinity_weight=0.0)]
    assert gru_only == [h.product_id for h in pool[:K]]

    fused = {
        r.product_id: r.vectors["fused"]
        for r in recommender.index.get([h.product_id for h in pool], with_vectors=True)
    }
    by_content = sorted(pool, key=lambda h: -float(fused[h.product_id] @ profile))
    content_led = [i["product_id"] for i in feed_with(recommender, content_weight=1000.0, affinity_weight=0)]
    assert content_led == [h.product_id for h in by_content[:K]]

    blended = feed_with(recommender, content_weight=1.0, affinity_weight=0.0)
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


def test_affinity_ranks_the_pool_by_the_history_s_attributes(recommender) -> None:
    pool, _ = pool_and_profile(recommender)
    affinity = pool_affinity(recommender, pool)
    # The history is three Red Handbags: a pooled Red Handbag outscores every product sharing neither.
    red_bags = set(tiny_ids("Red", "Handbags"))
    neither = [p for p in affinity if p not in set(tiny_ids("Red")) | set(tiny_ids(article="Handbags"))]
    assert red_bags & set(affinity) and neither
    assert min(affinity[p] for p in red_bags & set(affinity)) > max(affinity[p] for p in neither)

    gru_only = [i["product_id"] for i in feed_with(recommender, content_weight=0.0, affinity_weight=0.0)]
    led = [i["product_id"] for i in feed_with(recommender, content_weight=0.0, affinity_weight=1000.0)]
    assert set(led) <= set(affinity)
    led_scores = [affinity[p] for p in led]
    assert led_scores == sorted(led_scores, reverse=True)
    assert min(led_scores) >= sorted(affinity.values(), reverse=True)[K - 1] - 1e-9  # the pool's top K
    blended = [i["product_id"] for i in feed_with(recommender, content_weight=1.0, affinity_weight=2.0)]
    mean = lambda items: float(np.mean([affinity[p] for p in items]))  # noqa: E731
    assert mean(gru_only) <= mean(blended) <= mean(led)

    # Reasons: an item sharing the history's type and colour says so; one sharing neither does not.
    body = recommender.feed("blend-user", k=50)["items"]
    tastes = {i["product_id"]: [r for r in i["reasons"] if r.startswith(TASTE_REASON)] for i in body}
    red_bags_shown = [p for p in tastes if p in red_bags]
    assert red_bags_shown and all(
        tastes[p] and {"Red", "Handbags"} <= set(tastes[p][0][len(TASTE_REASON) :].split(", "))
        for p in red_bags_shown
    )
    assert all(not tastes[p] for p in tastes if p in neither)
    recommender.reconfigure({"affinity_weight": 0.0})
    assert not any(
        r.startswith(TASTE_REASON) for i in recommender.feed("blend-user", k=K)["items"] for r in i["reasons"]
    )
    recommender.reconfigure({})


def test_affinity_scores_are_smoothed_log_lifts_over_the_catalog() -> None:
    catalog = [{"articleType": "Handbags", "baseColour": c} for c in ("Red", "Blue", "Blue", "Blue")]
    catalog += [{"articleType": "Tshirts", "baseColour": "Blue"}] * 4
    prior = AttributePrior(catalog + [{"title": "x", "price": 3.0, "in_stock": True}])
    assert prior.total == 9 and prior.counts["baseColour"] == {"Red": 1, "Blue": 7}
    assert "title" not in prior.counts and "in_stock" not in prior.counts
    history = [({"articleType": "Handbags", "baseColour": "Red"}, 3.0)]
    candidates = [
        {"articleType": "Handbags", "baseColour": "Red"},
        {"articleType": "Tshirts", "baseColour": "Blue"},
        {"articleType": "Handbags"},  # no colour: that field adds nothing
        {"articleType": "Shoes", "baseColour": "Red"},  # a type the catalog read never saw: finite
    ]
    scores = HistoryAffinity(history, prior, ("articleType", "baseColour"), strength=1.0).scores(candidates)

    def lift(count: float, share: float) -> float:  # (history weight + strength * share) / (3 + 1) / share
        return float(np.log((count + share) / 4.0 / share))

    bags, shirts, red, blue, unseen = 4 / 10, 4 / 10, 1 / 10, 7 / 10, 1 / 10
    expected = [
        lift(3, bags) + lift(3, red),
        lift(0, shirts) + lift(0, blue),
        lift(3, bags),
        lift(0, unseen) + lift(3, red),
    ]
    assert np.allclose(scores, expected)
    assert scores[0] > scores[2] > 0 > scores[1]
    affinity = HistoryAffinity(history, prior, ("articleType", "baseColour"), strength=1.0)
    assert affinity.shared_tastes(candidates[0]) == ["Red", "Handbags"]  # Red is the rarer: the larger lift
    assert affinity.shared_tastes(candidates[1]) == []  # values the history never holds
    assert affinity.shared_tastes(candidates[0], limit=1) == ["Red"]
    assert HistoryAffinity([], prior, ("baseColour",), 1.0).scores(candidates).tolist() == [0.0] * 4
    # A longer history of the same taste moves the scores further from the catalog's mix.
    longer = HistoryAffinity(history * 5, prior, ("articleType", "baseColour"), 1.0).scores(candidates)
    assert longer[0] > scores[0] and longer[1] < scores[1]


@pytest.mark.parametrize(
    "setting",
    [
        {"affinity_weight": -1},
        {"content_weight": float("nan")},
        {"affinity_prior_strength": 0},
        {"feed_pool_per_item": 0},
    ],
)
def test_bad_blend_settings_are_refused(setting: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(setting))):
        RecommenderConfig.from_dict(setting)


def test_affinity_fields_the_catalog_lacks_are_refused(recommender) -> None:
    before = recommender.config
    with pytest.raises(ValueError, match=r"\['colour'\] are not attributes of this catalog.*baseColour"):
        recommender.reconfigure({"affinity_fields": ["articleType", "colour"]})
    assert recommender.config is before  # the previous settings stay
    recommender.reconfigure({"affinity_fields": ["articleType"]})
    assert recommender.config.affinity_fields == ("articleType",)
    recommender.reconfigure({})
    with pytest.raises(ValueError, match="affinity_fields takes payload field names"):
        RecommenderConfig.from_dict({"affinity_fields": ["articleType", 3]})


def test_affinity_fields_from_yaml_become_a_tuple() -> None:
    assert RecommenderConfig.from_dict({"affinity_fields": ["articleType"]}).affinity_fields == (
        "articleType",
    )

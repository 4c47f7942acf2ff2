"""Closed-loop simulator: the shopper reaction model, warm-up, day plans, metrics, and the loop itself
over the real HTTP API (in process, and through a `shopguide serve --no-ray` subprocess)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from encoders.sequence import SequenceModelConfig
from serving.api import ApiSettings, LocalBackend, create_app
from serving.deployments import AppArgs, build_recommender, resolve_paths
from serving.event_store import FeedItem, SQLiteEventStore
from tests.conftest import make_catalog
from tests.serving_fixtures import serving_data_copy
from training.catalog import load_catalog
from training.events import Event
from training.loop import (
    LoopConfig,
    LoopError,
    Reaction,
    ReactionConfig,
    ShopClient,
    SlateStats,
    click_probabilities,
    day_row,
    format_table,
    offpolicy_check,
    plan_day,
    position_bias,
    prepare_base,
    react,
    run_loop,
    run_strategy,
    slate_utility,
    targets,
    type_interest,
    warm_up,
    write_outputs,
)
from training.registry import ModelRegistry
from training.report import check_loop_rows
from training.sequences import TrainConfig
from training.simulator import START_TS, CatalogView, SimulatorConfig, simulate_sessions

TINY_MODEL = SequenceModelConfig(dim=8, hidden=16)
TINY_TRAIN = TrainConfig(max_epochs=2)


def tiny_config(**overrides) -> LoopConfig:
    """A loop of seconds: few shoppers, two days; the gate accepts any candidate (tolerance 1: the gate
    is tested in test_registry, here it would only make the swap depend on tiny-model noise)."""
    values = dict(
        days=2, shoppers=10, warmup_days=2, seed=0, tolerance=1.0, model=TINY_MODEL, train=TINY_TRAIN
    )
    return LoopConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> list:
    return load_catalog(make_catalog(tmp_path_factory.mktemp("loop-catalog"))).products


@pytest.fixture(scope="module")
def view(products) -> CatalogView:
    return CatalogView(products)


# ---- the reaction model -----------------------------------------------------------------------------
def test_position_bias_and_click_probabilities():
    assert position_bias(np.array([0, 1, 2, 9])) == pytest.approx(
        [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11)]
    )
    # sigmoid(utility - 1) times the position's bias; an ineligible product (-inf) is never clicked
    p = click_probabilities(np.array([1.0, 1.0, 3.0, -np.inf]))
    sigmoid3 = 1 / (1 + math.exp(-2.0))
    assert p == pytest.approx([0.5, 0.5 / math.log2(3), sigmoid3 * 0.5, 0.0])


def test_react_follows_the_click_model_and_never_buys_out_of_stock():
    row_of = {"a": 0, "b": 1, "gone": 2}
    utility = np.array([2.0, 2.0, 2.0])
    in_stock = np.array([True, True, False])
    rng = np.random.default_rng(0)
    reaction = ReactionConfig(similar_probability=0.3)
    trials = 20_000
    clicks, carts, purchases, similar = Counter(), Counter(), Counter(), 0
    for _ in range(trials):
        # "unknown" is not in the simulator's catalog: never clicked, whatever its position
        for r in react(["a", "unknown", "b", "gone"], utility, row_of, in_stock, rng, reaction):
            clicks[r.product_id] += 1
            carts[r.product_id] += "cart" in r.types
            purchases[r.product_id] += "purchase" in r.types
            assert r.types[0] == "click" and ("purchase" not in r.types or "cart" in r.types)
            similar += r.open_similar
    interest = 1 / (1 + math.exp(-1.0))  # sigmoid(2 - 1)
    assert clicks["unknown"] == 0
    assert clicks["a"] / trials == pytest.approx(interest * 1.0, abs=0.01)  # position 0
    assert clicks["b"] / trials == pytest.approx(interest * 0.5, abs=0.01)  # position 2: 1/log2(4)
    assert clicks["gone"] / trials == pytest.approx(interest / math.log2(5), abs=0.01)
    total = sum(clicks.values())
    assert sum(carts.values()) / total == pytest.approx(0.35, abs=0.015)
    assert purchases["gone"] == 0 and carts["gone"] > 0  # out of stock: carted, never bought
    assert purchases["a"] / carts["a"] == pytest.approx(0.5, abs=0.03)
    assert similar / total == pytest.approx(0.3, abs=0.015)


def test_type_interest_is_the_simulators_intent_model(view):
    """log(P(intent = the product's type) * n eligible types), clipped at -3: favourites share 0.8,
    every eligible type 0.2 / n; ineligible products stay unclickable through the utility."""
    _, states = warm_up(view, shoppers=6, days=1, seed=3)
    for state in states:
        shopper = state.shopper
        eligible = view.eligible(shopper.gender)
        n = len(np.unique(view.article[eligible]))
        interest = type_interest(view, shopper)
        favourite = np.isin(view.article_names[view.article], shopper.article_types)
        f = len(shopper.article_types)
        assert f > 0 and favourite.any()
        assert interest[favourite & eligible] == pytest.approx(math.log(0.8 / f * n + 0.2))
        assert interest[~favourite & eligible] == pytest.approx(max(-3.0, math.log(0.2)))
        # the intent probabilities the term comes from sum to one over the eligible types
        types = np.unique(view.article[eligible])
        p = [math.exp(interest[view.by_article[t][0]]) / n for t in types]
        assert sum(p) == pytest.approx(1.0)
        state.interest = interest
        both = slate_utility(state, ReactionConfig(type_interest=1.0))
        assert np.array_equal(np.isfinite(both), np.isfinite(state.utility))
        assert both[favourite & eligible] == pytest.approx((state.utility + interest)[favourite & eligible])
        assert slate_utility(state, ReactionConfig(type_interest=0.0)) is state.utility


def test_offpolicy_check_compares_estimates_with_the_click_models_truth(tmp_path: Path):
    """Two logged feeds of 2 slots: the true CTRs are the click model's probabilities of the greedy
    and of the shown items at their positions; the estimates are training.offpolicy's on those rows."""
    ids = ["a", "b", "c", "d"]
    contexts = {"r1": np.array([2.0, 0.0, -np.inf, 1.0], np.float32), "r2": np.array([0.0, 3.0, 1.0, 1.0])}
    items = [  # (request, position, shown, propensity, greedy)
        ("r1", 0, "a", 0.75, "a"), ("r1", 1, "b", 0.25, "d"),
        ("r2", 0, "c", 0.25, "b"), ("r2", 1, "d", 0.75, "d"),
    ]  # fmt: skip
    with SQLiteEventStore(tmp_path / "events.db") as store:
        store.add_feed_items(
            [
                FeedItem(r, "u1", pos, shown, prop, greedy, 2, "epsilon:0.5", "v1", None, 1.0)
                for r, pos, shown, prop, greedy in items
            ]  # fmt: skip
        )
        store.add(
            [
                Event("e1", "u1", "a", "click", None, "r1", 2.0),
                Event("e2", "u1", "d", "click", None, "r2", 3.0),
            ]
        )
        # a feed of another run (not in contexts) is left out
        store.add_feed_items([FeedItem("other", "u2", 0, "a", 1.0, "a", 1, "greedy", "v0", None, 1.0)])
    check = offpolicy_check(tmp_path / "events.db", contexts, ids)
    assert check["slots"] == 4 and check["policy"] == "epsilon:0.5"

    def p(u: float, position: int) -> float:
        return 1 / (1 + math.exp(-(u - 1))) / math.log2(position + 2)

    greedy_truth = (p(2, 0) + p(1, 1) + p(3, 0) + p(1, 1)) / 4  # a, d | b, d
    logging_truth = (p(2, 0) + p(0, 1) + p(1, 0) + p(1, 1)) / 4  # a, b | c, d
    assert check["greedy"]["true_ctr"] == pytest.approx(greedy_truth)
    assert check["logging"]["true_ctr"] == pytest.approx(logging_truth)
    # the clicks were on a (greedy, propensity 0.75) and d (greedy, 0.75): IPS = (1/0.75 + 1/0.75) / 4
    assert check["greedy"]["ips"] == pytest.approx(2 / 0.75 / 4)
    assert check["logging"]["ips"] == pytest.approx(0.5) and check["logging"]["logged_ctr"] == 0.5
    for target in ("greedy", "logging"):
        e = check[target]
        assert e["in_ips_interval"] == (e["ips_low"] <= e["true_ctr"] <= e["ips_high"])
    with pytest.raises(LoopError, match="no logged feed slot"):
        offpolicy_check(tmp_path / "events.db", {"unknown": contexts["r1"]}, ids)


def test_react_draws_the_same_numbers_whatever_the_shopper_does():
    """The generator's state after a slate depends only on its length, so two strategies' shoppers
    stay in step even when they click different things."""
    row_of = {"a": 0, "b": 1}
    rng_hot, rng_cold = np.random.default_rng(5), np.random.default_rng(5)
    react(["a", "b"], np.array([9.0, 9.0]), row_of, np.array([True, True]), rng_hot, ReactionConfig())
    react(
        ["a", "b"], np.array([-np.inf, -np.inf]), row_of, np.array([True, True]), rng_cold, ReactionConfig()
    )
    assert rng_hot.random() == rng_cold.random()


# ---- shoppers: warm-up and day plans ----------------------------------------------------------------
def test_warm_up_is_the_simulator(products, view):
    events, states = warm_up(view, shoppers=12, days=3, seed=7)
    expected, profiles = simulate_sessions(products, SimulatorConfig(12, 3, 7), progress=False)
    assert events == expected and len(events) > 50
    assert [s.shopper.user_id for s in states] == [p.user_id for p in profiles]
    assert [s.shopper.gender for s in states] == [p.gender for p in profiles]


def test_plan_day_is_the_same_for_every_strategy(view):
    _, states = warm_up(view, shoppers=15, days=2, seed=3)
    first, second = copy.deepcopy(states), copy.deepcopy(states)
    plan_a, plan_b = plan_day(view, first, 2, 3), plan_day(view, second, 2, 3)
    assert plan_a and plan_a == plan_b
    assert [s.shopper.article_types for s in first] == [s.shopper.article_types for s in second]
    starts = [s.start for s in plan_a]
    assert starts == sorted(starts)
    assert all(START_TS + 2 * 86_400 <= t < START_TS + 3 * 86_400 for t in starts)
    assert plan_day(view, copy.deepcopy(states), 3, 3) != plan_a  # another day, other sessions


# ---- metrics ----------------------------------------------------------------------------------------
def test_day_row_metrics_and_report_format():
    main, similar = SlateStats(), SlateStats()
    main.shown(["a", "b"], "m1")
    main.shown(["a", "c"], "m1")
    main.reacted([Reaction("a", ("click", "cart", "purchase"), False), Reaction("c", ("click",), True)])
    similar.shown(["d", "e"], "fused")
    row = day_row("hybrid", 3, main, similar, catalog_size=10)
    assert (row["impressions"], row["clicks"], row["carts"], row["purchases"]) == (4, 2, 1, 1)
    assert row["ctr"] == 0.5 and row["cvr"] == 0.25 and row["purchases_per_click"] == 0.5
    assert row["coverage"] == 0.3  # a, b, c of 10 products
    # Gini over the 10 products' exposures [0 x 7, 1, 1, 2]
    counts = np.sort(np.array([0] * 7 + [1, 1, 2], dtype=float))
    gini = (2 * (np.arange(1, 11) * counts).sum()) / (10 * counts.sum()) - 11 / 10
    assert row["gini"] == pytest.approx(gini, abs=1e-5)
    assert row["ctr_low"] < 0.5 < row["ctr_high"]
    assert (row["similar_impressions"], row["similar_clicks"]) == (2, 0)
    assert check_loop_rows([row]) == [row]  # the report reads the row, extra fields and all


def test_targets_compare_the_last_day():
    rows = [
        {"strategy": s, "day": d, "ctr": ctr}
        for s, by_day in {"popularity": (0.05, 0.05), "none": (0.1, 0.11), "hybrid": (0.1, 0.12)}.items()
        for d, ctr in enumerate(by_day)
    ]
    t = targets(rows)
    assert t["day"] == 1 and t["hybrid_vs_popularity"] == 2.4
    assert t["hybrid_at_least_2x_popularity"] and t["hybrid_above_none"]
    rows[-1]["ctr"] = 0.09
    assert not targets(rows)["hybrid_at_least_2x_popularity"] and not targets(rows)["hybrid_above_none"]


# ---- the loop over HTTP -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny catalog's ingested index, without the serving fixture's events and GRU (the loop brings
    its own warm-up events and day-0 model)."""
    data = serving_data_copy(tmp_path_factory, "loop")
    (data / "events.db").unlink()
    shutil.rmtree(data / "models" / "sequence")
    return data


def test_strategies_in_process(loop_data: Path, tmp_path: Path):
    """popularity and none through the real app in this process: slates, reactions and request ids;
    the feed explores (epsilon 0.5), so its run ends with the off-policy check on its own feed log."""
    config = tiny_config(explore_policy="epsilon:0.5")
    base = prepare_base(loop_data, tmp_path / "work", config, log=lambda _: None)
    assert (base.folder / "models" / "registry" / "LIVE").is_file() and base.warmup
    assert not (base.folder / "events.db").exists()  # the source's events never enter the loop
    for strategy in ("popularity", "none"):
        folder = tmp_path / strategy
        shutil.copytree(base.folder, folder)
        recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(folder))))
        recommender.reconfigure({"explore_policy": config.explore_policy})  # as `serve --explore-policy`
        try:
            with TestClient(create_app(LocalBackend(recommender), ApiSettings())) as http:
                client = ShopClient("http://testserver", http=http)
                registry = ModelRegistry(folder / "models" / "registry")
                rows, training, check = run_strategy(
                    client,
                    registry,
                    strategy,
                    base,
                    config,
                    log=lambda _: None,
                    events_db=folder / "events.db",
                )
                if strategy == "popularity":  # not the feed: nothing explored, nothing to check
                    assert check is None
                else:
                    assert check["policy"] == "epsilon:0.5"
                    assert check["slots"] == sum(r["impressions"] for r in rows)
                    for target in ("greedy", "logging"):
                        assert 0 < check[target]["true_ctr"] < 1 and check[target]["ips_se"] > 0
                with pytest.raises(LoopError, match="LIVE without a restart"):
                    client.wait_for_model("no-such-version", "no-such-space", timeout_s=0.3)
            stored = list(recommender.events.iter_events())
        finally:
            recommender.close()
        assert [r["day"] for r in rows] == [0, 1] and training["train_seconds"] == 0.0
        assert all(r["model"] == base.day0 for r in rows)  # nothing retrains
        for row in rows:
            assert row["impressions"] == row["slates"] * config.reaction.k > 0
            assert 0 < row["coverage"] <= 1 and 0 <= row["ctr"] <= 1
        # Every slate click is stored with the request id of the response that showed it.
        by_request = [e for e in stored if e.request_id is not None]
        assert sum(e.type == "click" for e in by_request) == sum(
            r["clicks"] + r["similar_clicks"] for r in rows
        )
        assert sum(e.type == "purchase" for e in by_request) >= sum(r["purchases"] for r in rows)
        assert len(stored) == len(base.warmup) + sum(r["events"] for r in rows)
        served = Counter(v for r in rows for v in r["served_by"])
        if strategy == "popularity":  # the popular grid: the same top-k for everyone, never personal
            assert "popularity" not in served and not any(v.startswith("gru") for v in served)
        else:  # the feed, from the day-0 GRU
            assert any(v.startswith("gru") for v in served)


def test_loop_with_a_server_subprocess_learns_and_writes_the_report(loop_data: Path, tmp_path: Path):
    """The command's default path: a copy per strategy, `shopguide serve --no-ray` on it, an update
    after day 0 promoted and hot-swapped into the running server, then the JSON and the plot."""
    config = tiny_config(strategies=("incremental",))
    work = tmp_path / "work"
    result = run_loop(config, loop_data, work_dir=work, log=lambda _: None)
    rows = result["rows"]
    assert [(r["strategy"], r["day"]) for r in rows] == [("incremental", 0), ("incremental", 1)]
    update = result["training"]["incremental"]["per_day"][0]
    assert update["ran"] == "incremental" and update["promoted"]
    assert rows[0]["model"] == result["day0_model"]
    assert rows[1]["model"] == update["version"]  # the server swapped to it before day 1
    assert rows[0]["train_seconds"] > 0 and result["training"]["incremental"]["train_seconds"] > 0
    assert (work / "incremental" / "server.log").is_file() and (work / "incremental" / "train.log").is_file()
    json_path, plot = write_outputs(result, tmp_path / "results" / "simulate_loop.json")
    saved = json.loads(json_path.read_text())
    assert check_loop_rows(saved["rows"]) and saved["shoppers"] == config.shoppers
    assert plot.is_file() and plot.stat().st_size > 1000
    assert "incremental" in format_table(result)
    # A second run reuses the base (same collection, shoppers and model config): same day-0 model.
    assert prepare_base(loop_data, work, config, log=lambda _: None).day0 == result["day0_model"]

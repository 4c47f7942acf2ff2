"""The A/B report (training/ab.py, `shopguide ab report`): per-arm rates with intervals, differences,
guardrails, from feed-log rows and from a real event store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.cli import main
from serving.event_store import FeedItem, SQLiteEventStore
from tests.conftest import make_catalog
from training.ab import NO_ARM, ab_report, format_ab_report, popular_count, rate_difference
from training.events import Event
from training.online_metrics import exposure_gini, rate_interval

CATEGORIES = {"p1": "Shirts", "p2": "Shirts", "p3": "Shoes", "p4": "Watches", "p5": "Shoes"}


def row(
    arm: str | None, product: str, clicked: bool = False, purchased: bool = False, user: str = "u"
) -> dict:
    return {
        "request_id": f"{user}-{arm}",
        "user_id": user,
        "product_id": product,
        "arm": arm,
        "clicked": clicked,
        "purchased": purchased,
    }


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a): 56/70 vs 48/80,
    # method 10 (hybrid score) gives 0.2000 with 95% interval 0.0524 to 0.3339.
    diff, low, high = rate_difference(48, 80, 56, 70)
    assert diff == pytest.approx(0.2)
    assert low == pytest.approx(0.0524, abs=5e-5) and high == pytest.approx(0.3339, abs=5e-5)


def test_arms_get_counts_rates_differences_and_guardrails() -> None:
    arm_a = [row("A", "p1", clicked=True, purchased=True), row("A", "p1"), row("A", "p2", clicked=True)]
    arm_b = [row("B", "p3", clicked=True, user="v"), row("B", "p4", user="v"), row("B", "p5", user="w")]
    rows = [*arm_a, row("A", "p1"), *arm_b]
    report = ab_report(rows, CATEGORIES, popular={"p1"})
    a, b = report["arms"]["A"], report["arms"]["B"]
    assert (a["impressions"], a["clicks"], a["purchases"], a["users"]) == (4, 2, 1, 1)
    assert (b["impressions"], b["clicks"], b["purchases"], b["users"], b["requests"]) == (3, 1, 0, 2, 2)
    assert a["ctr"] == dict(zip(("rate", "low", "high"), rate_interval(2, 4), strict=True))
    assert b["cvr"]["rate"] == 0.0 and b["cvr"]["high"] > 0  # Wilson: a zero count still has an upper bound
    assert report["control"] == "A"
    diff = report["differences"]["B"]["ctr"]
    assert (diff["diff"], diff["low"], diff["high"]) == pytest.approx(rate_difference(2, 4, 1, 3))
    # A showed p1 three times and p2 once: exposure piled on one popular product, one category.
    assert a["guardrails"]["exposure_gini"] == pytest.approx(exposure_gini({"p1": 3, "p2": 1}, 5))
    assert a["guardrails"]["popular_share"] == 0.75 and b["guardrails"]["popular_share"] == 0.0
    assert a["guardrails"]["category_coverage"] == pytest.approx(1 / 3)
    assert b["guardrails"]["category_coverage"] == pytest.approx(2 / 3)
    assert b["guardrails"]["exposure_gini"] < a["guardrails"]["exposure_gini"]
    overall = report["overall"]
    assert (overall["impressions"], overall["clicks"], overall["guardrails"]["catalog_coverage"]) == (
        7,
        3,
        1.0,
    )
    text = format_ab_report(report)
    assert "B - A: CTR" in text and "overall" in text
    with pytest.raises(ValueError, match=r"control arm 'C'.*\['A', 'B'\]"):
        ab_report(rows, CATEGORIES, {"p1"}, control="C")


def test_without_an_ab_test_everything_is_one_arm() -> None:
    report = ab_report([row(None, "p1", clicked=True), row(None, "p9")], CATEGORIES, popular=set())
    assert list(report["arms"]) == [NO_ARM] and report["differences"] == {}
    # p9 was served but is no longer in the catalog: it still took exposure.
    assert report["arms"][NO_ARM]["guardrails"]["catalog_coverage"] == pytest.approx(2 / 6)
    empty = ab_report([], CATEGORIES, popular=set())
    assert empty["overall"]["impressions"] == 0 and empty["control"] is None
    assert "no feed impressions logged yet" in format_ab_report(empty)
    assert popular_count(11_433) == 115 and popular_count(50) == 1


def test_ab_report_and_offpolicy_commands_read_the_event_store(tmp_path: Path) -> None:
    catalog = make_catalog(tmp_path / "catalog", per_combo=1)  # 18 products (ids 101-118), 3 articleTypes
    ids = ["101", "102", "103", "104"]
    data_dir = tmp_path / "data"
    with SQLiteEventStore(data_dir / "events.db") as store:
        store.add_feed_items(
            [
                FeedItem(f"r-{arm}", f"user-{arm}", pos, pid, 0.5, ids[0], 2, "epsilon:0.5", "m", arm, 1.0)
                for arm in ("A", "B")
                for pos, pid in enumerate(ids[:2] if arm == "A" else ids[2:])
            ]
        )
        store.add(
            [
                Event("e1", "user-A", ids[0], "click", request_id="r-A"),
                Event("e2", "user-B", ids[2], "click", request_id="r-B"),
                Event("e3", "user-B", ids[3], "click", request_id="r-B"),
                Event("e4", "user-B", ids[3], "purchase", request_id="r-B"),
                Event("e5", "someone", ids[0], "purchase"),  # popularity: ids[0] is the top product
            ]
        )
    out = tmp_path / "ab.json"
    argv = ["ab", "report", "--data-dir", str(data_dir), "--catalog", str(catalog), "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["catalog_size"] == 18 and report["popular_products"] == 1
    assert {arm: (s["impressions"], s["clicks"], s["purchases"]) for arm, s in report["arms"].items()} == {
        "A": (2, 1, 0),
        "B": (2, 2, 1),
    }
    assert report["differences"]["B"]["ctr"]["diff"] == pytest.approx(0.5)
    assert report["arms"]["A"]["guardrails"]["popular_share"] == 0.5
    assert main([*argv[:-2], "--control", "B"]) == 0

    estimates = tmp_path / "ope.json"
    argv = ["eval", "offpolicy", "--data-dir", str(data_dir), "--policy", "logging", "--arm", "B"]
    assert main([*argv, "--json", str(estimates)]) == 0
    [on_policy] = json.loads(estimates.read_text())["estimates"]
    assert on_policy["n"] == 2 and on_policy["ips"] == 1.0

    assert main(["eval", "offpolicy", "--data-dir", str(data_dir), "--policy", "thompson"]) == 2
    assert main(["ab", "report", "--data-dir", str(tmp_path / "nowhere"), "--catalog", str(catalog)]) == 2

"""Events -> histories: one step per run of the same product, the strongest type kept, time order."""

from __future__ import annotations

from training.events import Event
from training.session_data import histories_from_events


def test_runs_of_one_product_collapse_to_the_strongest_event() -> None:
    events = [
        Event("1", "u1", "p1", "view", ts=1.0),
        Event("2", "u1", None, "search", query="red bag", ts=2.0),
        Event("3", "u1", "p1", "click", ts=3.0),
        Event("4", "u1", "p1", "cart", ts=4.0),
        Event("5", "u1", "p2", "view", ts=5.0),
        Event("6", "u1", "p1", "view", ts=6.0),  # back to p1 later: a new step
        Event("7", "u2", "p3", "purchase", ts=0.5),
        Event("9", "u1", "p2", "click", ts=5.5),
    ]
    histories = histories_from_events(events)
    assert histories == {"u1": [("p1", "cart"), ("p2", "click"), ("p1", "view")], "u2": [("p3", "purchase")]}


def test_out_of_order_arrival_is_sorted_by_time() -> None:
    events = [Event("2", "u", "b", "view", ts=20.0), Event("1", "u", "a", "view", ts=10.0)]
    assert histories_from_events(events)["u"] == [("a", "view"), ("b", "view")]

"""Shopper events -> per-shopper (product, event type) histories for the sequence model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from training.events import Event

# Strength of an interaction: when a shopper acts on the same product several times in a row
# (view -> click -> cart), the step keeps the strongest type. Next-product prediction is then about
# the next *product*, not the trivially predictable click that follows a view of the same product.
STRENGTH = {"view": 1, "click": 2, "cart": 3, "purchase": 4}


def histories_from_events(events: Iterable[Event]) -> dict[str, list[tuple[str, str]]]:
    """user id -> time-ordered [(product id, strongest event type)], one step per run of the same product.

    Search events carry no product and are left out (the query is not part of the GRU's input)."""
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        if event.product_id is not None and event.type in STRENGTH:
            by_user[event.user_id].append(event)
    histories: dict[str, list[tuple[str, str]]] = {}
    for user, user_events in by_user.items():
        # Stable sort: events without ts keep their arrival order after those with one.
        user_events.sort(key=lambda e: (e.ts is None, e.ts if e.ts is not None else 0.0))
        steps: list[tuple[str, str]] = []
        for event in user_events:
            if steps and steps[-1][0] == event.product_id:
                if STRENGTH[event.type] > STRENGTH[steps[-1][1]]:
                    steps[-1] = (event.product_id, event.type)
            else:
                steps.append((event.product_id, event.type))
        histories[user] = steps
    return histories

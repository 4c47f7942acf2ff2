"""Attribute affinity: how much more often a shopper's history holds an item's attribute values than the
catalog does (a smoothed log-lift per attribute, summed), one of the feed's re-ranking signals."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

# The catalog's categorical attributes a shopper's taste shows in ("year" is left out: a product's
# season of release says little about what a shopper likes).
AFFINITY_FIELDS = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
# Payload keys that are not attributes: identity, free text and numbers (price has its own filters).
NOT_ATTRIBUTES = frozenset({"product_id", "title", "price", "in_stock"})


class AttributePrior:
    """How often each value of each categorical payload field occurs in the catalog."""

    def __init__(self, payloads: Iterable[dict]) -> None:
        self.counts: dict[str, Counter] = {}
        self.total = 0
        for payload in payloads:
            self.total += 1
            for key, value in payload.items():
                if key in NOT_ATTRIBUTES or isinstance(value, bool) or not isinstance(value, str | int):
                    continue
                self.counts.setdefault(key, Counter())[value] += 1

    def share(self, field: str, value: object) -> float:
        """The value's share of the catalog; a value the catalog read never saw (a product added since)
        counts as one product, so its lift stays finite."""
        count = self.counts.get(field, {}).get(value, 0)
        return max(count, 1) / (self.total + 1)


def affinity_scores(
    history: Sequence[tuple[dict, float]],
    candidates: Sequence[dict],
    prior: AttributePrior,
    fields: Sequence[str],
    strength: float,
) -> np.ndarray:
    """(n,) sum over `fields` of log(P(value | history) / P(value | catalog)) for each candidate payload.

    history: (payload, weight) of the shopper's events (recency and intent weights). P(value | history)
    is the weighted share of the history holding the value, smoothed towards the catalog share with
    `strength` pseudo-weight, so a short history moves scores a little and a long one a lot. A field
    missing from a candidate (or from every history payload) adds 0."""
    scores = np.zeros(len(candidates))
    if not history or not candidates:
        return scores
    for name in fields:
        weights: Counter = Counter()
        for payload, weight in history:
            if payload.get(name) is not None:
                weights[payload[name]] += weight
        if not weights:
            continue
        total = sum(weights.values())
        lifts: dict = {}  # value -> log-lift: a pool holds few distinct values per field
        for i, payload in enumerate(candidates):
            value = payload.get(name)
            if value is None:
                continue
            lift = lifts.get(value)
            if lift is None:
                share = prior.share(name, value)
                lift = lifts[value] = math.log(
                    (weights.get(value, 0.0) + strength * share) / (total + strength) / share
                )
            scores[i] += lift
    return scores

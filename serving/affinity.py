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


class HistoryAffinity:
    """A shopper's attribute affinity: log(P(value | history) / P(value | catalog)) per field and value.

    history: (payload, weight) of the shopper's events (recency and intent weights). P(value | history)
    is the weighted share of the history holding the value, smoothed towards the catalog share with
    `strength` pseudo-weight, so a short history moves scores a little and a long one a lot."""

    def __init__(
        self,
        history: Sequence[tuple[dict, float]],
        prior: AttributePrior,
        fields: Sequence[str],
        strength: float,
    ) -> None:
        self.prior, self.strength = prior, strength
        self._weights: dict[str, Counter] = {}
        for name in fields:
            weights: Counter = Counter()
            for payload, weight in history:
                if payload.get(name) is not None:
                    weights[payload[name]] += weight
            if weights:  # a field no history payload has says nothing about the shopper
                self._weights[name] = weights
        self._totals = {name: sum(w.values()) for name, w in self._weights.items()}

    def lift(self, name: str, value: object) -> float:
        """log(P(value | history) / P(value | catalog)); 0 for a field the history says nothing of."""
        if name not in self._weights or value is None:
            return 0.0
        share = self.prior.share(name, value)
        seen = self._weights[name].get(value, 0.0)
        return math.log((seen + self.strength * share) / (self._totals[name] + self.strength) / share)

    def scores(self, candidates: Sequence[dict]) -> np.ndarray:
        """(n,) the summed lifts of each candidate payload's values (a missing field adds 0)."""
        out = np.zeros(len(candidates))
        for name in self._weights:
            lifts: dict = {}  # value -> lift: 200 candidates hold few distinct values per field
            column = []
            for payload in candidates:
                value = payload.get(name)
                lift = lifts.get(value)
                if lift is None:
                    lift = lifts[value] = self.lift(name, value)
                column.append(lift)
            out += column
        return out

    def shared_tastes(self, payload: dict, min_lift: float = math.log(2.0), limit: int = 2) -> list[str]:
        """The item's values the shopper favours (at least `min_lift`), strongest first: the reason."""
        strong = [(self.lift(n, payload.get(n)), str(payload[n])) for n in self._weights if payload.get(n)]
        return [value for lift, value in sorted(strong, reverse=True) if lift >= min_lift][:limit]

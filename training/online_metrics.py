"""Online metrics of served slates: CTR, CVR, exposure Gini, catalog coverage, popular-item share."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np


def exposure_gini(exposures: Counter | dict[str, int], catalog_size: int) -> float:
    """Gini coefficient of impressions over the whole catalog (never-shown products count as 0):
    0 = every product shown equally often, 1 = all impressions on one product."""
    if catalog_size <= 0:
        raise ValueError("catalog_size must be positive")
    counts = np.zeros(catalog_size, dtype=np.float64)
    shown = np.fromiter(exposures.values(), dtype=np.float64, count=len(exposures))
    if len(shown) > catalog_size:
        raise ValueError(f"{len(shown)} products were shown but the catalog has only {catalog_size}")
    counts[: len(shown)] = shown
    total = counts.sum()
    if total == 0:
        return 0.0
    ordered = np.sort(counts)  # ascending
    ranks = np.arange(1, catalog_size + 1)
    return float((2 * (ranks * ordered).sum()) / (catalog_size * total) - (catalog_size + 1) / catalog_size)


def coverage(exposures: Counter | dict[str, int], catalog_size: int) -> float:
    """Share of the catalog shown at least once."""
    if catalog_size <= 0:
        raise ValueError("catalog_size must be positive")
    return sum(1 for n in exposures.values() if n > 0) / catalog_size


def popular_share(shown: Iterable[str], popular: set[str]) -> float:
    """Share of impressions that went to the `popular` set (e.g. the top 1% of products by events)."""
    shown = list(shown)
    return sum(1 for pid in shown if pid in popular) / len(shown) if shown else 0.0


def category_coverage(shown_categories: Iterable[str], all_categories: set[str]) -> float:
    """Share of the catalog's categories that appeared in at least one served slate."""
    if not all_categories:
        return 0.0
    return len(set(shown_categories) & all_categories) / len(all_categories)


def rate_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float, float]:
    """A rate with its Wilson 95% interval (rate, low, high); well behaved at small counts and rates
    near 0, where the normal approximation gives negative lower bounds."""
    if trials <= 0:
        return 0.0, 0.0, 0.0
    rate = successes / trials
    denom = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denom
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denom
    return rate, max(0.0, centre - half), min(1.0, centre + half)

"""Shopper simulator: seeded shoppers with latent tastes browse, search and buy in the fashion catalog.

The generative model (the recommender never sees the latent preferences, only the events):

Shopper (all draws from a per-shopper RNG seeded by (seed, shopper index)):
- gender: Men 45%, Women 45%, Boys 5%, Girls 5%; products of that gender or Unisex are eligible.
- usage taste: Dirichlet(0.5) weights over the catalog's usage values (Casual, Sports, Formal, ...).
- favourite colours: 3 colours drawn by catalog frequency; favourite article types: 4 drawn by how
  many eligible products they have (weights by the type's catalog share).
- price sensitivity lam ~ Uniform(0, 1.5): utility falls by lam * log(price / median price of the type).
- activity: sessions per day ~ Poisson(rate), rate ~ Gamma(2, 0.4) (mean 0.8 sessions a day).

Utility of an eligible product p: 1.5 * [colour is a favourite] + 1.0 * log(usage weight * n_usages)
clipped at -3 - lam * log(price / type median) + 0.5 * brand affinity (a per-shopper N(0, 1) draw per
brand, the first word of the title) + Gumbel noise.

Session: an intent article type is one of the favourites (80%) or any eligible type (20%, exploration).
With probability 0.3 the session opens with a search "{colour} {gender} {articleType}" (a favourite
colour, lower-cased words). The shopper then views 2-10 products of the intent type drawn by
softmax(utility / 0.7) without replacement; each view is clicked with probability
sigmoid(utility - 1), a click goes to the cart with probability 0.35 and a cart is bought with 0.5
(and an out-of-stock product is never bought). Events are seconds apart within a session.

Drift: at the start of each day, with probability 0.15 one favourite article type is replaced by a new
one and with probability 0.1 one favourite colour, so histories carry recency that a sequence model can
use and a static profile cannot.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.catalog import Product
from training.events import Event

GENDER_SHARES = {"Men": 0.45, "Women": 0.45, "Boys": 0.05, "Girls": 0.05}
SEARCH_PROBABILITY = 0.3
EXPLORE_PROBABILITY = 0.2
CART_PROBABILITY = 0.35
PURCHASE_PROBABILITY = 0.5
TEMPERATURE = 0.7
TYPE_DRIFT, COLOUR_DRIFT = 0.15, 0.1
START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z: simulated day 0
EVENT_NAMESPACE = uuid.UUID("0b6f8a7e-3d55-5b8e-a1c2-93f1d2e4c5a6")


@dataclass(frozen=True)
class SimulatorConfig:
    """How many shoppers, for how long, from which seed."""

    shoppers: int = 1000
    days: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shoppers < 1 or self.days < 1:
            raise ValueError(f"shoppers and days must be >= 1, got {self.shoppers} and {self.days}")


@dataclass
class Shopper:
    """A shopper's latent tastes (written beside the events for analysis, never read by the recommender)."""

    user_id: str
    gender: str
    usage_weights: dict[str, float]
    colours: list[str]
    article_types: list[str]
    price_sensitivity: float
    sessions_per_day: float


class CatalogView:
    """Per-product arrays the simulator scores with, as integer codes (built once, reused per shopper)."""

    def __init__(self, products: list[Product]) -> None:
        if not products:
            raise ValueError("the simulator needs a non-empty catalog")
        self.ids = [p.id for p in products]
        self.gender = np.array([p.gender or "" for p in products])
        self.article_names, self.article = np.unique(
            [p.articleType or "" for p in products], return_inverse=True
        )
        self.colour_names, self.colour = np.unique(
            [p.baseColour or "" for p in products], return_inverse=True
        )
        self.usage_names, self.usage = np.unique([p.usage or "" for p in products], return_inverse=True)
        self.brand_names, self.brand = np.unique(
            [p.title.split()[0].lower() for p in products], return_inverse=True
        )
        self.in_stock = np.array([p.in_stock for p in products])
        price = np.array([p.price for p in products], dtype=np.float64)
        medians = np.array([np.median(price[self.article == a]) for a in range(len(self.article_names))])
        self.log_rel_price = np.log(price / medians[self.article])
        self.colour_counts = np.bincount(self.colour, minlength=len(self.colour_names)).astype(float)
        self.colour_counts[self.colour_names == ""] = 0.0  # "missing" is nobody's favourite colour
        self.by_article = [np.flatnonzero(self.article == a) for a in range(len(self.article_names))]

    def eligible(self, gender: str) -> np.ndarray:
        """Products a shopper of this gender considers (their gender or Unisex; all if none match)."""
        mask = (self.gender == gender) | (self.gender == "Unisex")
        return mask if mask.any() else np.ones(len(self.ids), bool)


def make_shopper(view: CatalogView, index: int, rng: np.random.Generator) -> Shopper:
    """Shopper `index`'s latent tastes (gender, usage weights, colours, article types, price, activity)."""
    genders = list(GENDER_SHARES)
    gender = genders[rng.choice(len(genders), p=list(GENDER_SHARES.values()))]
    counts = np.bincount(view.article[view.eligible(gender)], minlength=len(view.article_names)).astype(float)
    favourites = rng.choice(
        len(counts), size=min(4, int((counts > 0).sum())), replace=False, p=counts / counts.sum()
    )
    n_colours = min(3, int((view.colour_counts > 0).sum()))
    colours = rng.choice(
        len(view.colour_counts),
        size=n_colours,
        replace=False,
        p=view.colour_counts / view.colour_counts.sum(),
    )
    usage = rng.dirichlet([0.5] * len(view.usage_names))
    return Shopper(
        user_id=f"u{index:06d}",
        gender=gender,
        usage_weights={str(u): float(w) for u, w in zip(view.usage_names, usage, strict=True) if u},
        colours=[str(view.colour_names[c]) for c in colours],
        article_types=[str(view.article_names[a]) for a in favourites],
        price_sensitivity=float(rng.uniform(0.0, 1.5)),
        sessions_per_day=float(rng.gamma(2.0, 0.4)),
    )


def shopper_utilities(view: CatalogView, shopper: Shopper, brand_affinity: np.ndarray) -> np.ndarray:
    """Deterministic part of each product's utility for this shopper (-inf where not eligible)."""
    favourite = np.isin(view.colour_names, shopper.colours)  # (n_colours,)
    n_usages = max(1, len(shopper.usage_weights))
    usage_w = np.array([shopper.usage_weights.get(str(u), 1.0 / n_usages) for u in view.usage_names])
    usage_term = np.clip(np.log(usage_w * n_usages + 1e-9), -3.0, None)  # (n_usages,)
    utility = (
        1.5 * favourite[view.colour]
        + usage_term[view.usage]
        - shopper.price_sensitivity * view.log_rel_price
        + 0.5 * brand_affinity[view.brand]
    )
    return np.where(view.eligible(shopper.gender), utility, -np.inf)


def organic_session(
    view: CatalogView, shopper: Shopper, utility: np.ndarray, rng: np.random.Generator
) -> list[tuple[str, str | None, str | None]]:
    """One session's (type, product id, query) events."""
    if rng.random() < EXPLORE_PROBABILITY or not shopper.article_types:
        eligible_types = np.unique(view.article[np.isfinite(utility)])
        intent = int(eligible_types[rng.integers(len(eligible_types))])
    else:
        name = shopper.article_types[rng.integers(len(shopper.article_types))]
        intent = int(np.searchsorted(view.article_names, name))
    events: list[tuple[str, str | None, str | None]] = []
    if rng.random() < SEARCH_PROBABILITY:
        colour = shopper.colours[rng.integers(len(shopper.colours))] if shopper.colours else ""
        query = " ".join(w for w in (colour, shopper.gender, str(view.article_names[intent])) if w).lower()
        events.append(("search", None, query))
    pool = view.by_article[intent]
    pool = pool[np.isfinite(utility[pool])]
    if len(pool) == 0:
        return events
    noisy = utility[pool] + rng.gumbel(size=len(pool))
    weights = np.exp((noisy - noisy.max()) / TEMPERATURE)
    n_views = min(len(pool), int(rng.integers(2, 11)))
    picked = rng.choice(pool, size=n_views, replace=False, p=weights / weights.sum())
    for i in picked:
        pid = view.ids[i]
        events.append(("view", pid, None))
        if rng.random() < 1.0 / (1.0 + np.exp(-(utility[i] - 1.0))):
            events.append(("click", pid, None))
            if rng.random() < CART_PROBABILITY:
                events.append(("cart", pid, None))
                if view.in_stock[i] and rng.random() < PURCHASE_PROBABILITY:
                    events.append(("purchase", pid, None))
    return events


def drift_tastes(view: CatalogView, shopper: Shopper, rng: np.random.Generator) -> None:
    """A day's drift: maybe one favourite article type and one favourite colour replaced (in place)."""
    if rng.random() < TYPE_DRIFT and shopper.article_types:
        eligible = set(view.article_names[np.unique(view.article[view.eligible(shopper.gender)])])
        choices = sorted(eligible - set(shopper.article_types))
        if choices:
            shopper.article_types[rng.integers(len(shopper.article_types))] = str(
                choices[rng.integers(len(choices))]
            )
    if rng.random() < COLOUR_DRIFT and shopper.colours:
        choices = sorted(set(view.colour_names[view.colour_counts > 0]) - set(shopper.colours))
        if choices:
            shopper.colours[rng.integers(len(shopper.colours))] = str(choices[rng.integers(len(choices))])


@dataclass
class ShopperRun:
    """One shopper simulated for some days."""

    profile: Shopper  # latent tastes as of day 0 (a copy: drift changes `shopper`, not this)
    shopper: Shopper  # the tastes after the last day's drift
    brand_affinity: np.ndarray  # (n_brands,) one affinity per brand, never written to the profile
    utility: np.ndarray | None  # (n_products,) the last day's deterministic utility (None: 0 days)
    events: list[Event]  # in the order drawn


def simulate_shopper(view: CatalogView, index: int, days: int, seed: int) -> ShopperRun:
    """Shopper `index` over `days` days, from its own generator: the same (seed, index) gives the same
    shopper and events whatever else is simulated."""
    rng = np.random.default_rng([seed, index])
    shopper = make_shopper(view, index, rng)
    brand_affinity = rng.normal(size=len(view.brand_names))
    profile = Shopper(
        **{**asdict(shopper), "colours": list(shopper.colours), "article_types": list(shopper.article_types)}
    )
    events: list[Event] = []
    utility = None
    for day in range(days):
        if day:
            drift_tastes(view, shopper, rng)
        utility = shopper_utilities(view, shopper, brand_affinity)
        for _ in range(rng.poisson(shopper.sessions_per_day)):
            ts = START_TS + day * 86_400 + rng.uniform(0, 80_000)
            for kind, pid, query in organic_session(view, shopper, utility, rng):
                ts += rng.exponential(20.0)
                event_id = str(uuid.uuid5(EVENT_NAMESPACE, f"{seed}:{shopper.user_id}:{len(events)}"))
                events.append(Event(event_id, shopper.user_id, pid, kind, query, None, round(ts, 3)))
    return ShopperRun(profile, shopper, brand_affinity, utility, events)


def simulate_sessions(
    products: list[Product], config: SimulatorConfig = SimulatorConfig(), progress: bool = True
) -> tuple[list[Event], list[Shopper]]:
    """Events of `config.shoppers` shoppers over `config.days` days, sorted by time; and the shoppers
    (their latent tastes as of day 0). Same catalog + config -> the same events."""
    view = CatalogView(products)
    events: list[Event] = []
    shoppers: list[Shopper] = []
    for index in tqdm(range(config.shoppers), desc="simulate shoppers", unit="shopper", disable=not progress):
        run = simulate_shopper(view, index, config.days, config.seed)
        shoppers.append(run.profile)
        events.extend(run.events)
    events.sort(key=lambda e: (e.ts, e.event_id))
    return events, shoppers


def write_shoppers(shoppers: list[Shopper], path: Path) -> None:
    """The latent tastes, for analysis and the closed-loop simulator (never for the recommender)."""
    path.write_text(json.dumps([asdict(s) for s in shoppers], indent=1, ensure_ascii=False))


def summarize(events: list[Event]) -> dict:
    """Counts by type, shoppers, and events per shopper (printed by `shopguide simulate sessions`)."""
    by_type = Counter(e.type for e in events)
    per_user: dict[str, int] = defaultdict(int)
    for e in events:
        per_user[e.user_id] += 1
    lengths = np.array(list(per_user.values()) or [0])
    return {
        "events": len(events),
        "shoppers_with_events": len(per_user),
        "by_type": dict(sorted(by_type.items())),
        "events_per_shopper_median": float(np.median(lengths)),
        "click_through_rate": round(by_type["click"] / max(1, by_type["view"]), 4),
        "conversion_rate": round(by_type["purchase"] / max(1, by_type["click"]), 4),
    }

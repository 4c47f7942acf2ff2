"""Exploration on feed slots (epsilon-greedy or Thompson sampling) with logged propensities.

The model's slate is the greedy (exploit) choice. Each slot i also gets its own alternatives: the pool
of candidates (half the next products of a content ranking of the shopper's history, then popular
products; popular only on the cold start; all passing the request's filters, none in the slate or
excluded) dealt round-robin, slot i taking pool items i, i + k, i + 2k, ... up to `alternatives`.
Slots never share candidates, so a slate never holds a product twice, slots are decided independently,
and each slot's propensity is exact for epsilon-greedy:

    candidates C_i = {greedy_i} + alternatives_i,  n_i = |C_i|
    epsilon-greedy: with probability eps a uniform draw from C_i (the greedy item included), else greedy_i
                    P(a) = (1 - eps) * [a == greedy_i] + eps / n_i
    Thompson:       each candidate's click rate ~ Beta(s * m_a + clicks_a, s * (1 - m_a) + impressions_a
                    - clicks_a) from the feed log (see below); the slot shows the argmax of one draw.
                    P(a) = share of S Monte Carlo draws (the shown draw included, so P >= 1 / S) in which
                    a has the highest sample; standard error sqrt(P (1 - P) / S), at most 0.016 for
                    S = 1000 (0.0095 at P = 0.1, 0.0069 at P = 0.05). Counting the shown draw is what
                    keeps IPS unbiased: with B ~ Binomial(S - 1, P) other wins, E[S / (1 + B)] =
                    (1 - (1 - P)^S) / P, i.e. 1 / P up to (1 - P)^S, and P can never be estimated 0.

Thompson's prior: mean m = `thompson_prior_ctr` for alternatives and `thompson_model_lift` times that
for the model's pick (the model's ranking is evidence too), worth s = `thompson_prior_strength`
impressions. Without evidence it still replaces the model's pick often (3 alternatives, s = 20, lift 2:
about half the slots), so it explores far more than epsilon 0.05 until the log has clicks; it converges
to the alternatives with the best logged CTR, whatever the model says. The counts are per product over
all shoppers and positions (no position or personal correction): a bandit over the model's shortlist.

Cost per feed of 10 (full catalog, in process, this 2-core machine): logging alone about 0.15 ms of
CPU (one executemany, no fsync); epsilon-greedy adds the pool (a second ANN search, about 1.2 ms, and
a popularity read), Thompson also the sampling (S = 1000: about 2 ms).

"greedy" (the default) shows the model's slate unchanged and logs propensity 1 with one candidate per
slot (no pool is fetched, so exploration costs nothing when it is off). Every served item is logged
(event store table feed_items) with the request_id, user, position, product, propensity, the greedy
product, the number of candidates, the policy spec, the model version and the A/B arm: what
training/offpolicy.py needs to evaluate greedy and epsilon targets, and training/ab.py to report arms.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from index import Filters, Hit
from serving.event_store import EventStoreError, FeedItem
from training.offpolicy import LOGGING_POLICIES, Policy, parse_policy

if TYPE_CHECKING:
    from serving.recommend import Recommender

log = logging.getLogger("shopguide.explore")

EXPLORE_REASON = "exploring: {}"  # explored items say so first: the storefront shows the first reason
RANKED_SHARE = 0.5  # of the pool: the content ranking's next products; the rest popular products
# With explore_seed set, the n-th request (counted per seed value in this process) uses rng([seed, n]).
_SEEDS: dict[int, itertools.count] = {}
_SEEDS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExploreSettings:
    """What a feed's exploration needs (read from RecommenderConfig's explore_* / thompson_* fields)."""

    policy: Policy
    alternatives: int = 3  # per slot, candidates besides the model's pick
    thompson_samples: int = 1000  # Monte Carlo draws per slot for Thompson propensities
    thompson_prior_ctr: float = 0.05  # prior mean click rate of an alternative
    thompson_prior_strength: float = 20.0  # the prior is worth this many impressions
    thompson_model_lift: float = 2.0  # the model's pick starts at this many times the prior mean
    seed: int | None = None  # None: fresh OS entropy per request; an int: reproducible runs

    @classmethod
    def from_config(cls, config: Any) -> ExploreSettings:
        """From a RecommenderConfig (duck-typed to keep serving.recommend free of an import cycle)."""
        return cls(
            policy=parse_policy(config.explore_policy, LOGGING_POLICIES),
            alternatives=config.explore_alternatives,
            thompson_samples=config.thompson_samples,
            thompson_prior_ctr=config.thompson_prior_ctr,
            thompson_prior_strength=config.thompson_prior_strength,
            thompson_model_lift=config.thompson_model_lift,
            seed=config.explore_seed,
        )

    def __post_init__(self) -> None:
        if self.alternatives < 0:
            raise ValueError(f"explore_alternatives must be >= 0, got {self.alternatives}")
        if self.thompson_samples < 1:
            raise ValueError(f"thompson_samples must be >= 1, got {self.thompson_samples}")
        if (
            not 0 < self.thompson_prior_ctr < 1
            or not 0 < self.thompson_prior_ctr * self.thompson_model_lift < 1
        ):
            raise ValueError(
                "thompson_prior_ctr and thompson_prior_ctr * thompson_model_lift must be in (0, 1), got "
                f"{self.thompson_prior_ctr} and {self.thompson_prior_ctr * self.thompson_model_lift}"
            )
        if self.thompson_prior_strength <= 0:
            raise ValueError(f"thompson_prior_strength must be > 0, got {self.thompson_prior_strength}")

    @property
    def explores(self) -> bool:
        return self.alternatives > 0 and (
            self.policy.name == "thompson" or (self.policy.name == "epsilon" and self.policy.epsilon > 0)
        )


@dataclass(frozen=True)
class SlotDecision:
    """What the logging policy did in one slot."""

    position: int
    product_id: str  # shown
    greedy_product_id: str  # the model's pick for this slot
    propensity: float  # P(shown | this slot's candidates) under the policy
    candidates: int  # 1 + the slot's alternatives


def slot_alternatives(slots: int, pool: Sequence[str], alternatives: int) -> list[list[str]]:
    """Deal the pool round-robin: slot i gets pool[i], pool[i + slots], ... (at most `alternatives`)."""
    return [list(pool[i :: max(slots, 1)][:alternatives]) for i in range(slots)]


def explore_slate(
    greedy: Sequence[str],
    pool: Sequence[str],
    settings: ExploreSettings,
    rng: np.random.Generator,
    stats: dict[str, tuple[int, int]] | None = None,
) -> list[SlotDecision]:
    """Decide every slot of a slate. greedy: the model's slate (product ids in order); pool: candidate
    ids not in it (best first); stats: product_id -> (impressions, clicks) for Thompson sampling."""
    policy = settings.policy
    if not settings.explores:
        return [SlotDecision(i, pid, pid, 1.0, 1) for i, pid in enumerate(greedy)]
    if set(pool) & set(greedy):
        raise ValueError("the exploration pool must not contain products of the slate")
    per_slot = slot_alternatives(len(greedy), pool, settings.alternatives)
    if policy.name == "epsilon":
        return _epsilon_greedy(greedy, per_slot, policy.epsilon, rng)
    if policy.name == "thompson":
        return _thompson(greedy, per_slot, settings, rng, stats or {})
    raise ValueError(f"unknown logging policy {policy.spec!r}; use one of {LOGGING_POLICIES}")


def _epsilon_greedy(
    greedy: Sequence[str], per_slot: list[list[str]], epsilon: float, rng: np.random.Generator
) -> list[SlotDecision]:
    explore = rng.random(len(greedy)) < epsilon  # (slots,)
    decisions = []
    for i, (pick, alternatives) in enumerate(zip(greedy, per_slot, strict=True)):
        candidates = [pick, *alternatives]
        n = len(candidates)
        shown = candidates[int(rng.integers(n))] if explore[i] else pick
        propensity = (1 - epsilon) * (shown == pick) + epsilon / n
        decisions.append(SlotDecision(i, shown, pick, float(propensity), n))
    return decisions


def _thompson(
    greedy: Sequence[str],
    per_slot: list[list[str]],
    settings: ExploreSettings,
    rng: np.random.Generator,
    stats: dict[str, tuple[int, int]],
) -> list[SlotDecision]:
    slots = len(greedy)
    width = 1 + max((len(a) for a in per_slot), default=0)
    strength, prior = settings.thompson_prior_strength, settings.thompson_prior_ctr
    # (slots, width) Beta parameters; padding columns get a tiny mean so they never win a draw.
    alpha = np.full((slots, width), 1e-6)
    beta = np.full((slots, width), 1e6)
    for i, (pick, alternatives) in enumerate(zip(greedy, per_slot, strict=True)):
        for j, pid in enumerate([pick, *alternatives]):
            mean = prior * settings.thompson_model_lift if j == 0 else prior
            impressions, clicks = stats.get(pid, (0, 0))
            clicks = min(clicks, impressions)
            alpha[i, j] = strength * mean + clicks
            beta[i, j] = strength * (1 - mean) + impressions - clicks
    shape = (settings.thompson_samples, slots, width)
    # Beta(a, b) = Ga / (Ga + Gb); float32 gammas are about 10% cheaper and argmax needs no more.
    ga = rng.standard_gamma(np.broadcast_to(alpha, shape).astype(np.float32), dtype=np.float32)
    gb = rng.standard_gamma(np.broadcast_to(beta, shape).astype(np.float32), dtype=np.float32)
    winners = (ga / (ga + gb)).argmax(axis=2)  # (samples, slots)
    decisions = []
    for i, (pick, alternatives) in enumerate(zip(greedy, per_slot, strict=True)):
        candidates = [pick, *alternatives]
        chosen = int(winners[0, i])  # the draw that is shown is one of the S the propensity counts
        propensity = float((winners[:, i] == chosen).mean()) if alternatives else 1.0
        decisions.append(SlotDecision(i, candidates[chosen], pick, propensity, len(candidates)))
    return decisions


def request_rng(seed: int | None) -> np.random.Generator:
    """A generator per request (numpy generators are not thread-safe, and feeds run concurrently)."""
    if seed is None:
        return np.random.default_rng()
    with _SEEDS_LOCK:
        n = next(_SEEDS.setdefault(seed, itertools.count()))
    return np.random.default_rng([seed, n])


def explore_and_log(
    recommender: Recommender,
    response: dict,
    *,
    user_id: str,
    filters: Filters,
    exclude: set[str],
    arm: str | None,
    rank_more: Callable[[int, set[str]], list[Hit]] | None = None,
) -> dict:
    """Apply the configured policy to a feed response (items replaced in place where a slot explores,
    each item given its `propensity`, the response its `policy`) and log every served item in one
    write. rank_more(n, taken): the next n products of a ranking of the shopper's history, excluding
    `taken` (None for the cold start, whose alternatives are popular products only)."""
    settings = ExploreSettings.from_config(recommender.config)
    items = response["items"]
    greedy = [item["product_id"] for item in items]
    pool_items: dict[str, dict] = {}
    if settings.explores and items:
        pool_items = _pool(
            recommender, len(items) * settings.alternatives, filters, exclude | set(greedy), rank_more
        )
    stats = (
        recommender.events.feed_product_stats([*greedy, *pool_items])
        if settings.explores and settings.policy.name == "thompson"
        else None
    )
    decisions = explore_slate(greedy, list(pool_items), settings, request_rng(settings.seed), stats)
    served = []
    for decision, item in zip(decisions, items, strict=True):
        shown = item if decision.product_id == decision.greedy_product_id else pool_items[decision.product_id]
        served.append({**shown, "propensity": round(decision.propensity, 6)})
    response["items"] = served
    response["policy"] = settings.policy.spec
    now = time.time()
    rows = [
        FeedItem(
            request_id=response["request_id"],
            user_id=user_id,
            position=d.position,
            product_id=d.product_id,
            propensity=d.propensity,
            greedy_product_id=d.greedy_product_id,
            candidates=d.candidates,
            policy=settings.policy.spec,
            model_version=response["model_version"],
            arm=arm,
            ts=now,
        )
        for d in decisions
    ]
    try:
        recommender.events.add_feed_items(rows)
    except (sqlite3.Error, EventStoreError):
        # The shopper still gets the feed; the log loses this slate (and says so, loudly).
        log.exception("could not log feed request %s for user %r", response["request_id"], user_id)
    return response


def _pool(
    recommender: Recommender,
    size: int,
    filters: Filters,
    taken: set[str],
    rank_more: Callable[[int, set[str]], list[Hit]] | None,
) -> dict[str, dict]:
    """product_id -> response item for up to `size` alternatives, best first: the ranking's next
    products, then popular ones; all pass the filters and none is in `taken`."""
    from serving.recommend import _Pick  # a cycle at import time; the response format is recommend's

    picks: list[_Pick] = []
    seen = set(taken)
    if rank_more is not None:
        for hit in rank_more(max(1, int(size * RANKED_SHARE)), seen):
            if hit.product_id not in seen:
                reason = EXPLORE_REASON.format("close to your taste")
                picks.append(_Pick(hit.product_id, hit.score, hit.payload, [reason]))
                seen.add(hit.product_id)
    for hit in _popular_hits(recommender, size - len(picks), filters, seen):
        category = hit.payload.get("articleType") or hit.payload.get("masterCategory") or "the shop"
        picks.append(
            _Pick(hit.product_id, 0.0, hit.payload, [EXPLORE_REASON.format(f"popular in {category}")])
        )
        seen.add(hit.product_id)
    items = recommender._respond(picks, "")["items"]
    return {item["product_id"]: item for item in items}


def _popular_hits(recommender: Recommender, need: int, filters: Filters, seen: set[str]) -> list[Hit]:
    """The `need` most popular products passing the filters, not in `seen`. Reads only twice as many
    payloads as needed (Recommender._popular reads 10x, about 6 ms on the full catalog); narrow filters
    that leave too few fall through to it."""
    if need <= 0:
        return []
    ranked = [pid for pid, _ in recommender.events.popular(limit=len(seen) + 2 * need) if pid not in seen]
    records = {r.product_id: r for r in recommender.index.get(ranked[: 2 * need])}
    out = [
        Hit(pid, 0.0, records[pid].payload)
        for pid in ranked[: 2 * need]
        if pid in records and filters.matches(records[pid].payload)
    ][:need]
    if len(out) < need:
        out += recommender._popular(need - len(out), filters, seen | {h.product_id for h in out})
    return out

"""Closed-loop simulator: seeded shoppers use the real HTTP API day after day while the server learns.

`shopguide simulate loop` compares recommendation strategies on identical simulated shoppers:

- popularity: shoppers are shown `GET /catalog/popular` (the same global top-k for everyone) instead of
  their feed; the baseline the issue's target is measured against.
- none: `GET /users/{id}/feed` from the day-0 model forever (the feed still reacts to new events, the
  model never retrains).
- incremental, full, hybrid: the feed, and after each simulated day `training.update.update_and_promote`
  with that strategy on every event so far (what `shopguide train update --strategy X --promote
  --events FILE` runs: train, register, gate on shoppers active in the last `holdout_days`). The loop
  then waits until `GET /healthz` reports the promoted version (`model_versions.user_encoder_version`)
  before the next day; the server hot-swaps the registry's LIVE model by itself.

Setup (`prepare_base`): the data dir's ingested index (`shopguide ingest`; run here when missing) is
copied to WORK/base without its events and models; `warm_up` simulates the shoppers for `warmup_days`
days exactly as `training.simulator.simulate_sessions` does (same generative model, same seed, same
events); a full GRU trained on those events is registered and promoted in WORK/base's registry as the
day-0 model (reused while its inputs are unchanged). Each strategy then runs on its own copy WORK/<name>
(the embedded index is owned by one process, so strategies run one after another, each with its own
`shopguide serve --no-ray` subprocess), whose empty event store receives the warm-up events over
`POST /events` first. With `--url` the loop drives a running server instead (one strategy; its data dir's
registry gets the day-0 model, forced live).

A simulated day (loop day d is day warmup_days + d of the simulator's calendar, which starts on
training.simulator.START_TS): each shopper drifts and draws sessions as in the simulator. A session
opens the shop: the shopper gets a slate of k items (feed or popular) and reacts:
P(click on position i) = sigmoid(utility + interest - 1) * position_bias(i), position_bias(i) =
1 / log2(i + 2) (i = 0 at the top: 1, 0.63, 0.5, ... 0.29 at the tenth), utility being the simulator's
deterministic utility (favourite colours, usage, price, brand; ineligible genders never click) and
interest the shopper's interest in the product's article type (`type_interest`): log(P(a visit's intent
is that type) * n eligible types), clipped at -3, from the simulator's own intent model (a favourite
type with 0.8, else any eligible type), the form of its usage term. A slate mixes article types, which
an organic session (one intent type) never does, so the click model has to say how much the shopper
cares for each; without the term a favourite-type product is worth no more than any other, and the
strongest taste the generative model has is invisible to clicks (`--type-interest 0` runs that
model). A click goes to the cart with 0.35 and a cart is bought with 0.5 (never when out of stock), and
after a click the shopper opens "similar items" of it with `similar_probability` and reacts to that
slate the same way. Every click, cart and purchase carries the request_id of the response that showed
the product. The session then goes on organically (the simulator's `organic_session`: search, views
and clicks of an intent type), so new interests keep entering the event store. All of a session's
events are posted in one `POST /events`; sessions of a day are played in time order, one at a time.

Common random numbers: drift and organic sessions draw from a per-(shopper, day) generator and the
reactions from another, so every strategy sees the same shoppers, days and sessions; only what they are
shown (and so their reactions) differs.

Metrics per (strategy, day), over the strategy's own slates (feed or popular, not similar items):
ctr = clicks / impressions, cvr = purchases / impressions, coverage = distinct products shown / catalog,
gini = exposure Gini over the whole catalog (training.online_metrics); rows also carry counts, the CTR's
Wilson interval, similar-item CTR, the served model version, and the update run after the day (its
strategy, whether it was promoted, `train_seconds` = update + gate, `swap_seconds` = waiting for the
server). No update runs after the last day (no day would see it). Hybrid's "last full retrain older
than 7 days" trigger reads wall-clock time, so it never fires within one run; its other triggers do.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from encoders.sequence import SequenceEncoder, SequenceModelConfig
from training.catalog import ATTRIBUTE_COLUMNS, Product, load_catalog
from training.events import Event, write_events
from training.ingest import ALIAS, MANIFEST
from training.offpolicy import LOGGING_POLICIES, offpolicy_estimate, parse_policy
from training.online_metrics import coverage, exposure_gini, rate_interval
from training.registry import ModelRegistry
from training.sequences import TrainConfig
from training.simulator import (
    CART_PROBABILITY,
    EXPLORE_PROBABILITY,
    PURCHASE_PROBABILITY,
    START_TS,
    CatalogView,
    Shopper,
    drift_tastes,
    organic_session,
    shopper_utilities,
    simulate_shopper,
)
from training.update import STRATEGIES as UPDATE_STRATEGIES
from training.update import holdout_histories, holdout_metrics, run_update, update_and_promote

STRATEGIES = ("popularity", "none", *UPDATE_STRATEGIES)  # in the order they run and are reported
ORGANIC_STREAM, REACTION_STREAM = 1, 2  # second seed word of the per-(shopper, day) generators
EVENTS_PER_POST = 1000  # serving.api.MAX_EVENTS_PER_REQUEST
EVENT_GAP_S = 5.0  # seconds between a session's slate events (organic ones keep the simulator's gaps)


class LoopError(RuntimeError):
    """The loop cannot go on (server did not start or swap models, bad setup); says what to do."""


@dataclass(frozen=True)
class ReactionConfig:
    """How a simulated shopper reacts to a slate (cart and purchase rates are the simulator's)."""

    k: int = 10  # items per slate: feed, popular and similar items
    click_offset: float = 1.0  # P(click) = sigmoid(utility - click_offset) * position_bias: simulator's 1
    type_interest: float = 1.0  # weight of the article-type interest in the click utility (0: left out)
    similar_probability: float = 0.3  # after a click, chance the shopper opens that product's similar items


@dataclass
class LoopConfig:
    """One closed-loop run; defaults take about 5 minutes on 2 cores on a 2,000-product catalog."""

    days: int = 7  # simulated days with the strategy in charge
    shoppers: int = 300  # simulated shoppers (the same ones in every strategy)
    warmup_days: int = 7  # simulator days before day 0: the day-0 model's training data
    seed: int = 0  # shoppers, their sessions and reactions, and model training
    strategies: tuple[str, ...] = STRATEGIES
    explore_policy: str = "greedy"  # the feed's exploration; not greedy: the off-policy check runs too
    reaction: ReactionConfig = field(default_factory=ReactionConfig)
    tolerance: float = 0.02  # promotion gate: allowed relative NDCG@10 drop (as `train update --promote`)
    holdout_days: float = 1.0  # promotion gate: shoppers active in the last N days of events
    start_timeout_s: float = 180.0  # for a `shopguide serve` subprocess to answer /healthz
    swap_timeout_s: float = 120.0  # for the server to report a newly promoted model
    model: SequenceModelConfig = field(default_factory=SequenceModelConfig)  # day-0 and full retrains
    train: TrainConfig = field(default_factory=TrainConfig)  # (incremental: UpdatePolicy's epochs and lr)

    def validate(self) -> LoopConfig:
        if self.days < 1 or self.shoppers < 1 or self.warmup_days < 1:
            raise ValueError(
                f"days, shoppers and warmup_days must be >= 1, got {self.days}, {self.shoppers}, "
                f"{self.warmup_days}"
            )
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown}; use some of {', '.join(STRATEGIES)}")
        if not 1 <= self.reaction.k <= 1000:
            raise ValueError(f"k must be between 1 and 1000, got {self.reaction.k}")
        parse_policy(self.explore_policy, LOGGING_POLICIES)
        if self.reaction.type_interest < 0:
            raise ValueError(f"type_interest must be >= 0, got {self.reaction.type_interest}")
        if not 0 <= self.reaction.similar_probability <= 1:
            raise ValueError(
                f"similar_probability must be in [0, 1], got {self.reaction.similar_probability}"
            )
        return self


# ---- shoppers ---------------------------------------------------------------------------------------
@dataclass
class SimShopper:
    """A simulated shopper's live state: tastes (drifting), brand affinities, today's utilities."""

    index: int  # the simulator's shopper index (seeds its generators)
    shopper: Shopper
    brand_affinity: np.ndarray  # (n_brands,)
    utility: np.ndarray | None = None  # (n_products,) today's deterministic utility, -inf = ineligible
    interest: np.ndarray | None = None  # (n_products,) today's interest in each product's article type


def warm_up(view: CatalogView, shoppers: int, days: int, seed: int) -> tuple[list[Event], list[SimShopper]]:
    """The simulator's first `days` days (`simulate_sessions`'s events with this catalog, shopper count,
    days and seed), and each shopper's state at the end of them."""
    events: list[Event] = []
    states: list[SimShopper] = []
    for index in range(shoppers):
        run = simulate_shopper(view, index, days, seed)
        events.extend(run.events)
        states.append(SimShopper(index, run.shopper, run.brand_affinity, run.utility))
    events.sort(key=lambda e: (e.ts, e.event_id))
    return events, states


@dataclass
class PlannedSession:
    """One visit: when it starts and the organic browsing that follows the slate."""

    shopper: int  # position in the states list
    start: float  # ts of the slate request
    organic: list[tuple[str, str | None, str | None, float]]  # (type, product, query, seconds after slate)


def plan_day(view: CatalogView, states: list[SimShopper], day: int, seed: int) -> list[PlannedSession]:
    """Drift the shoppers into simulator day `day` and draw its sessions, in start-time order. Depends
    only on (seed, shopper, day) and the shoppers' state, never on what a strategy showed them."""
    sessions = []
    for position, state in enumerate(states):
        rng = np.random.default_rng([seed, ORGANIC_STREAM, state.index, day])
        drift_tastes(view, state.shopper, rng)
        state.utility = shopper_utilities(view, state.shopper, state.brand_affinity)
        state.interest = type_interest(view, state.shopper)
        for _ in range(rng.poisson(state.shopper.sessions_per_day)):
            start = START_TS + day * 86_400 + rng.uniform(0, 80_000)
            offset, organic = 0.0, []
            for kind, pid, query in organic_session(view, state.shopper, state.utility, rng):
                offset += rng.exponential(20.0)
                organic.append((kind, pid, query, offset))
            sessions.append(PlannedSession(position, start, organic))
    sessions.sort(key=lambda s: (s.start, s.shopper))
    return sessions


# ---- reactions --------------------------------------------------------------------------------------
def type_interest(view: CatalogView, shopper: Shopper) -> np.ndarray:
    """(n_products,) log(P(a visit's intent is the product's article type) * n), clipped at -3, n the
    shopper's eligible article types: the simulator's intent model (`organic_session`: a favourite
    type with 1 - EXPLORE_PROBABILITY, else a uniform eligible type) against a uniform intent. With 4
    favourites among n = 60 types: log(0.8 / 4 * 60 + 0.2) = +2.5 for a favourite type, log(0.2) = -1.6
    otherwise."""
    eligible = np.unique(view.article[view.eligible(shopper.gender)])
    p_intent = np.zeros(len(view.article_names))
    favourites = np.searchsorted(view.article_names, shopper.article_types)
    explore = EXPLORE_PROBABILITY if len(favourites) else 1.0
    p_intent[eligible] = explore / len(eligible)
    np.add.at(p_intent, favourites, (1.0 - explore) / max(1, len(favourites)))
    with np.errstate(divide="ignore"):
        term = np.clip(np.log(p_intent * len(eligible)), -3.0, None)
    return term[view.article]


def slate_utility(state: SimShopper, reaction: ReactionConfig) -> np.ndarray:
    """(n_products,) the utility a shown product's click probability reads: taste + type interest."""
    if state.interest is None or reaction.type_interest == 0:
        return state.utility
    return state.utility + reaction.type_interest * state.interest


def position_bias(positions: np.ndarray) -> np.ndarray:
    """Chance a shopper looks at slate position i (0 = top): 1 / log2(i + 2), the DCG discount."""
    return 1.0 / np.log2(np.asarray(positions, dtype=np.float64) + 2.0)


def click_probabilities(
    utilities: np.ndarray, click_offset: float = 1.0, positions: np.ndarray | None = None
) -> np.ndarray:
    """(n,) utilities of a slate's items, top first -> P(click) per position; -inf (ineligible) -> 0.
    `positions`: each item's own slate position instead (slots of different slates)."""
    utilities = np.asarray(utilities, dtype=np.float64)
    finite = np.isfinite(utilities)
    interest = np.zeros(len(utilities))
    interest[finite] = 1.0 / (1.0 + np.exp(-(utilities[finite] - click_offset)))
    return interest * position_bias(np.arange(len(utilities)) if positions is None else positions)


@dataclass(frozen=True)
class Reaction:
    """What a shopper did with one slate item they clicked."""

    product_id: str
    types: tuple[str, ...]  # ("click",), ("click", "cart") or ("click", "cart", "purchase")
    open_similar: bool  # went on to that product's similar items


def react(
    slate: Sequence[str],
    utility: np.ndarray,
    row_of: dict[str, int],
    in_stock: np.ndarray,
    rng: np.random.Generator,
    reaction: ReactionConfig,
) -> list[Reaction]:
    """The shopper's clicks (and carts, purchases) on a slate, top first. A product the simulator does
    not know is never clicked. Draws four numbers per slate position whatever happens, so the
    generator's state after a slate depends only on its length."""
    rows = [row_of.get(pid) for pid in slate]
    utilities = np.array([utility[r] if r is not None else -np.inf for r in rows])
    p_click = click_probabilities(utilities, reaction.click_offset)
    draws = rng.random((len(slate), 4))  # (positions, [click, cart, purchase, similar])
    out = []
    for i, pid in enumerate(slate):
        if draws[i, 0] >= p_click[i]:
            continue
        types: tuple[str, ...] = ("click",)
        if draws[i, 1] < CART_PROBABILITY:
            types += ("cart",)
            if in_stock[rows[i]] and draws[i, 2] < PURCHASE_PROBABILITY:
                types += ("purchase",)
        out.append(Reaction(pid, types, bool(draws[i, 3] < reaction.similar_probability)))
    return out


# ---- metrics ----------------------------------------------------------------------------------------
@dataclass
class SlateStats:
    """Counts over a day's slates of one kind."""

    slates: int = 0
    impressions: int = 0
    clicks: int = 0
    carts: int = 0
    purchases: int = 0
    exposure: Counter = field(default_factory=Counter)  # product id -> times shown
    served_by: Counter = field(default_factory=Counter)  # response model_version -> slates

    def shown(self, slate: Sequence[str], model_version: str) -> None:
        self.slates += 1
        self.impressions += len(slate)
        self.exposure.update(slate)
        self.served_by[model_version] += 1

    def reacted(self, reactions: Sequence[Reaction]) -> None:
        for r in reactions:
            self.clicks += 1
            self.carts += "cart" in r.types
            self.purchases += "purchase" in r.types


def day_row(strategy: str, day: int, slates: SlateStats, similar: SlateStats, catalog_size: int) -> dict:
    """One simulate_loop.json row (training.report's format) plus counts for the day."""
    ctr, ctr_low, ctr_high = rate_interval(slates.clicks, slates.impressions)
    return {
        "strategy": strategy,
        "day": day,
        "ctr": round(ctr, 5),
        "cvr": round(slates.purchases / slates.impressions, 5) if slates.impressions else 0.0,
        "coverage": round(coverage(slates.exposure, catalog_size), 5),
        "gini": round(exposure_gini(slates.exposure, catalog_size), 5),
        "ctr_low": round(ctr_low, 5),
        "ctr_high": round(ctr_high, 5),
        "slates": slates.slates,
        "impressions": slates.impressions,
        "clicks": slates.clicks,
        "carts": slates.carts,
        "purchases": slates.purchases,
        "purchases_per_click": round(slates.purchases / slates.clicks, 5) if slates.clicks else 0.0,
        "similar_impressions": similar.impressions,
        "similar_clicks": similar.clicks,
        "similar_ctr": round(similar.clicks / similar.impressions, 5) if similar.impressions else 0.0,
        "served_by": dict(slates.served_by.most_common()),
    }


# ---- the HTTP side ----------------------------------------------------------------------------------
class ShopClient:
    """The few API calls a simulated shopper makes, over HTTP; errors name the route and the answer."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout_s: float = 60.0, http: httpx.Client | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        # `http`: an httpx client of one's own (FastAPI's TestClient is one: the app in this process).
        self.http = http or httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ShopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise LoopError(
                f"{response.request.method} {response.request.url} answered {response.status_code}: "
                f"{response.text[:500]}"
            )
        return response.json()

    def get(self, path: str, **params: object) -> dict:
        return self._check(self.http.get(path, params=params))

    def slate(self, strategy: str, user_id: str, k: int) -> dict:
        """What the strategy shows a shopper who opens the shop: the popular grid or their feed."""
        if strategy == "popularity":
            return self.get("/catalog/popular", k=k)
        return self.get(f"/users/{user_id}/feed", k=k)

    def post_events(self, events: Sequence[Event]) -> int:
        """Post in batches; returns how many the server had already (duplicates by event_id)."""
        duplicates = 0
        for start in range(0, len(events), EVENTS_PER_POST):
            batch = [e.to_dict() for e in events[start : start + EVENTS_PER_POST]]
            duplicates += self._check(self.http.post("/events", json={"events": batch}))["duplicates"]
        return duplicates

    def model_versions(self) -> dict:
        return self.get("/healthz").get("model_versions", {})

    def wait_healthy(self, timeout_s: float, alive: Callable[[], str | None] = lambda: None) -> dict:
        """/healthz once it answers; `alive()` returns why the server is gone (then stop waiting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            gone = alive()
            if gone:
                raise LoopError(gone)
            try:
                return self.get("/healthz")
            except (httpx.TransportError, LoopError):
                if time.monotonic() > deadline:
                    raise LoopError(f"{self.url}/healthz did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.25)

    def wait_for_model(self, version: str, behavior_encoder: str, timeout_s: float) -> float:
        """Seconds until the server reports `version` as its user encoder (`user_encoder_version`;
        servers without that key: the behavior space id of the model's item vectors)."""
        started = time.monotonic()
        while True:
            versions = self.model_versions()
            if "user_encoder_version" in versions:
                if versions["user_encoder_version"] == version:
                    return time.monotonic() - started
            elif versions.get("user_encoder") == behavior_encoder:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                serving = versions.get("user_encoder_version", versions.get("user_encoder"))
                raise LoopError(
                    f"{self.url} still serves {serving!r} "
                    f"{timeout_s:.0f} s after model {version} went live in its registry; the server must "
                    "follow DATA_DIR/models/registry/LIVE without a restart (GET /healthz model_versions."
                    "user_encoder_version); check its log, or raise --swap-timeout"
                )
            time.sleep(0.25)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`shopguide serve --no-ray --no-api-key` on a data dir copy, on a free localhost port; stopped with
    SIGTERM (then killed after 30 s). Its output goes to DATA_DIR/server.log."""

    def __init__(
        self, data_dir: Path, start_timeout_s: float = 180.0, explore_policy: str = "greedy"
    ) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        command = [sys.executable, "-m", "serving.cli", "serve", "--no-ray", "--no-api-key",
                   "--data-dir", str(data_dir), "--port", str(self.port),
                   "--explore-policy", explore_policy]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with ShopClient(self.url) as client:
                client.wait_healthy(start_timeout_s, self._gone)
        except BaseException:
            self.stop()
            raise

    def _gone(self) -> str | None:
        if self.process.poll() is None:
            return None
        tail = self.log_path.read_text(errors="replace")[-2000:]
        return f"`shopguide serve` on {self.data_dir} exited with {self.process.returncode}:\n{tail}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- setup ------------------------------------------------------------------------------------------
def products_from_index(data_dir: Path) -> list[Product]:
    """The products of DATA_DIR's live collection, as the simulator's catalog (payloads: what the
    server serves, prices and stock included), in id order."""
    from index import IndexInUseError, open_store

    try:
        store = open_store(data_dir / "index")
    except IndexInUseError as exc:
        raise LoopError(
            f"{exc}; stop the `shopguide serve` that owns {data_dir}/index, or pass --url to drive it"
        ) from None
    try:
        index = store.open(ALIAS)
        ids = sorted(index.product_ids())
        records = [r for start in range(0, len(ids), 2048) for r in index.get(ids[start : start + 2048])]
    finally:
        store.close()
    return [_product(r.product_id, r.payload) for r in records]


def products_over_http(client: ShopClient, catalog: Path) -> list[Product]:
    """The products a running server indexes: the first N usable products of `catalog` (N from
    /healthz, as `shopguide ingest --limit N` took them), each checked and read with GET /products/ID."""
    count = int(client.get("/healthz")["products"])
    products = []
    for product in load_catalog(catalog, limit=count).products:
        response = client.http.get(f"/products/{product.id}")
        if response.status_code == 404:
            raise LoopError(
                f"product {product.id} of {catalog} (first {count}) is not on the server at {client.url}; "
                "pass the --catalog it ingested"
            )
        products.append(_product(product.id, client._check(response)))
    return sorted(products, key=lambda p: p.id)


def _product(product_id: str, payload: dict) -> Product:
    return Product(
        product_id, payload.get("title") or product_id, Path(), float(payload.get("price") or 0.0),
        bool(payload.get("in_stock", True)), **{n: payload.get(n) for n in ATTRIBUTE_COLUMNS},
    )  # fmt: skip


# Top-level entries of a data dir that are not copied into the loop's base: events, models and caches
# belong to the source data dir; the loop brings its own.
_NOT_COPIED = {"cache", "events", "events.db", "events.db-wal", "events.db-shm", "loop", "server.log"}
_MODELS_NOT_COPIED = {"sequence", "registry"}


def _copy_index(data_dir: Path, target: Path, work_dir: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).resolve()
        skip = {n for n in names if (here / n) == work_dir.resolve()}
        if here == data_dir.resolve():
            skip |= _NOT_COPIED & set(names)
        elif here == (data_dir / "models").resolve():
            skip |= _MODELS_NOT_COPIED & set(names)
        return skip

    shutil.copytree(data_dir, target, ignore=ignore)


@dataclass
class Base:
    """The starting state every strategy copies: index, day-0 model, warm-up events, shoppers."""

    folder: Path  # WORK/base (default mode) or the server's data dir (--url)
    day0: str  # the day-0 model's registry version
    behavior_encoder: str  # its behavior space id (servers without user_encoder_version report this)
    view: CatalogView
    warmup: list[Event]
    shoppers: list[SimShopper]
    day0_summary: dict


def _behavior_encoder(registry: ModelRegistry, version: str) -> str:
    from training.behavior import behavior_space

    return behavior_space(SequenceEncoder.load(registry.path(version))).encoder


@contextlib.contextmanager
def _training_output(train_log: Path | None, title: str) -> Iterator[None]:
    """Training's per-epoch lines go to `train_log` (appended), not the loop's own output."""
    if train_log is None:
        yield
        return
    train_log.parent.mkdir(parents=True, exist_ok=True)
    with train_log.open("a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        print(f"--- {title}")
        yield


def _train_day0(
    registry: ModelRegistry,
    warmup: list[Event],
    config: LoopConfig,
    force: bool = False,
    train_log: Path | None = None,
) -> dict:
    """A full GRU on the warm-up events, registered and promoted (gated like any update; `force` for
    a registry that already has a live model of its own, --url)."""
    with _training_output(train_log, f"day-0 full update on {len(warmup)} warm-up events"):
        summary = run_update(warmup, registry, "full", model_config=config.model, train_config=config.train)
    holdout = holdout_histories(warmup, config.holdout_days)
    result = registry.promote(summary["version"], lambda f: holdout_metrics(f, holdout), force=force)
    if not result.promoted:
        raise LoopError(f"the day-0 model {summary['version']} was not promoted: {result.reason}")
    return summary


def prepare_base(
    data_dir: Path,
    work_dir: Path,
    config: LoopConfig,
    catalog: Path | None = None,
    limit: int | None = 2000,
    log: Callable[[str], None] = print,
) -> Base:
    """WORK/base: DATA_DIR's index (ingested first when missing) and the day-0 model, reused while the
    collection, shoppers and model config are unchanged; plus the warm-up events and shopper states."""
    if not (data_dir / MANIFEST).is_file():
        from index import open_store
        from training.catalog import DEFAULT_CATALOG
        from training.ingest import run_ingest

        log(f"no index in {data_dir}: ingesting {catalog or DEFAULT_CATALOG} (--limit {limit})")
        store = open_store(data_dir / "index")
        try:
            run_ingest(catalog or DEFAULT_CATALOG, store, data_dir, limit=limit)
        finally:
            store.close()
    products = products_from_index(data_dir)
    view = CatalogView(products)
    warmup, shoppers = warm_up(view, config.shoppers, config.warmup_days, config.seed)
    base = work_dir / "base"
    payloads = [(p.id, p.price, p.in_stock) for p in products]  # a price or stock change rebuilds the base
    key = {
        "collection": json.loads((data_dir / MANIFEST).read_text())["collection"],
        "products": len(products),
        "payloads": hashlib.sha256(json.dumps(payloads).encode()).hexdigest()[:16],
        "shoppers": config.shoppers,
        "warmup_days": config.warmup_days,
        "seed": config.seed,
        "warmup_events": len(warmup),
        "model": asdict(config.model),
        "train": asdict(config.train),
    }
    setup_path = base / "setup.json"
    setup = json.loads(setup_path.read_text()) if setup_path.is_file() else {}
    if setup.get("key") == key:
        log(f"reusing {base} (day-0 model {setup['day0']['version']})")
    else:
        shutil.rmtree(base, ignore_errors=True)
        base.parent.mkdir(parents=True, exist_ok=True)
        _copy_index(data_dir, base, work_dir)
        write_events(warmup, base / "warmup.jsonl")  # `shopguide train update --events` reads it too
        log(f"training the day-0 model on {len(warmup)} warm-up events of {config.shoppers} shoppers")
        registry = ModelRegistry(base / "models" / "registry")
        day0_summary = _train_day0(registry, warmup, config, train_log=base / "train.log")
        setup = {"key": key, "day0": day0_summary}
        setup_path.write_text(json.dumps(setup, indent=1))  # written last: a base without it is rebuilt
    registry = ModelRegistry(base / "models" / "registry")
    day0 = registry.live()
    return Base(base, day0, _behavior_encoder(registry, day0), view, warmup, shoppers, setup["day0"])


def prepare_remote(
    client: ShopClient,
    data_dir: Path,
    config: LoopConfig,
    catalog: Path | None,
    train_log: Path | None = None,
) -> Base:
    """--url: the running server's products, the warm-up events posted to it, the day-0 model trained
    into DATA_DIR's registry (the server's) and forced live."""
    manifest = json.loads((data_dir / MANIFEST).read_text()) if (data_dir / MANIFEST).is_file() else {}
    catalog = catalog or (Path(manifest["catalog"]) if manifest.get("catalog") else None)
    if catalog is None:
        raise LoopError(f"no catalog known for {data_dir}: pass --catalog (the one the server ingested)")
    view = CatalogView(products_over_http(client, catalog))
    warmup, shoppers = warm_up(view, config.shoppers, config.warmup_days, config.seed)
    registry = ModelRegistry(data_dir / "models" / "registry")
    summary = _train_day0(registry, warmup, config, force=True, train_log=train_log)
    day0 = registry.live()
    return Base(data_dir, day0, _behavior_encoder(registry, day0), view, warmup, shoppers, summary)


# ---- one strategy -----------------------------------------------------------------------------------
def update_with_log(
    events: Sequence[Event],
    registry: ModelRegistry,
    strategy: str,
    config: LoopConfig,
    train_log: Path | None = None,
) -> dict:
    """`train update --strategy X --promote` (training.update.update_and_promote), its per-epoch lines
    appended to `train_log`; an update that cannot run (too few events) is reported as skipped."""
    started = time.perf_counter()
    with _training_output(train_log, f"{strategy} update on {len(events)} events"):
        try:
            return update_and_promote(
                events, registry, strategy, config.tolerance, config.holdout_days, config.model, config.train
            )
        except ValueError as exc:  # e.g. no recent shopper with enough events to fine-tune on
            return {"ran": "skipped", "reason": str(exc), "promoted": False,
                    "train_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def play_session(
    client: ShopClient,
    strategy: str,
    state: SimShopper,
    session: PlannedSession,
    view: CatalogView,
    row_of: dict[str, int],
    rng: np.random.Generator,
    reaction: ReactionConfig,
    stats: tuple[SlateStats, SlateStats],
    contexts: dict[str, np.ndarray] | None = None,
) -> list[tuple[str, str | None, str | None, str | None, float]]:
    """One visit over HTTP: the strategy's slate and the reactions to it (similar items included),
    then the organic browsing; returns (type, product, query, request_id, ts) in time order.
    `contexts` gets request_id -> the click utilities the feed's slate was judged by."""
    main, similar = stats
    utility = slate_utility(state, reaction)
    out: list[tuple[str, str | None, str | None, str | None, float]] = []
    ts = session.start
    response = client.slate(strategy, state.shopper.user_id, reaction.k)
    slate = [item["product_id"] for item in response["items"]]
    main.shown(slate, response.get("model_version", "?"))
    if contexts is not None:
        contexts[response["request_id"]] = utility.astype(np.float32)
    reactions = react(slate, utility, row_of, view.in_stock, rng, reaction)
    main.reacted(reactions)
    for r in reactions:
        for kind in r.types:
            ts += EVENT_GAP_S
            out.append((kind, r.product_id, None, response["request_id"], ts))
        if not r.open_similar:
            continue
        more = client.get(f"/products/{r.product_id}/similar", k=reaction.k)
        more_slate = [item["product_id"] for item in more["items"]]
        similar.shown(more_slate, more.get("model_version", "?"))
        more_reactions = react(more_slate, utility, row_of, view.in_stock, rng, reaction)
        similar.reacted(more_reactions)
        for m in more_reactions:  # one level deep: similar items of similar items are not opened
            for kind in m.types:
                ts += EVENT_GAP_S
                out.append((kind, m.product_id, None, more["request_id"], ts))
    out.extend((kind, pid, query, None, ts + offset) for kind, pid, query, offset in session.organic)
    return out


def run_day(
    client: ShopClient,
    strategy: str,
    base: Base,
    states: list[SimShopper],
    sessions: list[PlannedSession],
    day: int,
    config: LoopConfig,
    run_id: str,
    contexts: dict[str, np.ndarray] | None = None,
) -> tuple[SlateStats, SlateStats, list[Event]]:
    """Play one day's sessions against the server, each posted as it ends; returns (strategy slates,
    similar slates, the events posted). `contexts`: as for `play_session`."""
    row_of = {pid: i for i, pid in enumerate(base.view.ids)}
    rngs = {s.index: np.random.default_rng([config.seed, REACTION_STREAM, s.index, day]) for s in states}
    stats = (SlateStats(), SlateStats())
    posted: list[Event] = []
    counters: Counter = Counter()
    for session in sessions:
        state = states[session.shopper]
        user = state.shopper.user_id
        actions = play_session(
            client,
            strategy,
            state,
            session,
            base.view,
            row_of,
            rngs[state.index],
            config.reaction,
            stats,
            contexts,
        )
        events = []
        for kind, pid, query, request_id, ts in actions:
            counters[user] += 1
            event_id = f"loop-{run_id}-{user}-{day}-{counters[user]}"
            events.append(Event(event_id, user, pid, kind, query, request_id, round(ts, 3)))
        if events:
            client.post_events(events)
            posted.extend(events)
    return stats[0], stats[1], posted


def run_strategy(
    client: ShopClient,
    registry: ModelRegistry,
    strategy: str,
    base: Base,
    config: LoopConfig,
    log: Callable[[str], None] = print,
    train_log: Path | None = None,
    events_db: Path | None = None,
) -> tuple[list[dict], dict, dict | None]:
    """The warm-up events posted, then `config.days` days with updates after each (learning
    strategies); returns the rows, a training summary for the strategy and, when the feed explores
    (`config.explore_policy`), the off-policy check on the server's feed log `events_db`
    (`offpolicy_check`). `train_log` gets the updates' per-epoch lines."""
    checked = config.explore_policy != "greedy" and strategy != "popularity" and events_db is not None
    contexts: dict[str, np.ndarray] | None = {} if checked else None
    run_id = uuid.uuid4().hex[:8]  # event ids stay unique if a server (--url) sees several runs
    client.post_events(base.warmup)
    client.wait_for_model(base.day0, base.behavior_encoder, config.swap_timeout_s)
    states = copy.deepcopy(base.shoppers)
    events = list(base.warmup)
    catalog_size = len(base.view.ids)
    rows, updates = [], []
    for day in range(config.days):
        calendar_day = config.warmup_days + day
        sessions = plan_day(base.view, states, calendar_day, config.seed)
        served = client.model_versions()
        started = time.perf_counter()
        main, similar, posted = run_day(
            client, strategy, base, states, sessions, calendar_day, config, run_id, contexts
        )
        events.extend(posted)
        row = day_row(strategy, day, main, similar, catalog_size)
        row["model"] = served.get("user_encoder_version", served.get("user_encoder", "?"))
        row["events"] = len(posted)
        row["http_seconds"] = round(time.perf_counter() - started, 2)
        row["train_seconds"] = 0.0
        note = ""
        if strategy in UPDATE_STRATEGIES and day < config.days - 1:
            update = update_with_log(events, registry, strategy, config, train_log)
            if update["promoted"]:
                update["swap_seconds"] = round(
                    client.wait_for_model(
                        update["version"],
                        _behavior_encoder(registry, update["version"]),
                        config.swap_timeout_s,
                    ),
                    2,
                )
            updates.append({"day": day, **update})
            row.update(
                train_seconds=update["train_seconds"], update=update["ran"], promoted=update["promoted"],
                swap_seconds=update.get("swap_seconds", 0.0),
            )  # fmt: skip
            note = f"; update {update['ran']} {update['train_seconds']:.1f} s, " + (
                "promoted" if update["promoted"] else f"not promoted ({update.get('gate', update['reason'])})"
            )
        rows.append(row)
        log(
            f"{strategy} day {day}: CTR {row['ctr']:.4f} CVR {row['cvr']:.4f} coverage {row['coverage']:.4f} "
            f"gini {row['gini']:.3f} ({row['impressions']} impressions, {row['events']} events, "
            f"{row['http_seconds']:.1f} s){note}"
        )
    training = {
        "train_seconds": round(sum(u["train_seconds"] for u in updates), 2),
        "updates": len([u for u in updates if u["ran"] != "skipped"]),
        "promoted": len([u for u in updates if u["promoted"]]),
        "ran": dict(Counter(u["ran"] for u in updates)),
        "per_day": updates,
    }
    check = None
    if contexts is not None and events_db is not None:
        check = offpolicy_check(events_db, contexts, base.view.ids, config.reaction.click_offset)
        log(format_offpolicy(strategy, check))
    return rows, training, check


def offpolicy_check(
    events_db: Path, contexts: dict[str, np.ndarray], product_ids: Sequence[str], click_offset: float = 1.0
) -> dict:
    """IPS / SNIPS estimates from the server's feed log beside the simulator's true CTRs on the same
    logged requests. `contexts`: request_id -> the click utilities (n_products,) its shopper had then.

    The click model is per slot (a slot's click depends only on its item and position), so the true
    CTR of a policy on the logged requests is the mean over slots of P(click | the item that policy
    puts in that slot, position): the logged greedy item for "greedy", the shown item for "logging".
    Returns {"policy", "slots", "greedy": estimate + "true_ctr" + "in_ips_interval" +
    "in_snips_interval", "logging": the same}."""
    from serving.event_store import SQLiteEventStore

    row_of = {pid: i for i, pid in enumerate(product_ids)}
    with SQLiteEventStore(events_db) as store:
        slots = [r for r in store.feed_items() if r.request_id in contexts]
    if not slots:
        raise LoopError(f"{events_db}: no logged feed slot of this run (is the server logging its feeds?)")

    def true_ctr(pick: Callable) -> float:
        utilities = np.array(
            [contexts[r.request_id][row_of[pick(r)]] if pick(r) in row_of else -np.inf for r in slots]
        )
        positions = np.array([r.position for r in slots])
        return float(click_probabilities(utilities, click_offset, positions).mean())

    out: dict = {"policy": slots[0].policy, "slots": len(slots)}
    for target, pick in (("greedy", lambda r: r.greedy_product_id), ("logging", lambda r: r.product_id)):
        estimate = offpolicy_estimate(slots, target)
        truth = true_ctr(pick)
        estimate["true_ctr"] = truth
        for name in ("ips", "snips"):
            low, high = estimate[f"{name}_low"], estimate[f"{name}_high"]
            estimate[f"in_{name}_interval"] = low is not None and low <= truth <= high
        out[target] = estimate
    return out


def format_offpolicy(strategy: str, check: dict) -> str:
    """One line per target policy: true CTR against the IPS and SNIPS estimates and their intervals."""
    lines = [f"{strategy}: off-policy check on {check['slots']} slots logged under {check['policy']}"]
    for target in ("greedy", "logging"):
        e = check[target]
        verdict = {name: "inside" if e[f"in_{name}_interval"] else "OUTSIDE" for name in ("ips", "snips")}
        lines.append(
            f"  {target:<8} true CTR {e['true_ctr']:.4f}  IPS {e['ips']:.4f} [{e['ips_low']:.4f}, "
            f"{e['ips_high']:.4f}] {verdict['ips']}  SNIPS {e['snips']:.4f} "
            f"[{e['snips_low']:.4f}, {e['snips_high']:.4f}] {verdict['snips']}"
        )
    return "\n".join(lines)


# ---- the whole run ----------------------------------------------------------------------------------
def run_loop(
    config: LoopConfig,
    data_dir: Path,
    work_dir: Path | None = None,
    url: str | None = None,
    api_key: str | None = None,
    catalog: Path | None = None,
    limit: int | None = 2000,
    log: Callable[[str], None] = print,
) -> dict:
    """Every strategy of `config` on identical shoppers; returns {"rows", "training", metadata}."""
    config.validate()
    started = time.perf_counter()
    rows: list[dict] = []
    training: dict[str, dict] = {}
    offpolicy: dict[str, dict] = {}
    if url is not None:
        if len(config.strategies) != 1:
            raise ValueError(f"--url drives one running server: give one --strategy, not {config.strategies}")
        train_log = (work_dir or data_dir / "loop") / "train.log"
        with ShopClient(url, api_key) as client:
            client.wait_healthy(30.0)
            base = prepare_remote(client, data_dir, config, catalog, train_log)
            registry = ModelRegistry(data_dir / "models" / "registry")
            strategy = config.strategies[0]
            rows, training[strategy], check = run_strategy(
                client, registry, strategy, base, config, log, train_log, data_dir / "events.db"
            )
            if check is not None:
                offpolicy[strategy] = check
    else:
        work_dir = work_dir or data_dir / "loop"
        base = prepare_base(data_dir, work_dir, config, catalog, limit, log)
        for strategy in config.strategies:
            folder = work_dir / strategy
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base.folder, folder)
            log(f"{strategy}: starting `shopguide serve --no-ray` on {folder}")
            with (
                ServerProcess(folder, config.start_timeout_s, config.explore_policy) as server,
                ShopClient(server.url) as client,
            ):
                registry = ModelRegistry(folder / "models" / "registry")
                strategy_rows, training[strategy], check = run_strategy(
                    client, registry, strategy, base, config, log, folder / "train.log", folder / "events.db"
                )
            rows.extend(strategy_rows)
            if check is not None:
                offpolicy[strategy] = check
    return {
        "seed": config.seed,
        "shoppers": config.shoppers,
        "days": config.days,
        "warmup_days": config.warmup_days,
        "products": len(base.view.ids),
        "warmup_events": len(base.warmup),
        "k": config.reaction.k,
        "position_bias": "1/log2(position+2)",
        "type_interest": config.reaction.type_interest,
        "explore_policy": config.explore_policy,
        "day0_model": base.day0,
        "day0_train_seconds": base.day0_summary.get("seconds"),
        "server": url or "shopguide serve --no-ray (one per strategy)",
        "seconds": round(time.perf_counter() - started, 1),
        "training": training,
        "targets": targets(rows),
        "offpolicy": offpolicy,
        "rows": rows,
    }


def targets(rows: Sequence[dict]) -> dict:
    """The issue's targets on the last day: hybrid CTR >= 2x popularity's, and above no-update's."""
    last = max((r["day"] for r in rows), default=0)
    ctr = {r["strategy"]: r["ctr"] for r in rows if r["day"] == last}
    out: dict = {"day": last, "ctr": ctr}
    if "hybrid" in ctr and "popularity" in ctr:
        out["hybrid_vs_popularity"] = (
            round(ctr["hybrid"] / ctr["popularity"], 3) if ctr["popularity"] else None
        )
        out["hybrid_at_least_2x_popularity"] = ctr["hybrid"] >= 2 * ctr["popularity"]
    if "hybrid" in ctr and "none" in ctr:
        out["hybrid_above_none"] = ctr["hybrid"] > ctr["none"]
    return out


def format_table(result: dict) -> str:
    """The per-day table, then per strategy: mean metrics and training cost."""
    lines = [
        f"{'strategy':<12}{'day':>4}{'CTR':>9}{'CVR':>9}{'coverage':>10}{'gini':>8}{'train s':>9}  update"
    ]
    for r in result["rows"]:
        update = r.get("update", "")
        if update:
            update += "" if r.get("promoted") else " (not promoted)"
        lines.append(
            f"{r['strategy']:<12}{r['day']:>4}{r['ctr']:>9.4f}{r['cvr']:>9.4f}{r['coverage']:>10.4f}"
            f"{r['gini']:>8.3f}{r.get('train_seconds', 0.0):>9.1f}  {update}"
        )
    lines.append("")
    lines.append(
        f"{'strategy':<12}{'mean CTR':>10}{'mean CVR':>10}{'coverage':>10}{'gini':>8}{'train s total':>15}"
    )
    for strategy, training in result["training"].items():
        mine = [r for r in result["rows"] if r["strategy"] == strategy]
        mean = {m: float(np.mean([r[m] for r in mine])) for m in ("ctr", "cvr", "coverage", "gini")}
        lines.append(
            f"{strategy:<12}{mean['ctr']:>10.4f}{mean['cvr']:>10.4f}{mean['coverage']:>10.4f}{mean['gini']:>8.3f}"
            f"{training['train_seconds']:>15.1f}"
        )
    t = result["targets"]
    if "hybrid_vs_popularity" in t:
        verdict = "met" if t["hybrid_at_least_2x_popularity"] else "NOT met"
        line = (
            f"\nday {t['day']}: hybrid CTR {t['ctr']['hybrid']:.4f} = {t['hybrid_vs_popularity']}x "
            f"popularity's {t['ctr']['popularity']:.4f} (target >= 2x: {verdict})"
        )
        if "hybrid_above_none" in t:
            line += (
                f"; none {t['ctr']['none']:.4f} (hybrid above: {'yes' if t['hybrid_above_none'] else 'NO'})"
            )
        lines.append(line)
    for strategy, check in result.get("offpolicy", {}).items():
        lines.append(format_offpolicy(strategy, check))
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> tuple[Path, Path]:
    """results/simulate_loop.json (training.report's format, checked) and a PNG of the curves beside it."""
    from training.report import _loop_plot, write_simulate_loop

    metadata = {k: v for k, v in result.items() if k != "rows"}
    path = write_simulate_loop(out, result["rows"], **metadata)
    strategies = list(dict.fromkeys(r["strategy"] for r in result["rows"]))
    _loop_plot(result["rows"], strategies, out.parent)  # writes OUT_FOLDER/simulator_curves.png
    return path, out.parent / "simulator_curves.png"

"""Recommendation logic as plain functions over the index and the event store (no Ray, no HTTP).

Every method returns JSON-ready dicts, so the same object serves the FastAPI app directly (tests, a
single process) and inside a Ray Serve deployment.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.alignment import AlignmentHeads
from index import KEYWORD_FIELDS, Filters, Hit, IndexStore
from serving.affinity import AFFINITY_FIELDS, AttributePrior, HistoryAffinity
from serving.event_store import EventStore, Impression
from serving.explore import ExploreSettings, explore_and_log
from serving.live import ModelSlot, SwapGuard, ab_arm, wanted_models
from serving.search import MODES, check_k, load_heads_for
from training.behavior import is_behavior_space, upsert_behavior_vectors
from training.events import Event, EventError
from training.ingest import ALIAS, MANIFEST
from training.overrides import OverrideStore, OverrideStoreError, apply_overrides
from training.reembed import collection_manifest

log = logging.getLogger(__name__)
# How often a running server looks for products added to the collection without a behavior vector
# (a count, then a scan of ids when it changed); model and alias changes are checked every poll.
COVERAGE_CHECK_S = 30.0

SIMILAR_MODES = (*MODES, "behavior")
FUSED = ("fused",)  # `index.get(..., with_vectors=FUSED)`: the feed reads only these vectors
DIVERSITY_SPACE = "fused"  # diversity is judged on look + description, what a shopper perceives as "samey"
FEED_WEIGHTS = {"view": 1.0, "click": 2.0, "cart": 4.0, "purchase": 4.0}  # content profile and affinity
# Per-event decay of the history weights: the content profile follows the last few events (what the
# shopper looks at now), attribute affinity a longer stretch (which types and colours they come back to).
PROFILE_DECAY, AFFINITY_DECAY = 0.85, 0.95
VERBS = {"view": "viewed", "click": "clicked", "cart": "added to your cart", "purchase": "bought"}
MODE_REASON = {
    "fused": "looks and reads like",
    "image": "looks like",
    "text": "described like",
    "behavior": "shoppers who engaged with it also engaged with",
}
FILLED = "filled: not enough matches"
TASTE_REASON = "you often browse: "  # + the item's attribute values the shopper's history favours
# A product the user encoder never saw, placed in its behavior space by its content (cold start).
MAPPED = "new: placed by its photo and description (no shopper data yet)"
USER_CACHE_SIZE = 100_000
# Product page modules in their default order, with the engagement per impression assumed before any
# evidence (a weak prior, worth `page_prior_strength` impressions). The default order is the priors'.
PAGE_MODULES = {
    "similar": ("Similar items", 0.3),
    "for_you": ("For you", 0.2),
    "bought_together": ("Frequently bought together", 0.1),
}
BOUGHT_TYPES = ("cart", "purchase")  # co-occurrence in these is "bought together"; views are browsing


class BadRequestError(ValueError):
    """Input a caller can fix (an unknown filter value, a bad mode, an unknown product in an event)."""


class UnavailableError(RuntimeError):
    """A moment the request cannot be served but a retry shortly will be (503 with Retry-After)."""


class NotFoundError(KeyError):
    """A product or user the request names does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass
class RecommenderConfig:
    """Live knobs of the recommender (YAML `user_config`, changeable without a restart)."""

    candidates_per_item: int = 4  # diversity re-ranks this many candidates per requested item
    feed_history: int = 50  # most recent events the feed reads (the GRU's max_len caps it too)
    exclude_seen: bool = True  # the feed leaves out products already in the history window
    # The feed re-ranks the GRU's top candidates (max(feed_pool_per_item * k, 50) of them) by
    # z(GRU score) + content_weight * z(cosine to the history's content profile)
    # + affinity_weight * attribute affinity (serving/affinity.py: the summed log-lift of the item's
    # values of `affinity_fields` in the history against the catalog); both weights 0 = the GRU alone.
    # The GRU learns look, colour and type slowly from few events; the photos, titles and attributes of
    # what the shopper browsed carry them from the first event (README: `simulate loop` has the figures).
    content_weight: float = 1.0
    affinity_weight: float = 2.0
    affinity_fields: tuple[str, ...] = AFFINITY_FIELDS
    affinity_prior_strength: float = 2.0  # pseudo-events of the catalog's own mix in each history
    feed_pool_per_item: int = 20
    trending_days: float = 7.0  # cold start: popular over this window, all time if it is empty
    behavior_hnsw_ef: int = 256  # see training.behavior.BEHAVIOR_HNSW_EF
    page_prior_strength: float = 5.0  # `a` of module interest: how many impressions the prior is worth
    page_prior_ttl_s: float = 60.0  # the global module rates (a scan of all impressions) are cached
    # How often a running server checks the registry's live model and the collection alias, and
    # switches to what they point at without a restart (0 = only at start).
    model_poll_s: float = 2.0
    map_new_products: bool = True  # products the GRU never saw get behavior vectors mapped from content
    ab_versions: tuple[str, ...] = ()  # two registry versions to split shoppers between, or none
    ab_split: float = 0.5  # share of shoppers in arm A (ab_versions[0])
    ab_salt: str = "ab-1"  # a new salt reshuffles shoppers between arms for the next experiment
    # Exploration on feed slots (serving/explore.py). Off by default: feeds stay deterministic and every
    # slot is logged with propensity 1; "epsilon:0.05" or "thompson" turn it on (then off-policy
    # evaluation of other epsilons has support in the logs).
    explore_policy: str = "greedy"  # "greedy", "epsilon:E" (0 <= E <= 1) or "thompson"
    explore_alternatives: int = 3  # candidates per slot besides the model's pick
    thompson_samples: int = 1000  # Monte Carlo draws per slot: propensity standard error <= 0.016
    thompson_prior_ctr: float = 0.05  # prior mean click rate of an alternative
    thompson_prior_strength: float = 20.0  # the prior is worth this many impressions
    thompson_model_lift: float = 2.0  # the model's pick starts at this many times the prior mean
    explore_seed: int | None = None  # None: OS entropy per request; an int makes runs reproducible

    @classmethod
    def from_dict(cls, data: dict | None) -> RecommenderConfig:
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"unknown recommender setting(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        data["ab_versions"] = tuple(data.get("ab_versions") or ())
        if "affinity_fields" in data:
            data["affinity_fields"] = tuple(data["affinity_fields"] or ())
        config = cls(**data)
        if len(config.ab_versions) not in (0, 2) or len(set(config.ab_versions)) != len(config.ab_versions):
            raise ValueError(
                f"ab_versions takes two different model versions, got {list(config.ab_versions)}"
            )
        if not 0 < config.ab_split < 1:
            raise ValueError(f"ab_split is the share of shoppers in arm A, in (0, 1); got {config.ab_split}")
        for name in ("content_weight", "affinity_weight", "affinity_prior_strength"):
            if not getattr(config, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
        if config.affinity_prior_strength == 0 and config.affinity_weight > 0:
            raise ValueError("affinity_prior_strength must be > 0 while affinity_weight > 0")
        if not all(isinstance(f, str) and f for f in config.affinity_fields):
            raise ValueError(f"affinity_fields takes payload field names, got {list(config.affinity_fields)}")
        if config.feed_pool_per_item < 1:
            raise ValueError(f"feed_pool_per_item must be >= 1, got {config.feed_pool_per_item}")
        if config.model_poll_s < 0:
            raise ValueError(f"model_poll_s must be >= 0 (0 = never), got {config.model_poll_s}")
        ExploreSettings.from_config(config)  # a bad explore_* / thompson_* setting fails here, not per feed
        return config


@dataclass
class _Pick:
    """One chosen item while a response is assembled."""

    product_id: str
    score: float
    payload: dict
    reasons: list[str] = field(default_factory=list)


def _zscores(values: np.ndarray) -> np.ndarray:
    """(n,) standardized to mean 0 and standard deviation 1 (all zeros when they are all equal)."""
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 0 else np.zeros(len(values))


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998): greedily pick the candidate with the
    best (1 - diversity) * relevance - diversity * max similarity to what is already picked.

    relevance: (n,) scores, rescaled to [0, 1] here so both terms are comparable whatever the space.
    vectors: (n, d) unit rows. Returns candidate positions in pick order (at most k)."""
    n = len(relevance)
    if n == 0:
        return []
    span = float(relevance.max() - relevance.min())
    rel = (relevance - relevance.min()) / span if span > 0 else np.ones(n)
    picked: list[int] = []
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
        gain = (1 - diversity) * rel - diversity * penalty
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, vectors @ vectors[best])
    return picked


def _serving(method):
    """Run a public method under the swap guard: it sees one consistent serving state throughout."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._guard.shared():
            return method(self, *args, **kwargs)

    return guarded


class Recommender:
    """Owns the live collection, the event store and (optionally) the GRU user encoder.

    `refresh()` follows the collection alias (`shopguide reembed`) and the model registry's live version
    (`shopguide models promote|rollback`, `train update --promote`): the new state is prepared beside the
    served one (collection opened, model vectors written to a behavior space of their own) and swapped in
    between requests, so no request fails or sees a mix. `watch()` calls it every `model_poll_s`."""

    def __init__(
        self,
        data_dir: Path,
        store: IndexStore,
        events: EventStore,
        sequence_model: Path | None = None,
        config: RecommenderConfig | None = None,
        registry: Path | None = None,
        overrides: OverrideStore | None = None,
    ) -> None:
        manifest_path = data_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no index in {data_dir}: run `shopguide ingest --data-dir {data_dir}` first"
            )
        self.data_dir = data_dir
        self.store = store
        self.index = store.open(ALIAS)
        # Live price/stock updates, kept across rebuilds (default: DATA_DIR/product_overrides.db).
        self.overrides = overrides or OverrideStore.at(data_dir)
        # Ones the live collection may lack: after an offline `reembed --swap-back`, or a CLI update
        # killed between recording and writing.
        apply_overrides(self.index, self.overrides.values())
        # The live collection's own manifest (written before the alias could point at it), so a crash
        # between a re-embed's alias swap and its ingest.json rewrite cannot mismatch them.
        self.manifest = collection_manifest(data_dir, self.index.name)
        self.catalog_dir = Path(self.manifest["catalog"]) if self.manifest.get("catalog") else None
        self.heads: AlignmentHeads = load_heads_for(data_dir, self.index.spaces["image"].encoder)
        self.events = events
        self.config = config or RecommenderConfig()
        self._lock = threading.Lock()  # index writes and cache updates; searches run concurrently
        self._count = (-1e9, 0)  # (monotonic time, product count): see product_count
        self._user_cache: OrderedDict[str, tuple[tuple, np.ndarray]] = OrderedDict()
        self._module_priors: tuple[float, dict[str, float]] = (-1e9, {})  # (monotonic time, priors)
        self._guard = SwapGuard()
        self._refresh_lock = threading.Lock()  # one refresh at a time (the watcher, or a caller)
        self._sequence_folder = sequence_model
        self._registry_root = registry
        self._models: dict[str, ModelSlot] = {}  # version -> slot: the live model and any A/B arms
        self._live_model: str | None = None
        self._retired_space: str | None = None  # behavior space of the model served before the live one
        self._coverage_count = -1  # product count when the models' coverage of new products was checked
        self._coverage_checked = -1e9  # monotonic time of that check
        self.refresh_error: str | None = None  # why the last refresh failed (serving goes on unchanged)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._vocabulary, self._prior = self._read_catalog_values(self.index)
        self._check_affinity_fields(self.config)
        self.refresh(raise_errors=True)  # a broken model or registry fails at start, not later

    # ---- following the alias and the model registry ------------------------------------------------
    @property
    def sequence(self):
        """The live GRU user encoder, or None (content-based feeds)."""
        slot = self._live_slot()
        return slot.encoder if slot else None

    def _live_slot(self) -> ModelSlot | None:
        return self._models.get(self._live_model) if self._live_model else None

    def _model_for(self, user_id: str) -> tuple[str | None, ModelSlot | None]:
        """(A/B arm or None, the model slot) that serves this shopper."""
        versions = self.config.ab_versions
        if len(versions) == 2 and all(v in self._models for v in versions):
            arm = ab_arm(user_id, self.config.ab_split, self.config.ab_salt)
            return arm, self._models[versions[0] if arm == "A" else versions[1]]
        return None, self._live_slot()

    def refresh(self, raise_errors: bool = False, check_coverage: bool = False) -> dict:
        """Switch to what the alias and the registry point at now; returns what changed ({} if nothing).

        A failure (an unreadable model, a half-written collection) leaves the served state as it was and
        is kept in `refresh_error` (shown by /healthz) unless `raise_errors`."""
        with self._refresh_lock:
            try:
                changes = self._refresh(check_coverage)
            except Exception as exc:
                if raise_errors:
                    raise
                self.refresh_error = f"{type(exc).__name__}: {exc}"
                log.warning("refresh failed, still serving the previous state: %s", self.refresh_error)
                return {}
            self.refresh_error = None
            return changes

    def _refresh(self, check_coverage: bool = False) -> dict:
        target = self.store.get_alias(ALIAS)
        if target is None or target == self.index.name:
            return self._refresh_on(self.index, check_coverage)
        index = self.store.open_collection(target)
        try:
            return self._refresh_on(index, check_coverage)
        except BaseException:
            if index is not self.index:  # not swapped in: each poll would open another copy of it
                index.close()
            raise

    def _refresh_on(self, index, check_coverage: bool) -> dict:
        """Serve `index` (the alias' target, opened; or the served collection) with the registry's models."""
        from encoders.sequence import SequenceEncoder

        changes: dict = {}
        heads, manifest = self.heads, self.manifest
        vocabulary, prior = self._vocabulary, self._prior
        pending: dict[str, dict] = {}
        if index is not self.index:
            # Live price/stock updates the new collection lacks (made after a re-embed wrote it, or
            # since it was last live): written before the swap, so no request sees it without them.
            pending = self.overrides.values()
            apply_overrides(index, pending)
            heads = load_heads_for(self.data_dir, index.spaces["image"].encoder)
            manifest = collection_manifest(self.data_dir, index.name)
            vocabulary, prior = self._read_catalog_values(index)
            changes["collection"] = {"from": self.index.name, "to": index.name}
        live, wanted = wanted_models(self._registry_root, self._sequence_folder, self.config.ab_versions)
        coverage_due = check_coverage or time.monotonic() - self._coverage_checked >= COVERAGE_CHECK_S
        if not changes and live == self._live_model and set(wanted) == set(self._models) and not coverage_due:
            # The common case, every poll: two small file reads. Counting the collection (a scan) is
            # left to the slower coverage check, so a poll adds no noticeable latency to requests.
            return {}
        self._coverage_checked = time.monotonic()
        count = index.count()
        new_products: set[str] | None = None
        slots: dict[str, ModelSlot] = {}
        for version, folder in wanted.items():
            old = self._models.get(version)
            if old is not None and index is self.index:
                if count != self._coverage_count and self.config.map_new_products:
                    # Products added since the slot was built: map them into the model's space.
                    if new_products is None:
                        new_products = set(index.product_ids())
                    missing = new_products - old.covered
                    if missing:
                        added = upsert_behavior_vectors(index, old.encoder, map_content=True, only=missing)
                        old = ModelSlot(
                            version,
                            old.encoder,
                            old.space,
                            old.covered | added.covered,
                            old.mapped + added.mapped,
                        )
                        changes.setdefault("mapped_new_products", {})[version] = added.mapped
                slots[version] = old
                continue
            try:
                encoder = old.encoder if old is not None else SequenceEncoder.load(folder)
            except Exception as exc:
                raise RuntimeError(f"cannot load user-encoder model {version} from {folder}: {exc}") from exc
            # The served model's item vectors must be in the collection it serves from; writing them
            # here (the server owns the index) makes a promoted model servable without a restart.
            written = upsert_behavior_vectors(index, encoder, map_content=self.config.map_new_products)
            slots[version] = ModelSlot(version, encoder, written.space, written.covered, written.mapped)
            changes.setdefault("models", []).append(version)
        if live != self._live_model:
            changes["live_model"] = {"from": self._live_model, "to": live}
        if set(slots) != set(self._models):
            changes.setdefault("models", [])
        if not changes and all(slots[v] is self._models.get(v) for v in slots):
            self._coverage_count = count
            return {}
        old_index, previous = self.index, self._models
        with self._guard.exclusive():
            if index is not old_index:
                # Updates recorded since `pending` was read (none runs while the guard is exclusive).
                late = self.overrides.values()
                apply_overrides(index, {pid: f for pid, f in late.items() if pending.get(pid) != f})
            self.index, self.heads, self.manifest = index, heads, manifest
            self._vocabulary, self._prior = vocabulary, prior
            self.catalog_dir = Path(manifest["catalog"]) if manifest.get("catalog") else None
            self._models, self._live_model = slots, live
            self._coverage_count = count
            self._count = (-1e9, 0)
            with self._lock:
                self._user_cache.clear()  # user vectors of another model are not comparable
        if index is not old_index:
            old_index.close()  # no request holds it: they all finished before the swap
        # Spaces of models no longer served: no request of this process can reach them after the swap.
        # The last retired one stays one more round: against a Qdrant server, other replicas may serve
        # it until their own next poll (and a rollback to it costs no rewrite).
        keep = {slot.space.name for slot in slots.values()}
        retired = [s.space.name for v, s in previous.items() if v not in slots and s.space.name not in keep]
        if retired:
            self._retired_space = retired[-1]
        if self._retired_space:
            keep.add(self._retired_space)
        for name in [n for n in index.spaces if is_behavior_space(n) and n not in keep]:
            index.drop_space(name)
            changes.setdefault("dropped_spaces", []).append(name)
        if changes:
            log.info("serving state changed: %s", changes)
        return changes

    def watch(self, interval_s: float | None = None) -> None:
        """Call refresh() every `interval_s` (default: config.model_poll_s) in a daemon thread."""
        interval = self.config.model_poll_s if interval_s is None else interval_s
        if interval <= 0 or self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                self.refresh()

        self._watcher = threading.Thread(target=loop, name="shopguide-refresh", daemon=True)
        self._watcher.start()

    # ---- setup -------------------------------------------------------------------------------------
    def _read_catalog_values(self, index) -> tuple[dict[str, list[str]], AttributePrior]:
        """The filterable values of each keyword field (for filter checks and the query parser) and how
        often each attribute value occurs (attribute affinity's prior), from one scan of the payloads."""
        prior = AttributePrior(self._payloads(index))
        vocabulary = {key: sorted(v for v in prior.counts.get(key, {}) if v) for key in KEYWORD_FIELDS}
        return vocabulary, prior

    def _check_affinity_fields(self, config: RecommenderConfig) -> None:
        """A configured field the catalog does not have is a typo, not a taste: refuse it. The default
        fields are the fashion catalog's; another catalog may lack some, which then add nothing."""
        missing = [f for f in config.affinity_fields if f not in self._prior.counts]
        if missing and config.affinity_fields != AFFINITY_FIELDS:
            raise ValueError(
                f"affinity_fields {missing} are not attributes of this catalog; "
                f"it has {sorted(self._prior.counts)}"
            )

    @_serving
    def payloads(self, batch: int = 2048) -> list[dict]:
        return self._payloads(self.index, batch)

    @staticmethod
    def _payloads(index, batch: int = 2048) -> list[dict]:
        """Every product's payload (with its product_id), for the query vocabulary."""
        ids = list(index.product_ids())
        out = []
        for start in range(0, len(ids), batch):
            out.extend(
                {**r.payload, "product_id": r.product_id} for r in index.get(ids[start : start + batch])
            )
        return out

    @_serving
    def vocabulary(self) -> dict[str, list[str]]:
        return self._vocabulary

    def reconfigure(self, config: dict | None) -> None:
        """New live settings; new A/B arms are loaded before this returns (an unknown version is an
        error and the previous settings stay)."""
        new = RecommenderConfig.from_dict(config)
        self._check_affinity_fields(new)
        old, self.config = self.config, new
        if new.ab_versions != old.ab_versions or new.map_new_products != old.map_new_products:
            try:
                self.refresh(raise_errors=True)
            except Exception:
                self.config = old
                raise

    # ---- versions and health -----------------------------------------------------------------------
    @_serving
    def model_versions(self) -> dict[str, str]:
        versions = {n: s.encoder for n, s in self.index.spaces.items() if not is_behavior_space(n)}
        versions["collection"] = self.index.name
        live = self._live_slot()
        versions["behavior"] = live.space.encoder if live else "none"
        versions["user_encoder"] = live.space.encoder if live else "content-fallback"
        versions["user_encoder_version"] = live.version if live else "none"
        if len(self.config.ab_versions) == 2:
            versions["ab_arm_A"], versions["ab_arm_B"] = self.config.ab_versions
        return versions

    @_serving
    def product_count(self) -> int:
        """Points in the live collection, cached for a second: an exact count scans the collection
        (about 1 ms at 11k products), and /healthz may be polled often."""
        now = time.monotonic()
        if now - self._count[0] > 1.0:
            self._count = (now, self.index.count())
        return self._count[1]

    @_serving
    def health(self) -> dict:
        """Cheap liveness facts for /healthz: the index answers, and which models are served."""
        out = {
            "products": self.product_count(),
            "collection": self.index.name,
            "model_versions": self.model_versions(),
        }
        if self.refresh_error:
            out["refresh_error"] = self.refresh_error
        return out

    @_serving
    def stats(self) -> dict:
        return {
            "products": self.product_count(),
            "collection": self.index.name,
            "events": self.events.count(),
            "users": self.events.users(),
            "model_versions": self.model_versions(),
        }

    # ---- checks ------------------------------------------------------------------------------------
    def check_filters(self, filters: Filters) -> Filters:
        """Unknown keyword values are errors that list the known ones, never a silently empty result."""
        for key in KEYWORD_FIELDS:
            for value in getattr(filters, key):
                if value not in self._vocabulary[key]:
                    known = ", ".join(self._vocabulary[key][:40])
                    raise BadRequestError(f"unknown {key} {value!r}; known values: {known}")
        if (
            filters.min_price is not None
            and filters.max_price is not None
            and filters.min_price > filters.max_price
        ):
            raise BadRequestError(f"min_price {filters.min_price} is above max_price {filters.max_price}")
        return filters

    @_serving
    def product(self, product_id: str) -> dict:
        found = self.index.get([product_id])
        if not found:
            raise NotFoundError(f"product {product_id!r} is not in the catalog")
        return {"product_id": product_id, **found[0].payload}

    @_serving
    def update_product(self, product_id: str, fields: dict) -> dict:
        """Payload-only update of price and/or stock (vectors untouched), visible to the next query."""
        unknown = sorted(set(fields) - {"price", "in_stock"})
        if unknown or not fields:
            raise BadRequestError(
                f"only price and in_stock can be updated here, got {sorted(fields) or 'nothing'}"
            )
        price = fields.get("price")
        if "price" in fields and (
            isinstance(price, bool)
            or not isinstance(price, int | float)
            or not math.isfinite(price)
            or price < 0
        ):
            raise BadRequestError(f"price must be a finite number >= 0, got {price!r}")
        if "in_stock" in fields and not isinstance(fields["in_stock"], bool):
            raise BadRequestError(f"in_stock must be true or false, got {fields['in_stock']!r}")
        current = self.product(product_id)  # 404 before writing anything
        clean = {k: float(v) if k == "price" else v for k, v in fields.items()}
        with self._lock:
            # Recorded first: ingest and reembed rebuild payloads from the catalog and apply these.
            try:
                self.overrides.record(product_id, clean, current)
            except OverrideStoreError as exc:
                log.error("price/stock update of %s refused: %s", product_id, exc)
                raise UnavailableError(
                    "cannot record the update (the price/stock override store is unusable; see the "
                    "server log); nothing was changed"
                ) from None
            self.index.set_payload(product_id, clean)
        return self.product(product_id)

    @_serving
    def image_path(self, product_id: str) -> Path:
        """The product's photo on disk; only for products in the index (so ids never become paths)."""
        self.product(product_id)
        if self.catalog_dir is None:
            raise NotFoundError(f"the index in {self.data_dir} does not record its catalog folder")
        path = self.catalog_dir / "images" / f"{product_id}.jpg"
        if path.resolve().parent != (self.catalog_dir / "images").resolve() or not path.is_file():
            raise NotFoundError(f"no photo for product {product_id!r}")
        return path

    # ---- ranking helpers ---------------------------------------------------------------------------
    def _rank(
        self,
        space: str,
        vector: np.ndarray,
        k: int,
        filters: Filters,
        exclude: Sequence[str],
        diversity: float,
        hnsw_ef: int | None = None,
    ) -> list[Hit]:
        """Top-k in one space; with diversity > 0, MMR over a wider candidate set."""
        if not 0 <= diversity <= 1:
            raise BadRequestError(f"diversity must be between 0 and 1, got {diversity}")
        if diversity == 0:
            return self.index.search(space, vector, k, filters, exclude_ids=tuple(exclude), hnsw_ef=hnsw_ef)
        wide = min(max(k * self.config.candidates_per_item, k), 4000)
        hits = self.index.search(space, vector, wide, filters, exclude_ids=tuple(exclude), hnsw_ef=hnsw_ef)
        if len(hits) <= 1:
            return hits
        records = {r.product_id: r for r in self.index.get([h.product_id for h in hits], with_vectors=True)}
        usable = [h for h in hits if DIVERSITY_SPACE in records.get(h.product_id, _EMPTY).vectors]
        vectors = np.stack([records[h.product_id].vectors[DIVERSITY_SPACE] for h in usable])
        order = mmr_order(np.array([h.score for h in usable]), vectors, k, diversity)
        return [usable[i] for i in order]

    def _blend(
        self,
        space: str,
        user_vector: np.ndarray,
        history: list[Event],
        records: dict,
        affinity: HistoryAffinity | None,
        k: int,
        filters: Filters,
        exclude: set[str],
        diversity: float,
    ) -> list[Hit]:
        """The GRU's top candidates re-ranked by z(GRU score) + content_weight * z(cosine of their fused
        vector to the history's content profile) + affinity_weight * their attribute affinity to the
        history; with diversity > 0, MMR over the blended scores. Scores are the blend."""
        if not 0 <= diversity <= 1:
            raise BadRequestError(f"diversity must be between 0 and 1, got {diversity}")
        wide = min(max(k * self.config.feed_pool_per_item, 50, k * self.config.candidates_per_item), 4000)
        # MMR needs the candidates' vectors; the blend alone needs only their cosines to the profile,
        # which the engine computes (0.2 ms for 200, against ~3 ms to read and convert the vectors).
        pool = self.index.search(
            space,
            user_vector,
            wide,
            filters,
            exclude_ids=tuple(exclude),
            hnsw_ef=self.config.behavior_hnsw_ef,
            with_vectors=(DIVERSITY_SPACE,) if diversity > 0 else (),
        )
        profile = self._content_profile(history, records)
        vectors = None
        if diversity > 0:
            usable = [h for h in pool if DIVERSITY_SPACE in h.vectors]
            if usable:
                vectors = np.stack([h.vectors[DIVERSITY_SPACE] for h in usable])  # (n, d)
                cosines = vectors @ profile
        elif self.config.content_weight > 0:
            similarity = self.index.similarity(DIVERSITY_SPACE, profile, [h.product_id for h in pool])
            usable = [h for h in pool if h.product_id in similarity]
            cosines = np.array([similarity[h.product_id] for h in usable])
        else:
            usable = pool  # affinity alone reads only payloads
        if len(usable) <= 1:
            return pool[:k]
        blended = _zscores(np.array([h.score for h in usable]))
        if self.config.content_weight > 0:
            blended += self.config.content_weight * _zscores(cosines)
        if affinity is not None:
            blended += self.config.affinity_weight * affinity.scores([h.payload for h in usable])
        order = mmr_order(blended, vectors, k, diversity) if diversity > 0 else np.argsort(-blended)[:k]
        return [Hit(usable[i].product_id, float(blended[i]), usable[i].payload) for i in order]

    def _backfill(self, picks: list[_Pick], k: int, filters: Filters, exclude: set[str]) -> None:
        """Top up to k with trending products passing the filters, each labelled as filler."""
        if len(picks) >= k:
            return
        taken = exclude | {p.product_id for p in picks}
        for hit in self._popular(k - len(picks), filters, taken):
            picks.append(_Pick(hit.product_id, 0.0, hit.payload, [FILLED]))

    def _popular(self, k: int, filters: Filters, exclude: set[str]) -> list[Hit]:
        """Products by event popularity that pass the filters, then any passing products (index order)."""
        out: list[Hit] = []
        seen = set(exclude)
        # Ask for more than k: many popular products may fail the filters.
        for want in (k * 10, k * 100):
            ranked = [pid for pid, _ in self.events.popular(limit=want) if pid not in seen]
            for record in self.index.get(ranked):
                if filters.matches(record.payload) and record.product_id not in seen:
                    out.append(Hit(record.product_id, 0.0, record.payload))
                    seen.add(record.product_id)
                    if len(out) >= k:
                        return out
        if len(out) < k:  # no events yet, or too few popular matches: any products passing the filters
            probe = np.zeros(self.index.spaces["fused"].dim, dtype=np.float32)
            probe[0] = 1.0
            for hit in self.index.search("fused", probe, k - len(out), filters, exclude_ids=tuple(seen)):
                out.append(hit)
        return out

    def _respond(self, picks: list[_Pick], model_version: str, **extra) -> dict:
        return {
            "request_id": uuid.uuid4().hex,
            "model_version": model_version,
            **extra,
            "items": [
                {
                    "product_id": p.product_id,
                    "score": round(float(p.score), 6),
                    "title": p.payload.get("title"),
                    "image_url": f"/products/{p.product_id}/image",
                    "price": p.payload.get("price"),
                    "in_stock": p.payload.get("in_stock"),
                    "reasons": p.reasons,
                }
                for p in picks
            ],
        }

    # ---- similar items -----------------------------------------------------------------------------
    @_serving
    def similar(
        self,
        product_id: str,
        k: int = 10,
        mode: str = "fused",
        diversity: float = 0.0,
        exclude: Sequence[str] = (),
        filters: Filters | None = None,
    ) -> dict:
        """Products like `product_id` in one space; exactly k when at least k products pass the filters."""
        check_k(k)
        if mode not in SIMILAR_MODES:
            raise BadRequestError(f"unknown mode {mode!r}; use one of {', '.join(SIMILAR_MODES)}")
        filters = self.check_filters(filters or Filters())
        found = self.index.get([product_id], with_vectors=True)
        if not found:
            raise NotFoundError(f"product {product_id!r} is not in the catalog")
        source = found[0]
        title = source.payload.get("title", product_id)
        excluded = {product_id, *exclude}
        picks: list[_Pick] = []
        space, version = mode, self.index.spaces[mode].encoder if mode in self.index.spaces else "none"
        live = self._live_slot()
        if mode == "behavior":
            space, version = (live.space.name, live.space.encoder) if live else ("", "none")
        if space in source.vectors:
            hnsw_ef = self.config.behavior_hnsw_ef if mode == "behavior" else None
            for hit in self._rank(
                space, source.vectors[space], k, filters, list(excluded), diversity, hnsw_ef
            ):
                picks.append(_Pick(hit.product_id, hit.score, hit.payload, [f"{MODE_REASON[mode]} {title}"]))
            if mode == "behavior":
                self._label_mapped(picks, live, source=product_id)
        if mode == "behavior" and len(picks) < k and "fused" in source.vectors:
            # Products without behavior data (new, or never bought) fall back to content similarity.
            taken = [*excluded, *(p.product_id for p in picks)]
            for hit in self._rank(
                "fused", source.vectors["fused"], k - len(picks), filters, taken, diversity
            ):
                picks.append(
                    _Pick(hit.product_id, hit.score, hit.payload, [f"{MODE_REASON['fused']} {title}", FILLED])
                )
        self._backfill(picks, k, filters, excluded)
        return self._respond(picks, version, mode=mode)

    # ---- search ------------------------------------------------------------------------------------
    @_serving
    def project_text(self, raw: np.ndarray) -> np.ndarray:
        """(d_text,) raw text-encoder features -> (dim,) unit query vector in the shared space."""
        self._check_tower("text", raw, self.heads.config.text_dim)
        # np.array copies: arrays that come through Ray are read-only, which torch warns about.
        return self.heads.project_texts(np.array(raw, dtype=np.float32)[None])[0]

    @_serving
    def project_image(self, raw: np.ndarray) -> np.ndarray:
        self._check_tower("image", raw, self.heads.config.image_dim)
        return self.heads.project_images(np.array(raw, dtype=np.float32)[None])[0]

    def _check_tower(self, modality: str, raw: np.ndarray, expected: int) -> None:
        # Right after a re-embed swaps in a collection built with another encoder, the query encoders
        # may still be the old ones for a moment (they follow the live manifest): a retry, not a 500.
        if np.shape(raw)[-1] != expected:
            wanted = self.manifest.get("encoders", {}).get(f"{modality}_encoder", "?")
            raise UnavailableError(
                f"the {modality} query encoder is switching to the live collection's ({wanted}); "
                "retry in a few seconds"
            )

    @_serving
    def search(
        self,
        k: int = 10,
        mode: str = "fused",
        filters: Filters | None = None,
        diversity: float = 0.0,
        reasons: Sequence[str] = (),
        understood: dict | None = None,
        text_features: np.ndarray | None = None,
        image_features: np.ndarray | None = None,
        like: str | None = None,
        exclude: Sequence[str] = (),
    ) -> dict:
        """Rank by a query in one space: raw text and/or photo features (projected here with the heads of
        the live collection) and/or a product the shopper points at (`like`); `reasons` say what matched.

        With only filters understood (no query left), what passes them is ranked by popularity."""
        check_k(k)
        if mode not in MODES:
            raise BadRequestError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        filters = self.check_filters(filters or Filters())
        parts = []
        if text_features is not None:
            parts.append(self.project_text(text_features))
        if image_features is not None:
            parts.append(self.project_image(image_features))
        exclude = list(exclude)
        if like is not None:
            found = self.index.get([like], with_vectors=True)
            if not found:
                raise NotFoundError(f"product {like!r} is not in the catalog")
            parts.append(found[0].vectors[mode])
            exclude.append(like)
        picks: list[_Pick] = []
        if parts:
            query = np.mean(parts, axis=0)
            query = (query / np.linalg.norm(query)).astype(np.float32)
            for hit in self._rank(mode, query, k, filters, exclude, diversity):
                picks.append(_Pick(hit.product_id, hit.score, hit.payload, list(reasons)))
        else:
            for hit in self._popular(k, filters, set(exclude)):
                picks.append(_Pick(hit.product_id, 0.0, hit.payload, [*reasons, "popular among the matches"]))
        self._backfill(picks, k, filters, set(exclude))
        extra = {"mode": mode}
        if understood is not None:
            extra["understood"] = understood
        return self._respond(picks, self.index.spaces[mode].encoder, **extra)

    # ---- events ------------------------------------------------------------------------------------
    @_serving
    def add_events(self, raw_events: Sequence[dict]) -> dict:
        """Validate a batch (all or nothing), store it durably, and drop the users' cached vectors."""
        events = []
        for position, data in enumerate(raw_events):
            try:
                events.append(Event.from_dict(data))
            except (EventError, TypeError) as exc:
                raise BadRequestError(f"events[{position}]: {exc}") from None
        product_ids = sorted({e.product_id for e in events if e.product_id is not None})
        known = {r.product_id for r in self.index.get(product_ids)} if product_ids else set()
        unknown = [pid for pid in product_ids if pid not in known]
        if unknown:
            raise BadRequestError(f"unknown product id(s) {unknown[:20]}; nothing was stored")
        result = self.events.add(events)
        with self._lock:
            for user_id in {e.user_id for e in events}:
                self._user_cache.pop(user_id, None)
        return {"accepted": result.accepted, "duplicates": result.duplicates}

    @_serving
    def user_events(self, user_id: str, limit: int = 50) -> dict:
        if not 1 <= limit <= 10_000:
            raise BadRequestError(f"limit must be between 1 and 10000, got {limit}")
        events = self.events.recent(user_id, limit)
        return {"user_id": user_id, "events": [e.to_dict() for e in events]}

    @_serving
    def delete_user(self, user_id: str) -> dict:
        """Forget a shopper: events, product page impressions and the cached user vector."""
        events, impressions = self.events.forget_user(user_id)
        with self._lock:
            cached = self._user_cache.pop(user_id, None) is not None
        return {
            "user_id": user_id,
            "deleted_events": events,
            "deleted_impressions": impressions,
            "deleted_cached_vectors": int(cached),
        }

    # ---- personalized feed -------------------------------------------------------------------------
    @_serving
    def feed(
        self,
        user_id: str,
        k: int = 10,
        diversity: float = 0.0,
        filters: Filters | None = None,
        exclude: Sequence[str] = (),
    ) -> dict:
        """The shopper's feed: GRU over recent events (content fallback without a model), cold start
        for a shopper with no product events, purchases (and `exclude`) always left out."""
        check_k(k)
        filters = self.check_filters(filters or Filters())
        history = [
            e for e in self.events.history(user_id, self.config.feed_history) if e.product_id is not None
        ]
        purchased = self.events.purchased(user_id)
        exclude = set(purchased) | set(exclude)
        if self.config.exclude_seen:
            exclude |= {e.product_id for e in history}
        searches = [e.query for e in self.events.recent(user_id, 10) if e.type == "search" and e.query]
        records = (
            {r.product_id: r for r in self.index.get([e.product_id for e in history], with_vectors=FUSED)}
            if history
            else {}
        )
        history = [e for e in history if e.product_id in records]  # products since deleted are skipped
        if not history:
            # Exploration on the cold start draws its alternatives from popular products only.
            cold = self._cold_start(user_id, k, filters, exclude)
            arm = self._model_for(user_id)[0]
            return explore_and_log(self, cold, user_id=user_id, filters=filters, exclude=exclude, arm=arm)
        picks: list[_Pick] = []
        version = "content-fallback"
        arm, slot = self._model_for(user_id)
        affinity = self._history_affinity(history, records) if self.config.affinity_weight > 0 else None
        if slot is not None:
            user_vector = self._user_vector(user_id, history, slot)
            if user_vector is not None:
                version = slot.space.encoder
                if self.config.content_weight > 0 or affinity is not None:
                    hits = self._blend(
                        slot.space.name,
                        user_vector,
                        history,
                        records,
                        affinity,
                        k,
                        filters,
                        exclude,
                        diversity,
                    )
                else:
                    hits = self._rank(
                        slot.space.name,
                        user_vector,
                        k,
                        filters,
                        list(exclude),
                        diversity,
                        self.config.behavior_hnsw_ef,
                    )
                picks = [_Pick(h.product_id, h.score, h.payload) for h in hits]
        if not picks:  # no model, or none of the history is known to it: content vectors of the history
            hits = self._rank(
                "fused", self._content_profile(history, records), k, filters, list(exclude), diversity
            )
            picks = [_Pick(h.product_id, h.score, h.payload) for h in hits]
        self._explain_feed(picks, history, records, searches)
        if affinity is not None:
            for pick in picks:
                tastes = affinity.shared_tastes(pick.payload)  # values at least twice the catalog's share
                if tastes:
                    pick.reasons.append(TASTE_REASON + ", ".join(tastes))
        if slot is not None and version == slot.space.encoder:
            self._label_mapped(picks, slot)
        self._backfill(picks, k, filters, exclude)
        extra = {"arm": arm} if arm is not None else {}
        response = self._respond(picks, version, user_id=user_id, personalized=True, **extra)

        def rank_more(n: int, taken: set[str]) -> list[Hit]:
            # Exploration's alternatives: the content ranking of the history, continued past the slate
            # (the same for every model and arm, so arms explore alike).
            profile = self._content_profile(history, records)
            return self._rank("fused", profile, n, filters, list(taken), 0.0)

        return explore_and_log(
            self, response, user_id=user_id, filters=filters, exclude=exclude, arm=arm, rank_more=rank_more
        )

    @staticmethod
    def _label_mapped(picks: list[_Pick], slot: ModelSlot, source: str | None = None) -> None:
        """Say so where a behavior link is predicted from content: the item (or the product it is
        similar to) has no shopper data in the model yet."""
        known = slot.encoder.item_index
        source_mapped = source is not None and source not in known
        for pick in picks:
            if source_mapped or pick.product_id not in known:
                pick.reasons.append(MAPPED)

    def _user_vector(self, user_id: str, history: list[Event], slot: ModelSlot) -> np.ndarray | None:
        signature = (slot.version, *(e.event_id for e in history[-3:]), len(history))
        with self._lock:
            cached = self._user_cache.get(user_id)
            if cached is not None and cached[0] == signature:
                self._user_cache.move_to_end(user_id)
                return cached[1]
        vectors, stats = slot.encoder.encode_users_with_stats([[(e.product_id, e.type) for e in history]])
        if stats.unknown_items == len(history):
            return None
        with self._lock:
            self._user_cache[user_id] = (signature, vectors[0])
            while len(self._user_cache) > USER_CACHE_SIZE:
                self._user_cache.popitem(last=False)
        return vectors[0]

    @staticmethod
    def _content_profile(history: list[Event], records: dict) -> np.ndarray:
        """Recency- and intent-weighted mean of the history's fused vectors, unit length."""
        vectors, weights = [], []
        for age, event in enumerate(reversed(history)):
            vec = records[event.product_id].vectors.get("fused")
            if vec is not None:
                vectors.append(vec)
                weights.append(FEED_WEIGHTS.get(event.type, 1.0) * PROFILE_DECAY**age)
        profile = np.average(np.stack(vectors), axis=0, weights=weights)
        return (profile / np.linalg.norm(profile)).astype(np.float32)

    def _history_affinity(self, history: list[Event], records: dict) -> HistoryAffinity:
        """The shopper's attribute affinity from the intent- and recency-weighted history."""
        weighted = [
            (records[event.product_id].payload, FEED_WEIGHTS.get(event.type, 1.0) * AFFINITY_DECAY**age)
            for age, event in enumerate(reversed(history))
        ]
        return HistoryAffinity(
            weighted, self._prior, self.config.affinity_fields, self.config.affinity_prior_strength
        )

    def _explain_feed(
        self, picks: list[_Pick], history: list[Event], records: dict, searches: list[str]
    ) -> None:
        """Each item's reason: the history product closest to it (fused vectors) and what the shopper did."""
        if not picks:
            return
        last_action: dict[str, str] = {}
        for event in history:
            last_action[event.product_id] = event.type
        sources = [pid for pid in last_action if "fused" in records[pid].vectors]
        if not sources:
            return
        source_vecs = np.stack([records[pid].vectors["fused"] for pid in sources])  # (h, d)
        picked = {r.product_id: r for r in self.index.get([p.product_id for p in picks], with_vectors=FUSED)}
        for pick in picks:
            vec = picked.get(pick.product_id)
            if vec is None or "fused" not in vec.vectors:
                pick.reasons.append("picked from your recent activity")
                continue
            best = int(np.argmax(source_vecs @ vec.vectors["fused"]))
            source = sources[best]
            title = records[source].payload.get("title", source)
            pick.reasons.append(f"similar to {title} you {VERBS.get(last_action[source], 'viewed')}")
            for query in searches[:3]:
                words = {w for w in query.lower().split() if len(w) > 2}
                text = " ".join(str(pick.payload.get(f, "")) for f in ("title", *KEYWORD_FIELDS)).lower()
                if words and words & set(text.split()):
                    pick.reasons.append(f"matches your search {query!r}")
                    break

    def _cold_start(self, user_id: str | None, k: int, filters: Filters, exclude: set[str]) -> dict:
        """A shopper with no product events: trending products (events of the last `trending_days`),
        then all-time popular ones, then the GRU's learned first-purchase popularity."""
        picks: list[_Pick] = []
        taken = set(exclude)
        recent = self.events.popular(limit=k * 20, since=time.time() - self.config.trending_days * 86400)
        for ranked, label in (
            (recent, "trending in {}"),
            (self.events.popular(limit=k * 20), "popular in {}"),
        ):
            scores = dict(ranked)
            for record in self.index.get([pid for pid, _ in ranked if pid not in taken]):
                if len(picks) >= k:
                    break
                if filters.matches(record.payload):
                    category = record.payload.get("articleType") or record.payload.get("masterCategory")
                    reason = label.format(category or "the shop")
                    picks.append(
                        _Pick(record.product_id, scores[record.product_id], record.payload, [reason])
                    )
                    taken.add(record.product_id)
        slot = self._model_for(user_id)[1] if user_id is not None else self._live_slot()
        if len(picks) < k and slot is not None:
            vector = slot.encoder.cold_start_vector()
            for hit in self.index.search(
                slot.space.name, vector, k - len(picks), filters, tuple(taken), self.config.behavior_hnsw_ef
            ):
                picks.append(_Pick(hit.product_id, hit.score, hit.payload, ["popular first purchase"]))
        self._backfill(picks, k, filters, exclude)
        return self._respond(picks, "popularity", user_id=user_id, personalized=False)

    # ---- product page ------------------------------------------------------------------------------
    @_serving
    def bought_together(self, product_id: str, k: int = 8, user_id: str | None = None) -> dict:
        """Products other shoppers put in their cart or bought along with `product_id` (co-occurrence
        within a shopper's cart/purchase events), topped up to k with popular products of the same
        category labelled as filler."""
        check_k(k)
        source = self.product(product_id)
        title = source.get("title", product_id)
        ranked = self.events.co_occurring(product_id, k * 3, types=BOUGHT_TYPES, exclude_user=user_id)
        exclude = {product_id} | (self.events.purchased(user_id) if user_id else set())
        shoppers = dict(ranked)
        records = {r.product_id: r for r in self.index.get([pid for pid, _ in ranked if pid not in exclude])}
        picks: list[_Pick] = []
        for pid, _ in ranked:  # co-occurrence order; products since deleted from the index are skipped
            if pid in records and len(picks) < k:
                n = shoppers[pid]
                reason = f"bought together with {title} by {n} shopper{'s' if n != 1 else ''}"
                picks.append(_Pick(pid, float(n), records[pid].payload, [reason]))
        # Too little evidence (a new or rarely bought product): what sells in the same category, the
        # narrowest category first, then anything popular.
        for key in ("subCategory", "masterCategory", None):
            if len(picks) >= k:
                break
            if key is not None and not source.get(key):
                continue
            filters = Filters(**{key: (source[key],)}) if key else Filters()
            taken = exclude | {p.product_id for p in picks}
            for hit in self._popular(k - len(picks), filters, taken):
                category = hit.payload.get("articleType") or hit.payload.get("masterCategory") or "the shop"
                picks.append(_Pick(hit.product_id, 0.0, hit.payload, [f"popular in {category}", FILLED]))
        return self._respond(picks, "co-occurrence")

    @_serving
    def module_interest(self, user_id: str | None) -> dict[str, float]:
        """Predicted interest of the shopper in each product page module (see `page`)."""
        strength = self.config.page_prior_strength
        priors = self._global_module_rates()
        mine = self.events.module_stats(user_id) if user_id is not None else {}
        out = {}
        for name in PAGE_MODULES:
            stats = mine.get(name)
            impressions, engagement = (stats.impressions, stats.engagement) if stats else (0, 0.0)
            out[name] = (engagement + strength * priors[name]) / (impressions + strength)
        return out

    def _global_module_rates(self) -> dict[str, float]:
        """Each module's engagement per impression over all shoppers, shrunk towards its default prior."""
        now = time.monotonic()
        with self._lock:
            loaded, rates = self._module_priors
            if now - loaded <= self.config.page_prior_ttl_s and rates:
                return rates
        stats = self.events.module_stats(None)
        strength = self.config.page_prior_strength
        rates = {}
        for name, (_, default) in PAGE_MODULES.items():
            found = stats.get(name)
            impressions, engagement = (found.impressions, found.engagement) if found else (0, 0.0)
            rates[name] = (engagement + strength * default) / (impressions + strength)
        with self._lock:
            self._module_priors = (now, rates)
        return rates

    @_serving
    def page(self, product_id: str, user_id: str | None = None, k: int = 8) -> dict:
        """The product page: the product and its modules (similar items, frequently bought together,
        for you), each with its own request_id, ordered by the shopper's predicted interest.

        Interest of user u in module m = (engagement(u, m) + a * prior(m)) / (impressions(u, m) + a):
        impressions are the pages that served m to u; engagement sums click 1 / cart 2 / purchase 4 over
        u's events whose request_id is one of those impressions; a = `page_prior_strength` (5). prior(m)
        is the same rate over all shoppers, itself shrunk towards the module's default (similar 0.3,
        for you 0.2, bought together 0.1). Modules are sorted by interest, descending; ties keep the
        default order. A new shopper gets the priors' order; a shopper who keeps buying from "bought
        together" sees it first. Each module served to a known user is recorded as an impression."""
        check_k(k)
        product = self.product(product_id)
        interest = self.module_interest(user_id)
        built = {
            "similar": self.similar(product_id, k),
            "bought_together": self.bought_together(product_id, k, user_id),
            "for_you": (
                self.feed(user_id, k, exclude=[product_id])
                if user_id is not None
                else self._cold_start(None, k, Filters(), {product_id})
            ),
        }
        # sorted() is stable: equal interest keeps PAGE_MODULES order.
        names = sorted(PAGE_MODULES, key=lambda name: -interest[name])
        modules = [
            {
                "name": name,
                "title": PAGE_MODULES[name][0],
                "request_id": built[name]["request_id"],
                "model_version": built[name]["model_version"],
                "interest": round(interest[name], 6),
                "items": built[name]["items"],
            }
            for name in names
        ]
        if user_id is not None:
            now = time.time()
            self.events.add_impressions(
                [Impression(m["request_id"], user_id, m["name"], now) for m in modules]
            )
        return {"request_id": uuid.uuid4().hex, "user_id": user_id, "product": product, "modules": modules}

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=60)  # a refresh in progress finishes its writes first
        self.index.close()
        self.events.close()


class _Empty:
    vectors: dict = {}


_EMPTY = _Empty()

"""Ray Serve deployments: thin shells over the plain recommender, the query encoders and the FastAPI app.

Layout (knobs in infra/serve/shopguide.yaml): `Ingress` (FastAPI, any number of replicas) calls
`Recommender` (owns the index and the event store: exactly one replica on the embedded index, any
number against a Qdrant server) and two batched encoders, `TextEncoder` and `ImageEncoder`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import IndexStore
from serving.admission import PROXY_CALLBACK, gate_configured
from serving.api import ApiSettings, create_app
from serving.ray_logs import log_to_serve_file
from serving.towers import QueryTower
from training.ingest import MANIFEST
from training.overrides import OVERRIDES_DB, OverrideStore

log = logging.getLogger("shopguide.serve")

APP_NAME = "shopguide"
API_KEY_ENV = "SHOPGUIDE_API_KEY"
# Recommender methods the ingress may call: the remote `call` is not a way into arbitrary attributes.
RECOMMENDER_METHODS = frozenset(
    {
        "health",
        "stats",
        "payloads",
        "product",
        "image_path",
        "vocabulary",
        "similar",
        "page",
        "search",
        "feed",
        "add_events",
        "user_events",
        "delete_user",
        "update_product",
    }
)


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of the Ray Serve config); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    data_dir: str = "data/demo"  # what `shopguide ingest` wrote; relative to the working directory
    qdrant_url: str | None = None  # a Qdrant server instead of the embedded index
    # Environment variable holding the Qdrant API key, read by each replica (the key is never an arg).
    qdrant_api_key_env: str | None = "QDRANT_API_KEY"
    sequence_model: str | None = None  # default: DATA_DIR/models/sequence when it exists
    events_db: str | None = None  # default: DATA_DIR/events.db
    # Live price/stock updates (training/overrides.py); ingest and reembed need the same file.
    overrides_db: str | None = None  # default: DATA_DIR/product_overrides.db
    api_key_env: str = API_KEY_ENV  # writes need this key when the variable is set
    api_key: str | None = None  # set by `shopguide serve` in-process; never put a key in the YAML


def resolve_paths(args: AppArgs) -> dict:
    """Absolute paths for the replicas (their working directory is not the caller's).

    The Qdrant API key is not among them: these travel to the replicas through Ray, so they carry the
    name of the variable and each replica reads the key from its own environment (build_recommender)."""
    data_dir = Path(args.data_dir).expanduser().resolve()
    if not (data_dir / MANIFEST).is_file():
        url = f" --qdrant-url {args.qdrant_url}" if args.qdrant_url else ""
        raise FileNotFoundError(
            f"no index in {data_dir}: run `shopguide ingest{url} --data-dir {data_dir}` first"
        )
    sequence = Path(args.sequence_model).expanduser().resolve() if args.sequence_model else None
    if sequence is None and (data_dir / "models" / "sequence" / "sequence_model.pt").is_file():
        sequence = data_dir / "models" / "sequence"
    events_db = Path(args.events_db).expanduser().resolve() if args.events_db else data_dir / "events.db"
    overrides_db = (
        Path(args.overrides_db).expanduser().resolve() if args.overrides_db else data_dir / OVERRIDES_DB
    )
    key_env = args.qdrant_api_key_env if args.qdrant_url else None
    return {
        "data_dir": str(data_dir),
        "qdrant_url": args.qdrant_url,
        "qdrant_api_key_env": key_env,
        # Whether the resolving process had the key: a replica that lacks it then refuses to start
        # with a message naming the variable, instead of being answered 401 by the server.
        "qdrant_api_key_set": bool(key_env and os.environ.get(key_env)),
        "sequence_model": str(sequence) if sequence else None,
        "events_db": str(events_db),
        "overrides_db": str(overrides_db),
    }


def qdrant_api_key(paths: dict) -> str | None:
    """The Qdrant API key from this process's environment, by the variable named in `paths`."""
    key_env = paths.get("qdrant_api_key_env")
    key = (os.environ.get(key_env) or None) if key_env else None  # an empty variable is no key
    if key is None and paths.get("qdrant_api_key_set"):
        raise ValueError(
            f"${key_env} (the Qdrant API key) is set where `shopguide serve` started but not in this "
            "process: set it on every node that runs a Recommender replica (or in its runtime_env)"
        )
    return key


def build_recommender(paths: dict, store: IndexStore | None = None) -> Any:
    """The plain Recommender for these paths (also used by tests and `shopguide serve --no-ray`).

    `store`: an index store opened by the caller instead of the one `paths` names (a qdrant-client
    ":memory:" store is private to the object that made it, so tests hand in the one they filled);
    the caller closes it."""
    from index import open_store
    from serving.event_store import SQLiteEventStore
    from serving.recommend import Recommender

    data_dir = Path(paths["data_dir"])
    own_store = store is None
    if store is None:
        store = open_store(data_dir / "index", paths.get("qdrant_url"), qdrant_api_key(paths))
    events = None
    try:
        events = SQLiteEventStore(paths["events_db"])
        sequence = Path(paths["sequence_model"]) if paths.get("sequence_model") else None
        return Recommender(
            data_dir,
            store,
            events,
            sequence,
            registry=data_dir / "models" / "registry",
            overrides=OverrideStore(Path(paths["overrides_db"])) if paths.get("overrides_db") else None,
        )
    except BaseException:
        # The embedded index is locked by whoever holds it open: don't keep it after a failed start.
        if events is not None:
            events.close()
        if own_store:
            store.close()
        raise


@serve.deployment(name="Recommender")
class RecommenderDeployment:
    """Owns the index and the event store; the embedded index allows exactly one replica."""

    def __init__(self, paths: dict) -> None:
        log_to_serve_file()
        started = time.monotonic()
        self.recommender = build_recommender(paths)
        # Beside the controller's log of a death, the time a successor keeps requests waiting.
        log.info("Recommender replica built in %.1f s", time.monotonic() - started)

    def reconfigure(self, config: dict) -> None:
        # Ray calls this right after __init__ with the YAML's user_config, and again on every change;
        # the watcher starts here so it polls at the configured interval.
        self.recommender.reconfigure(config)
        self.recommender.watch()

    async def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        # Runs on the replica's event loop, not in Ray's thread pool: every method is ~1 ms of index
        # and SQLite work, and the thread hand-off measured as much as the work itself.
        if method not in RECOMMENDER_METHODS:
            raise AttributeError(f"the recommender has no remote method {method!r}")
        return getattr(self.recommender, method)(*args, **kwargs)

    def __del__(self) -> None:
        recommender = getattr(self, "recommender", None)
        if recommender is not None:
            recommender.close()
            recommender.store.close()  # build_recommender opened it for this replica alone


def _limit_threads() -> None:
    # Each encoder replica is one process; more torch threads than cores only adds contention.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    """Raw text-encoder features for queries, batched across concurrent requests."""

    def __init__(self, name: str, args: dict, data_dir: str | None = None) -> None:
        _limit_threads()
        self.encoder = QueryTower("text", name, args, Path(data_dir) if data_dir else None)

    def reconfigure(self, config: dict) -> None:
        # Ray hands user_config only to reconfigure, after __init__ built the tower on the CPU, so a GPU
        # replica loads its weights twice at start.
        self.encoder = self.encoder.on_device(str(config.get("device", "cpu")))
        self.encode.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.encode.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.002)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_texts(texts))


@serve.deployment(name="ImageEncoder")
class ImageEncoderDeployment:
    """Raw image-encoder features for uploaded photos (already validated and decoded by the ingress)."""

    def __init__(self, name: str, args: dict, data_dir: str | None = None) -> None:
        _limit_threads()
        self.encoder = QueryTower("image", name, args, Path(data_dir) if data_dir else None)

    def reconfigure(self, config: dict) -> None:
        # Ray hands user_config only to reconfigure, after __init__ built the tower on the CPU, so a GPU
        # replica loads its weights twice at start.
        self.encoder = self.encoder.on_device(str(config.get("device", "cpu")))
        self.encode.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self.encode.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, images: list[Any]) -> list[np.ndarray]:
        return list(self.encoder.encode_images(images))


class RayBackend:
    """The api.Backend over deployment handles; rides out a replica's death while Ray restarts it."""

    # How long one request waits for a dead replica's successor. Ray notices the death at the
    # deployment's next health check (health_check_period_s: 1 s in our configs, Ray's default 10 s)
    # and then starts a new process, which imports the stack and opens the index (`make soak` has the
    # figures). Past this the caller gets a 503 with Retry-After, never a 500.
    RETRY_DEADLINE_S = 15.0
    # The longest one request waits in all, first try included: a first try waits while Serve has no
    # replica to give it (a successor starting, under load 5-13 s in `make soak`), and without a bound
    # a Recommender that never comes back would hold every admitted request until its client gave up.
    ANSWER_DEADLINE_S = 30.0
    RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5)  # then every 0.5 s: a restart takes seconds, not ms
    _last_warned = 0.0  # monotonic time of the last "replica gone" warning (one per 5 s, not per request)

    def __init__(
        self, recommender: DeploymentHandle, text: DeploymentHandle, image: DeploymentHandle
    ) -> None:
        self.recommender = recommender
        self.text = text
        self.image = image

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # A retry is safe for every method, because none does anything twice that matters:
        # - the reads (health, stats, payloads, product, image_path, vocabulary, similar, search,
        #   user_events) change nothing;
        # - feed and page also log what they served (slots, module impressions) under a fresh
        #   request_id; a replica that died after logging but before answering leaves one orphan
        #   impression that no click can ever cite, a negligible dent in the module's interest rate;
        # - add_events is idempotent by event_id (a batch the dead replica had stored comes back as
        #   duplicates, not twice);
        # - delete_user deletes whatever is left (the answer's counts may then be 0);
        # - update_product sets absolute values (price, in_stock), so twice is the same as once.
        return await self._ride_out(lambda: self.recommender.call.remote(method, args, kwargs))

    async def text_features(self, text: str) -> np.ndarray:
        return await self._ride_out(lambda: self.text.encode.remote(text))  # pure: safe to repeat

    async def image_features(self, image: Any) -> np.ndarray:
        return await self._ride_out(lambda: self.image.encode.remote(image))  # pure: safe to repeat

    @staticmethod
    def replica_gone(exc: BaseException) -> bool:
        """True when a handle call failed because the replica died or could not be reached, the
        only failures worth repeating. Errors the method itself raised (bad input, unknown product)
        arrive as a RayTaskError around them and go straight back to the caller (a 4xx)."""
        if isinstance(exc, RayTaskError):  # an upstream actor's death wrapped in a task error
            exc = getattr(exc, "cause", None)
        # RayActorError covers ActorDiedError (killed mid-request) and ActorUnavailableError (the
        # gRPC channel to a dead or unreachable replica, what Serve raises under
        # RAY_SERVE_THROUGHPUT_OPTIMIZED); DeploymentUnavailableError is left out on purpose: it
        # means the deployment failed to deploy at all, which waiting does not fix.
        return isinstance(exc, RayActorError)

    async def _ride_out(self, send: Any) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                # The first try may wait up to ANSWER_DEADLINE_S: while no replica exists Serve queues
                # it until one does, and a slow answer under load is not a failure. Retries share what
                # is left of RETRY_DEADLINE_S.
                deadline = self.ANSWER_DEADLINE_S if attempt == 0 else self.RETRY_DEADLINE_S
                remaining = deadline - (time.monotonic() - started)
                try:
                    # asyncio.timeout, not wait_for: no extra task (and loop hop) on every call.
                    async with asyncio.timeout(max(remaining, 0.001)):
                        return await send()
                except TimeoutError:
                    waited = time.monotonic() - started
                    raise self._unavailable(None, waited, retried=attempt > 0) from None
            except BackPressureError as exc:
                # The deployment's queue at this caller is full (its max_queued_requests): overload,
                # which retrying would only deepen.
                raise self._unavailable(exc) from None
            except Exception as exc:
                if not self.replica_gone(exc):
                    raise
                waited = time.monotonic() - started
                if waited >= self.RETRY_DEADLINE_S:
                    raise self._unavailable(exc, waited) from exc
                self._warn(exc)
                backoff = self.RETRY_BACKOFF_S[min(attempt, len(self.RETRY_BACKOFF_S) - 1)]
                attempt += 1
                await asyncio.sleep(backoff)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - RayBackend._last_warned >= 5:
            RayBackend._last_warned = now
            log.warning(
                "a replica is gone (%s); retrying for up to %g s", type(exc).__name__, self.RETRY_DEADLINE_S
            )

    def _unavailable(
        self, exc: BaseException | None, waited: float | None = None, retried: bool = True
    ) -> StarletteHTTPException:
        if isinstance(exc, BackPressureError):
            log.warning("a deployment's queue at this ingress is full: %s", exc)
            detail = "the server is at capacity; retry shortly"
        elif not retried:  # the first try timed out: no replica answered at all, dead or stuck
            log.warning("gave up after %.1f s: no replica answered", waited)
            detail = f"no answer from the backend within {self.ANSWER_DEADLINE_S:g} s; retry shortly"
        else:
            cause = type(exc).__name__ if exc is not None else "no replica came back"
            log.warning("gave up after %.1f s waiting for a replica (%s)", waited, cause)
            detail = "a backend replica is restarting; retry shortly"
        return StarletteHTTPException(503, detail, headers={"Retry-After": "1"})


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The FastAPI app, built in the replica and wired to the other deployments through their handles."""

    def __init__(
        self,
        recommender: DeploymentHandle,
        text: DeploymentHandle,
        image: DeploymentHandle,
        api_key: str | None,
    ) -> None:
        log_to_serve_file()
        if not gate_configured():
            log.warning(
                "no admission gate in Ray's HTTP proxy: only the Ingress' Ray slots bound what the server "
                "takes on; export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=%s where Ray starts "
                "(`shopguide serve` and the Docker image do)",
                PROXY_CALLBACK,
            )
        self._backend = RayBackend(recommender, text, image)
        self._settings = ApiSettings(api_key=api_key)

    def __serve_build_asgi_app__(self):  # Ray calls this after __init__ (late-bound ingress)
        return create_app(self._backend, self._settings)


def check_recommender_replicas(
    qdrant_url: str | None, options: dict, source: str = "the Serve config"
) -> None:
    """Refuse more than one Recommender replica on the embedded index (`options`: the deployment's
    `.options(...)`): the index is one folder that one process owns, and a second replica would fail
    to open it (or, worse, Ray would keep restarting it)."""
    replicas = options.get("num_replicas", 1)
    if replicas is None:
        replicas = 1
    if isinstance(replicas, int) and replicas < 1:
        raise ValueError(f"the Recommender needs at least 1 replica, {source} asks for {replicas}")
    if qdrant_url:
        return
    if replicas != 1 or options.get("autoscaling_config"):
        asked = (
            "autoscaling"
            if options.get("autoscaling_config") or replicas == "auto"
            else f"{replicas} replicas"
        )
        raise ValueError(
            f"{source} asks for {asked} of the Recommender, but the embedded index (DATA_DIR/index) is one "
            "folder that one process owns: serve it with 1 replica, or move the index to a Qdrant server "
            "(`shopguide ingest --qdrant-url URL`, then `shopguide serve --qdrant-url URL`)"
        )


def build_app(args: dict) -> Application:
    """The application builder of `serve run infra/serve/shopguide.yaml` (Ray passes the YAML `args`)."""
    return compose_app(AppArgs(**(args or {})))


def compose_app(args: AppArgs, deployment_options: dict[str, dict] | None = None) -> Application:
    """The shopguide application; deployment_options: deployment name -> `.options(...)` (how
    `shopguide serve` applies the YAML's `deployments:` section, which `serve run` applies itself)."""
    options = deployment_options or {}
    check_recommender_replicas(args.qdrant_url, options.get(RecommenderDeployment.name, {}))
    paths = resolve_paths(args)
    encoders = json.loads((Path(paths["data_dir"]) / MANIFEST).read_text())["encoders"]
    api_key = args.api_key or os.environ.get(args.api_key_env) or None
    if api_key is None:
        log.warning("no API key: POST /events and DELETE /users are open to anyone who can reach the port")

    def configured(deployment):
        return deployment.options(**options[deployment.name]) if deployment.name in options else deployment

    recommender = configured(RecommenderDeployment).bind(paths)
    # The towers follow the live manifest (a re-embed may change them); see serving/towers.py.
    text = configured(TextEncoderDeployment).bind(
        encoders["text_encoder"], encoders.get("text_encoder_args", {}), paths["data_dir"]
    )
    image = configured(ImageEncoderDeployment).bind(
        encoders["image_encoder"], encoders.get("image_encoder_args", {}), paths["data_dir"]
    )
    return configured(Ingress).bind(recommender, text, image, api_key)

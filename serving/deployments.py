"""Ray Serve deployments: thin shells over the plain recommender, the query encoders and the FastAPI app.

Layout (knobs in infra/serve/shopguide.yaml): `Ingress` (FastAPI, any number of replicas) calls
`Recommender` (owns the index and the event store: exactly one replica on the embedded index, any
number against a Qdrant server) and two batched encoders, `TextEncoder` and `ImageEncoder`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serving.api import ApiSettings, create_app
from training.ingest import MANIFEST

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
    qdrant_api_key_env: str | None = None  # environment variable holding the Qdrant API key
    sequence_model: str | None = None  # default: DATA_DIR/models/sequence when it exists
    events_db: str | None = None  # default: DATA_DIR/events.db
    api_key_env: str = API_KEY_ENV  # writes need this key when the variable is set
    api_key: str | None = None  # set by `shopguide serve` in-process; never put a key in the YAML


def resolve_paths(args: AppArgs) -> dict:
    """Absolute paths for the replicas (their working directory is not the caller's)."""
    data_dir = Path(args.data_dir).expanduser().resolve()
    if not (data_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"no index in {data_dir}: run `shopguide ingest --data-dir {data_dir}` first")
    sequence = Path(args.sequence_model).expanduser().resolve() if args.sequence_model else None
    if sequence is None and (data_dir / "models" / "sequence" / "sequence_model.pt").is_file():
        sequence = data_dir / "models" / "sequence"
    events_db = Path(args.events_db).expanduser().resolve() if args.events_db else data_dir / "events.db"
    qdrant_key = os.environ.get(args.qdrant_api_key_env) if args.qdrant_api_key_env else None
    return {
        "data_dir": str(data_dir),
        "qdrant_url": args.qdrant_url,
        "qdrant_api_key": qdrant_key,
        "sequence_model": str(sequence) if sequence else None,
        "events_db": str(events_db),
    }


def build_recommender(paths: dict) -> Any:
    """The plain Recommender for these paths (also used by tests and `shopguide serve --no-ray`)."""
    from index import open_store
    from serving.event_store import SQLiteEventStore
    from serving.recommend import Recommender

    data_dir = Path(paths["data_dir"])
    store = open_store(data_dir / "index", paths.get("qdrant_url"), paths.get("qdrant_api_key"))
    events = SQLiteEventStore(paths["events_db"])
    sequence = Path(paths["sequence_model"]) if paths.get("sequence_model") else None
    return Recommender(data_dir, store, events, sequence)


@serve.deployment(name="Recommender")
class RecommenderDeployment:
    """Owns the index and the event store; the embedded index allows exactly one replica."""

    def __init__(self, paths: dict) -> None:
        self.recommender = build_recommender(paths)

    def reconfigure(self, config: dict) -> None:
        self.recommender.reconfigure(config)

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


def _limit_threads() -> None:
    # Each encoder replica is one process; more torch threads than cores only adds contention.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    """Raw text-encoder features for queries, batched across concurrent requests."""

    def __init__(self, name: str, args: dict) -> None:
        from encoders import get_text_encoder

        _limit_threads()
        self.encoder = get_text_encoder(name, **args)

    def reconfigure(self, config: dict) -> None:
        self.encode.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.encode.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.002)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_texts(texts))


@serve.deployment(name="ImageEncoder")
class ImageEncoderDeployment:
    """Raw image-encoder features for uploaded photos (already validated and decoded by the ingress)."""

    def __init__(self, name: str, args: dict) -> None:
        from encoders import get_image_encoder

        _limit_threads()
        self.encoder = get_image_encoder(name, **args)

    def reconfigure(self, config: dict) -> None:
        self.encode.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self.encode.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, images: list[Any]) -> list[np.ndarray]:
        return list(self.encoder.encode_images(images))


class RayBackend:
    """The api.Backend over deployment handles."""

    def __init__(
        self, recommender: DeploymentHandle, text: DeploymentHandle, image: DeploymentHandle
    ) -> None:
        self.recommender = recommender
        self.text = text
        self.image = image

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.recommender.call.remote(method, args, kwargs)

    async def text_features(self, text: str) -> np.ndarray:
        return await self.text.encode.remote(text)

    async def image_features(self, image: Any) -> np.ndarray:
        return await self.image.encode.remote(image)


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
        self._backend = RayBackend(recommender, text, image)
        self._settings = ApiSettings(api_key=api_key)

    def __serve_build_asgi_app__(self):  # Ray calls this after __init__ (late-bound ingress)
        return create_app(self._backend, self._settings)


def build_app(args: dict) -> Application:
    """The application builder of `serve run infra/serve/shopguide.yaml` (Ray passes the YAML `args`)."""
    return compose_app(AppArgs(**(args or {})))


def compose_app(args: AppArgs, deployment_options: dict[str, dict] | None = None) -> Application:
    """The shopguide application; deployment_options: deployment name -> `.options(...)` (how
    `shopguide serve` applies the YAML's `deployments:` section, which `serve run` applies itself)."""
    paths = resolve_paths(args)
    encoders = json.loads((Path(paths["data_dir"]) / MANIFEST).read_text())["encoders"]
    api_key = args.api_key or os.environ.get(args.api_key_env) or None
    if api_key is None:
        log.warning("no API key: POST /events and DELETE /users are open to anyone who can reach the port")
    options = deployment_options or {}

    def configured(deployment):
        return deployment.options(**options[deployment.name]) if deployment.name in options else deployment

    recommender = configured(RecommenderDeployment).bind(paths)
    text = configured(TextEncoderDeployment).bind(
        encoders["text_encoder"], encoders.get("text_encoder_args", {})
    )
    image = configured(ImageEncoderDeployment).bind(
        encoders["image_encoder"], encoders.get("image_encoder_args", {})
    )
    return configured(Ingress).bind(recommender, text, image, api_key)

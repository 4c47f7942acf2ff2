"""The HTTP API (FastAPI): routes, request/response schemas, errors, auth and metrics over a Backend.

The app never touches models or the index itself: it calls a `Backend`, which is either plain objects
in this process (`LocalBackend`, for tests and a single process) or Ray Serve deployment handles
(`serving.deployments`). So every route is tested without Ray, and Ray only adds the process layout.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match

from index import KEYWORD_FIELDS, Filters, UnknownProductError
from serving.query import QueryParser
from serving.recommend import BadRequestError, NotFoundError, UnavailableError
from serving.uploads import MAX_UPLOAD_BYTES, UploadError, decode_upload
from training.events import EventError

log = logging.getLogger("shopguide.api")

MAX_EVENTS_PER_REQUEST = 1000
MAX_EVENTS_BODY_BYTES = 2 * 1024 * 1024
MAX_PRODUCT_UPDATE_BYTES = 16 * 1024  # {"price", "in_stock"} is a few bytes; nothing bigger is an update
MAX_QUERY_CHARS = 1000  # longer queries are refused with 422, not truncated silently
VOCABULARY_TTL_S = 300.0  # the query parser re-reads catalog values this often (catalog updates)
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the photo in a multipart body
STATIC_DIR = Path(__file__).parent / "static"  # the storefront: plain HTML, CSS and JS, no build step
# The storefront loads nothing from anywhere else; the browser enforces it too.
STOREFRONT_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# What a browser's visitor token may post: browsing signals about itself, never purchases (those come
# from the shop's backend, which holds the API key).
VISITOR_EVENT_TYPES = frozenset({"view", "click", "cart", "search"})
VISITOR_HEADER = "X-Visitor-Token"


class Backend(Protocol):
    """What the routes need: recommender methods, and raw features from the two query encoders."""

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def text_features(self, text: str) -> np.ndarray: ...

    async def image_features(self, image: Any) -> np.ndarray: ...


class LocalBackend:
    """A Backend over plain objects in this process; blocking work runs in worker threads."""

    def __init__(self, recommender: Any, text_encoder: Any = None, image_encoder: Any = None) -> None:
        self.recommender = recommender
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(
            functools.partial(getattr(self.recommender, method), *args, **kwargs)
        )

    async def text_features(self, text: str) -> np.ndarray:
        return await anyio.to_thread.run_sync(lambda: self.text_encoder.encode_texts([text])[0])

    async def image_features(self, image: Any) -> np.ndarray:
        return await anyio.to_thread.run_sync(lambda: self.image_encoder.encode_images([image])[0])


@dataclass
class ApiSettings:
    """Settings of the HTTP layer."""

    api_key: str | None = None  # required on writes when set (Authorization: Bearer KEY)
    max_upload_bytes: int = MAX_UPLOAD_BYTES


# ---- schemas ---------------------------------------------------------------------------------------
class ItemOut(BaseModel):
    product_id: str
    score: float
    title: str | None
    image_url: str
    price: float | None = None
    in_stock: bool | None = None
    reasons: list[str]
    # Feeds only: the probability that the feed's policy put this product in this slot, given the
    # slot's candidates (1.0 without exploration); logged with the request for off-policy evaluation.
    propensity: float | None = None


class Understood(BaseModel):
    filters: dict[str, Any]
    query: str
    matched: dict[str, list[str]] = {}
    corrections: dict[str, str] = {}


class RecommendationOut(BaseModel):
    request_id: str
    model_version: str
    mode: str | None = None
    user_id: str | None = None
    personalized: bool | None = None
    understood: Understood | None = None
    # Feeds only: the exploration policy that chose the slots, "greedy", "epsilon:E" or "thompson".
    policy: str | None = None
    # Feeds only, while an A/B test runs (RecommenderConfig.ab_versions): the shopper's arm, "A" or "B".
    arm: str | None = None
    items: list[ItemOut]


def check_user_id(user_id: str) -> str:
    """Refuse a shopper id that /users/{id} cannot address, so everything stored under it can be read
    and deleted there (DELETE forgets a shopper): a "/" (even sent as %2F) splits the path, and "." and
    ".." are dot segments that clients remove. Raises ValueError naming the id."""
    if "/" in user_id or user_id.strip() in (".", ".."):
        raise ValueError(
            f"user_id {user_id!r} cannot be used in /users/{{id}} URLs (no '/', not '.' or '..'); "
            "choose another id"
        )
    return user_id


class EventIn(BaseModel):
    """One shopper event (see training.events.Event)."""

    model_config = ConfigDict(extra="forbid")
    # Strict: JSON true must not become the id 1 (numeric ids are accepted and stored as strings).
    event_id: StrictStr | StrictInt
    user_id: StrictStr | StrictInt
    product_id: StrictStr | StrictInt | None = None
    type: Literal["view", "click", "cart", "purchase", "search"]
    query: str | None = None
    request_id: str | None = None
    ts: float | None = None

    @field_validator("user_id")
    @classmethod
    def _addressable(cls, user_id: str | int) -> str | int:
        if isinstance(user_id, str):
            check_user_id(user_id)
        return user_id


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class ProductUpdate(BaseModel):
    """A payload-only product change; at least one field."""

    model_config = ConfigDict(extra="forbid")
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    in_stock: StrictBool | None = None


class EventsAccepted(BaseModel):
    accepted: int
    duplicates: int


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


class VisitorOut(BaseModel):
    visitor_id: str
    token: str  # send as `X-Visitor-Token: <visitor_id>.<token>` with POST /events


class PageModuleOut(BaseModel):
    name: Literal["similar", "bought_together", "for_you"]
    title: str
    request_id: str  # events on this module's items carry it, so engagement is attributed to the module
    model_version: str
    interest: float  # predicted engagement per impression for this shopper (the order of the modules)
    items: list[ItemOut]


class PageOut(BaseModel):
    request_id: str
    user_id: str | None
    product: dict[str, Any]
    modules: list[PageModuleOut]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the error statuses a route really answers, each with the {"error", "detail"}
    body, so the OpenAPI schema (and clients generated from it) list exactly those. Every route that
    asks the recommender answers 503 while it starts; 422 is declared wherever FastAPI would otherwise
    document its own validation body, which this app never sends."""
    return {code: {"model": ErrorOut} for code in codes}


ERROR_RESPONSES = error_responses(400, 401, 403, 404, 413, 415, 422, 503)  # every status; prefer the above
# /metrics answers text/plain, and FastAPI documents a route's `model=` errors in the route's media type;
# its 503 is JSON like every error, so that one is spelled out.
METRICS_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "the recommender is starting",
        "content": {"application/json": {"schema": ErrorOut.model_json_schema()}},
    }
}


# ---- metrics ---------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app instance (its own registry, so tests and replicas never collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shopguide_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "shopguide_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.errors = Counter("shopguide_errors", "HTTP 5xx responses", ["route"], registry=self.registry)
        self.products = Gauge(
            "shopguide_index_products", "products in the live collection", registry=self.registry
        )
        self.events = Gauge("shopguide_events", "stored shopper events", registry=self.registry)
        self.models = Gauge(
            "shopguide_model_info",
            "model versions served (value 1)",
            ["component", "version"],
            registry=self.registry,
        )


# ---- helpers ---------------------------------------------------------------------------------------
def _message(exc: BaseException) -> str:
    # Exceptions raised in a Ray replica arrive wrapped; their str() is a remote traceback. The
    # original exception (with the message meant for the caller) is on `.cause`.
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def _error(status: int, error: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


# Dependencies are `async def` though they never await: FastAPI runs a plain `def` one in its thread
# pool, a thread hop and a GIL handover per request on the hot path.
async def filters_from(
    gender: list[str] = Query([], description="repeatable, e.g. gender=Men&gender=Unisex"),
    masterCategory: list[str] = Query([]),  # noqa: N803 - catalog column names, kept verbatim
    subCategory: list[str] = Query([]),  # noqa: N803
    articleType: list[str] = Query([]),  # noqa: N803
    baseColour: list[str] = Query([]),  # noqa: N803
    min_price: float | None = Query(None, ge=0, allow_inf_nan=False),
    max_price: float | None = Query(None, ge=0, allow_inf_nan=False),
    in_stock: bool | None = Query(None),
) -> Filters:
    return Filters(
        gender=tuple(gender),
        masterCategory=tuple(masterCategory),
        subCategory=tuple(subCategory),
        articleType=tuple(articleType),
        baseColour=tuple(baseColour),
        min_price=min_price,
        max_price=max_price,
        in_stock=in_stock,
    )


LIKE_MARKER = "<like>"  # serving.query marks filters taken from the `like` product with this "word"
FILTER_NAMES = {
    "baseColour": "colour",
    "articleType": "type",
    "subCategory": "category",
    "masterCategory": "category",
}


def _describe(key: str, value: Any) -> str:
    if key == "min_price":
        return f"price from {value:g}"
    if key == "max_price":
        return f"price up to {value:g}"
    if key == "in_stock":
        return "in stock" if value else "out of stock"
    return f"{FILTER_NAMES.get(key, key)} {', '.join(value)}"


def applied_filters(
    explicit: Filters, parsed: Any, like_title: str | None
) -> tuple[Filters, dict, list[str]]:
    """The filters a search applies: request parameters win over what was understood in the query.

    Returns (filters, their JSON form for `understood.filters`, one reason per applied filter saying
    where it came from), so the response never describes a filter it did not apply."""
    values: dict[str, Any] = {}
    reasons: list[str] = []
    for key in (*KEYWORD_FIELDS, "min_price", "max_price", "in_stock"):
        given = getattr(explicit, key)
        if given not in ((), None):
            values[key] = given
            reasons.append(f"{_describe(key, given)} (your filter)")
            continue
        found = parsed.filters.get(key)
        if found in (None, [], ()):
            continue
        values[key] = tuple(found) if isinstance(found, list) else found
        words = parsed.matched.get(key, [])
        origin = f"like {like_title}" if words == [LIKE_MARKER] else f"you asked for {' '.join(words)!r}"
        reasons.append(f"{_describe(key, values[key])} ({origin})")
    shown = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return Filters(**values), shown, reasons


def visitor_token(secret: bytes, visitor_id: str) -> str:
    """HMAC-SHA256 of the visitor id under the server's visitor secret, hex."""
    return hmac.new(secret, visitor_id.encode(), hashlib.sha256).hexdigest()


def visitor_secret(api_key: str | None) -> bytes | None:
    """The key visitor tokens are signed with: derived from the API key, so every ingress replica (and a
    restarted server) agrees; None without an API key (the app then uses a random per-process secret)."""
    return hashlib.sha256(b"visitor:" + api_key.encode()).digest() if api_key else None


def _parse_exclude(exclude: str | None) -> tuple[str, ...]:
    if not exclude:
        return ()
    ids = tuple(part.strip() for part in exclude.split(",") if part.strip())
    if len(ids) > 1000:
        raise BadRequestError("exclude holds more than 1000 product ids")
    return ids


def _route_label(scope: dict, root_path: str = "") -> str:
    """The route template ("/products/{product_id}/similar"): bounded label values for metrics."""
    route = scope.get("route")
    if route is None:  # answered before routing (e.g. a refused body), or a mount (the static files)
        # A mount has rewritten root_path in this scope; match against the path as it arrived.
        arrived = {**scope, "root_path": root_path}
        for candidate in scope["app"].router.routes:
            if candidate.matches(arrived)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", "unmatched")


def body_limit(method: str, path: str, settings: ApiSettings) -> int | None:
    """The most bytes a request body may have on this route; None where no route reads the body.

    Checked twice: from Content-Length before the app runs (ObserveMiddleware), and while the body
    streams in (each route's `max_body_size`), so a chunked body cannot get around it."""
    if path == "/events":
        return MAX_EVENTS_BODY_BYTES
    if path == "/search/image":
        return settings.max_upload_bytes + MULTIPART_OVERHEAD
    if method == "PATCH" and path.startswith("/products/"):
        return MAX_PRODUCT_UPDATE_BYTES
    return None


class ObserveMiddleware:
    """Refuses oversized bodies from their declared length, turns crashes into a JSON 500 with an id
    to find in the log, and counts every request (route, method, status) with its latency."""

    def __init__(self, app: Any, metrics: Metrics, settings: ApiSettings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_observed(message: dict) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        root_path = scope.get("root_path", "")
        limit = body_limit(scope.get("method", ""), scope["path"], self.settings)
        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if limit is not None and length.isdigit() and int(length) > limit:
                refused = _error(
                    413, "request too large", f"the body is {int(length):,} bytes; the limit is {limit:,}"
                )
                await refused(scope, receive, send_observed)
            else:
                await self.app(scope, receive, send_observed)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            # The route template, not the path: a path holds shopper ids, which a log must not keep
            # after the shopper is forgotten (DELETE /users/{id}).
            where = _route_label(scope, root_path)
            log.exception("unhandled error %s on %s %s", error_id, scope.get("method"), where)
            if response_started:
                raise
            crash = _error(500, "internal error", f"error id {error_id}; the server log has the details")
            await crash(scope, receive, send_observed)
        route = _route_label(scope, root_path)
        self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        if status >= 500:
            self.metrics.errors.labels(route).inc()


# ---- the app ---------------------------------------------------------------------------------------
def create_app(backend: Backend | None = None, settings: ApiSettings | None = None) -> FastAPI:
    """The shopguide HTTP API. `backend` may be attached later as `app.state.backend` (Ray ingress)."""
    settings = settings or ApiSettings()
    app = FastAPI(
        title="shopguide",
        version="1",
        description="Similar items, personalized feeds, text and image search, and shopper events.",
    )
    app.state.backend = backend
    app.state.settings = settings
    metrics = Metrics()
    parser_state: dict[str, Any] = {"parser": None, "loaded": 0.0}
    parser_lock = asyncio.Lock()
    bearer = HTTPBearer(auto_error=False, description="the server's API key")
    process_secret = secrets.token_bytes(32)  # signs visitor tokens when there is no API key

    def signing_secret() -> bytes:
        # Read per request: tests (and a reconfigured ingress) may swap the settings.
        return visitor_secret(app.state.settings.api_key) or process_secret

    async def get_backend(request: Request) -> Backend:
        found = request.app.state.backend
        if found is None:
            raise StarletteHTTPException(503, "the recommender is starting; retry shortly")
        return found

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = app.state.settings.api_key
        if not key:
            return
        if credentials is None:
            raise StarletteHTTPException(
                401,
                "this endpoint needs `Authorization: Bearer <API key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Constant-time comparison: response time must not reveal how much of a guess was right.
        if not hmac.compare_digest(credentials.credentials.encode(), key.encode()):
            raise StarletteHTTPException(403, "the API key is not valid")

    async def authorize_events(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        visitor: str | None = Header(
            None,
            alias=VISITOR_HEADER,
            description="`<visitor_id>.<token>` from GET /visitor: a browser's own browsing events only",
        ),
    ) -> str | None:
        """Who may write this batch: None for the API key's holder (anything), else the visitor id whose
        own view/click/cart/search events it may post (checked against the body in the route)."""
        key = app.state.settings.api_key
        if not key or credentials is not None:
            await require_key(credentials)
            return None
        if visitor is None:
            raise StarletteHTTPException(
                401,
                f"this endpoint needs `Authorization: Bearer <API key>`, or `{VISITOR_HEADER}: "
                "<visitor_id>.<token>` from GET /visitor for a browser's own events",
                headers={"WWW-Authenticate": "Bearer"},
            )
        visitor_id, _, token = visitor.rpartition(".")
        expected = visitor_token(signing_secret(), visitor_id)
        # Constant-time, as for the API key; a malformed header compares against the real digest too.
        if not visitor_id or not hmac.compare_digest(token.encode(), expected.encode()):
            raise StarletteHTTPException(
                403, "the visitor token is not valid; get a new one from GET /visitor"
            )
        return visitor_id

    async def query_parser(backend: Backend) -> QueryParser:
        async with parser_lock:
            if parser_state["parser"] is None or time.monotonic() - parser_state["loaded"] > VOCABULARY_TTL_S:
                payloads = await backend.call("payloads")
                parser_state["parser"] = await anyio.to_thread.run_sync(QueryParser.from_payloads, payloads)
                parser_state["loaded"] = time.monotonic()
        return parser_state["parser"]

    # ---- middleware and errors ---------------------------------------------------------------------
    # Plain ASGI, not @app.middleware: Starlette's BaseHTTPMiddleware costs about a millisecond per
    # request per middleware, a tenth of the similar-items budget.
    app.add_middleware(ObserveMiddleware, metrics=metrics, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        problems = []
        malformed = in_body = False
        for err in exc.errors():
            malformed |= err.get("type") == "json_invalid"
            in_body |= tuple(err.get("loc", ()))[:1] == ("body",)
            where = ".".join(str(part) for part in err.get("loc", ()))
            problems.append(f"{where}: {err.get('msg')}")
        if malformed:
            return _error(400, "malformed JSON", problems)
        content_type = request.headers.get("content-type", "")
        if in_body and "json" not in content_type:
            # FastAPI reads a body without a JSON content type as bytes: say what it needs.
            problems.append(
                f"the body was sent as {content_type or 'no content type'!r}; send JSON with "
                "`Content-Type: application/json`"
            )
        return _error(422, "invalid request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        names = {
            400: "malformed JSON",
            401: "unauthorized",
            403: "forbidden",
            404: "not found",
            405: "method not allowed",
            413: "request too large",
            503: "unavailable",
        }
        detail = exc.detail
        if exc.status_code == 413:  # a route's max_body_size, counted while the body streamed in
            limit = body_limit(request.method, request.scope["path"], app.state.settings)
            detail = f"the body is over the limit of {limit or 0:,} bytes; send less (or split it)"
        elif exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words for a JSON body that does not decode (bad UTF-8, or nested too deeply).
            detail = (
                "the body could not be read as JSON (invalid UTF-8, or nested too deeply); send UTF-8 JSON"
            )
        return _error(
            exc.status_code, names.get(exc.status_code, "error"), detail, getattr(exc, "headers", None)
        )

    @app.exception_handler(BadRequestError)
    @app.exception_handler(EventError)
    async def on_bad_request(request: Request, exc: Exception):
        return _error(422, "invalid request", _message(exc))

    @app.exception_handler(NotFoundError)
    @app.exception_handler(UnknownProductError)
    async def on_not_found(request: Request, exc: Exception):
        return _error(404, "not found", _message(exc))

    @app.exception_handler(UnavailableError)
    async def on_unavailable(request: Request, exc: Exception):
        return _error(503, "unavailable", _message(exc), {"Retry-After": "1"})

    @app.exception_handler(VisitorForbiddenError)
    async def on_visitor_forbidden(request: Request, exc: VisitorForbiddenError):
        return _error(403, "forbidden", str(exc))

    @app.exception_handler(UploadError)
    async def on_upload(request: Request, exc: UploadError):
        names = {413: "upload too large", 415: "not an image", 422: "unreadable image"}
        return _error(exc.status, names.get(exc.status, "bad upload"), _message(exc))

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"], responses=error_responses(503))
    async def healthz(backend: Backend = Depends(get_backend)) -> dict:
        """Liveness of the whole path: the recommender answers with its index size and model versions."""
        return {"status": "ok", **(await backend.call("health"))}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=METRICS_ERRORS)
    async def prometheus(backend: Backend = Depends(get_backend)) -> Response:
        """Prometheus text: requests and latency per route, 5xx errors, index size, model versions."""
        stats = await backend.call("stats")
        metrics.products.set(stats["products"])
        metrics.events.set(stats["events"])
        metrics.models.clear()
        for component, version in stats["model_versions"].items():
            metrics.models.labels(component, version).set(1)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/products/{product_id}", tags=["catalog"], responses=error_responses(404, 422, 503))
    async def product(product_id: str, backend: Backend = Depends(get_backend)) -> dict:
        """The product's attributes (title, price, stock, category, colour, ...)."""
        return await backend.call("product", product_id)

    @app.get(
        "/products/{product_id}/image",
        tags=["catalog"],
        responses=error_responses(404, 422, 503),
        response_class=FileResponse,
    )
    async def product_image(product_id: str, backend: Backend = Depends(get_backend)) -> FileResponse:
        """The product photo (JPEG)."""
        path = await backend.call("image_path", product_id)
        return FileResponse(path, media_type="image/jpeg")

    @app.get(
        "/products/{product_id}/similar",
        tags=["recommendations"],
        response_model=RecommendationOut,
        responses=error_responses(404, 422, 503),
    )
    async def similar(
        product_id: str,
        k: int = Query(10, ge=1, le=1000),
        mode: Literal["fused", "image", "text", "behavior"] = "fused",
        diversity: float = Query(0.0, ge=0, le=1),
        exclude: str | None = Query(None, description="comma-separated product ids to leave out"),
        filters: Filters = Depends(filters_from),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """Products similar to this one (look and description, look, description, or co-engagement)."""
        return await backend.call("similar", product_id, k, mode, diversity, _parse_exclude(exclude), filters)

    @app.get(
        "/search", tags=["search"], response_model=RecommendationOut, responses=error_responses(404, 422, 503)
    )
    async def search(
        q: str = Query("", max_length=MAX_QUERY_CHARS, description="a query or a question"),
        k: int = Query(10, ge=1, le=1000),
        mode: Literal["fused", "image", "text"] = "fused",
        like: str | None = Query(None, description="a product id: 'something like this but in blue'"),
        diversity: float = Query(0.0, ge=0, le=1),
        filters: Filters = Depends(filters_from),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """Text search that understands attribute words and price phrases (`understood` says how)."""
        if not q.strip() and like is None:
            raise BadRequestError("give a query `q` (or a product id in `like`)")
        parser = await query_parser(backend)
        like_payload = await backend.call("product", like) if like else None
        understood = parser.parse(q, like=like_payload)
        like_title = like_payload.get("title", like) if like_payload else None
        merged, shown, filter_reasons = applied_filters(filters, understood, like_title)
        # With every word turned into a filter, the semantic query is the phrase of the filters actually
        # applied (a request parameter may have replaced one the words asked for).
        text = understood.remainder.strip() or QueryParser.canonical_phrase(shown, understood.matched)
        understood_dict = {
            "filters": shown,
            "query": text,
            "matched": {
                key: [f"like {like}" if w == LIKE_MARKER else w for w in words]
                for key, words in understood.matched.items()
            },
            "corrections": understood.corrections,
        }
        features = await backend.text_features(text) if text else None
        reasons = [f"matches your search {text!r}"] if text else []
        if like is not None:
            reasons.insert(0, f"like {like_title}")
        reasons += filter_reasons
        return await backend.call(
            "search",
            k=k,
            mode=mode,
            filters=merged,
            diversity=diversity,
            reasons=reasons,
            understood=understood_dict,
            text_features=features,
            like=like,
        )

    @app.post(
        "/search/image",
        tags=["search"],
        response_model=RecommendationOut,
        responses=error_responses(413, 415, 422, 503),
        max_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def search_image(
        request: Request,
        k: int = Query(10, ge=1, le=1000),
        mode: Literal["fused", "image", "text"] = "fused",
        diversity: float = Query(0.0, ge=0, le=1),
        filters: Filters = Depends(filters_from),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """Photo search: multipart field `image` (JPEG, PNG, GIF, BMP, WEBP; at most 10 MB)."""
        data = await _read_photo(request, app.state.settings.max_upload_bytes)
        image = await anyio.to_thread.run_sync(decode_upload, data, app.state.settings.max_upload_bytes)
        features = await backend.image_features(image)
        return await backend.call(
            "search",
            k=k,
            mode=mode,
            filters=filters,
            diversity=diversity,
            reasons=["looks like your photo"],
            image_features=features,
        )

    @app.get(
        "/users/{user_id}/feed",
        tags=["recommendations"],
        response_model=RecommendationOut,
        responses=error_responses(422, 503),
    )
    async def feed(
        user_id: str,
        k: int = Query(10, ge=1, le=1000),
        diversity: float = Query(0.0, ge=0, le=1),
        filters: Filters = Depends(filters_from),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """The shopper's personalized feed (cold start for a shopper with no events); purchases excluded.

        Each item's `propensity` and the response's `policy` say how exploration chose the slots (the
        recommender's `explore_policy`); every slot is logged with them under the response's request_id."""
        return await backend.call("feed", user_id, k, diversity, filters)

    @app.post(
        "/events",
        tags=["events"],
        response_model=EventsAccepted,
        responses=error_responses(400, 401, 403, 413, 422, 503),
        max_body_size=MAX_EVENTS_BODY_BYTES,
    )
    async def post_events(
        request: Request,
        body: EventsIn,
        visitor_id: str | None = Depends(authorize_events),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """Record shopper events; idempotent by event_id, durable once acknowledged.

        With the API key: any events. With a visitor token (GET /visitor): only that visitor's own
        view, click, cart and search events; anything else refuses the whole batch with 403."""
        if visitor_id is not None:
            check_visitor_events(visitor_id, body.events)
        events = [event.model_dump(exclude_unset=True) for event in body.events]
        return await backend.call("add_events", events)

    @app.get("/visitor", tags=["events"], response_model=VisitorOut)
    async def visitor() -> dict:
        """A new anonymous visitor id and its token, so a browser can post its own browsing events
        without the API key (keep both; the token is only valid for this id)."""
        visitor_id = f"v-{secrets.token_hex(8)}"
        return {"visitor_id": visitor_id, "token": visitor_token(signing_secret(), visitor_id)}

    @app.get("/catalog/facets", tags=["catalog"], responses=error_responses(503))
    async def facets(backend: Backend = Depends(get_backend)) -> dict[str, list[str]]:
        """The values of each filter field in the catalog (gender, masterCategory, subCategory,
        articleType, baseColour), for filter menus."""
        return await backend.call("vocabulary")

    @app.get(
        "/catalog/popular",
        tags=["catalog"],
        response_model=RecommendationOut,
        responses=error_responses(422, 503),
    )
    async def popular(
        k: int = Query(24, ge=1, le=1000),
        filters: Filters = Depends(filters_from),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """Browse: the products passing the filters, most popular first (the storefront's home grid)."""
        return await backend.call("search", k=k, filters=filters)

    @app.get(
        "/products/{product_id}/page",
        tags=["recommendations"],
        response_model=PageOut,
        responses=error_responses(404, 422, 503),
    )
    async def product_page(
        product_id: str,
        user_id: str | None = Query(None, min_length=1, max_length=200),
        k: int = Query(8, ge=1, le=100),
        backend: Backend = Depends(get_backend),
    ) -> dict:
        """The product page's modules (similar items, frequently bought together, for you), each with
        its items, reasons and request_id, ordered by this shopper's predicted interest in each: engagement
        per impression on past pages, shrunk towards the module's rate over all shoppers (README)."""
        if user_id is not None:  # impressions are stored under it: it must be deletable
            try:
                check_user_id(user_id)
            except ValueError as exc:
                raise BadRequestError(str(exc)) from None
        return await backend.call("page", product_id, user_id, k)

    # ---- the storefront ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def storefront() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": STOREFRONT_CSP, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/users/{user_id}/events", tags=["events"], responses=error_responses(422, 503))
    async def user_events(
        user_id: str, limit: int = Query(50, ge=1, le=10_000), backend: Backend = Depends(get_backend)
    ) -> dict:
        """The shopper's stored events, newest first."""
        return await backend.call("user_events", user_id, limit)

    @app.patch(
        "/products/{product_id}",
        tags=["catalog"],
        responses=error_responses(400, 401, 403, 404, 413, 422, 503),
        dependencies=[Depends(require_key)],
        max_body_size=MAX_PRODUCT_UPDATE_BYTES,
    )
    async def update_product(
        product_id: str, body: ProductUpdate, backend: Backend = Depends(get_backend)
    ) -> dict:
        """Change a product's price and/or stock (payload only: its vectors stay); the next query sees it."""
        return await backend.call("update_product", product_id, body.model_dump(exclude_unset=True))

    @app.delete(
        "/users/{user_id}",
        tags=["events"],
        responses=error_responses(401, 403, 422, 503),
        dependencies=[Depends(require_key)],
    )
    async def delete_user(user_id: str, backend: Backend = Depends(get_backend)) -> dict:
        """Forget a shopper: their events, history and cached vectors."""
        return await backend.call("delete_user", user_id)

    return app


class VisitorForbiddenError(Exception):
    """A visitor token was used for events it may not post."""


def check_visitor_events(visitor_id: str, events: list[EventIn]) -> None:
    """A visitor posts only its own browsing events: the whole batch is refused otherwise."""
    for position, event in enumerate(events):
        if str(event.user_id) != visitor_id:
            raise VisitorForbiddenError(
                f"events[{position}] is for user {str(event.user_id)!r}; a visitor token ({visitor_id}) "
                "may only post events for its own visitor id. Nothing was stored"
            )
        if event.type not in VISITOR_EVENT_TYPES:
            raise VisitorForbiddenError(
                f"events[{position}] is a {event.type}; a visitor token may only post "
                f"{', '.join(sorted(VISITOR_EVENT_TYPES))} events (others need the API key). "
                "Nothing was stored"
            )


async def _read_photo(request: Request, max_bytes: int) -> bytes:
    """The `image` part of a multipart body, reading at most max_bytes (+ multipart overhead)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, "send the photo as multipart/form-data with the field `image`")
    limit = max_bytes + MULTIPART_OVERHEAD
    received = 0

    async def bounded() -> AsyncIterator[bytes]:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:  # a chunked upload without Content-Length: stop reading here
                raise UploadError(413, f"the upload is over the limit of {max_bytes:,} bytes")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, bounded(), max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise UploadError(422, f"malformed multipart body: {exc.message}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise UploadError(422, "the multipart body has no file field `image`")
    data = await upload.read()
    await upload.close()
    return data

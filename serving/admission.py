"""Admission at the HTTP front door: a bounded number of requests at a time, more while a backend is down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

log = logging.getLogger("shopguide.admission")

ADMISSION_ENV = "SHOPGUIDE_ADMISSION"  # JSON of AdmissionConfig fields, e.g. {"admit": 64}
# Requests the gate may send twice when their ingress replica died with them: reads, and the writes the
# API makes idempotent (serving/api.py): events by event_id, PATCH sets absolute values, a shopper
# deleted twice is deleted. (method, path or path prefix ending in "/").
REPLAYABLE_WRITES = (
    ("POST", "/events"),
    ("POST", "/search/image"),
    ("PATCH", "/products/"),
    ("DELETE", "/users/"),
)
# The most request body kept for a second attempt: an events batch at its limit (MAX_EVENTS_BODY_BYTES
# in serving/api.py). A bigger one (a large photo) is not replayed.
REPLAY_BODY_BYTES = 2 << 20
# Ray Serve calls this function in its HTTP proxy for the proxy's ASGI middlewares.
PROXY_CALLBACK = "serving.admission:proxy_middlewares"


@dataclass(frozen=True)
class AdmissionConfig:
    """What the front door admits (`$SHOPGUIDE_ADMISSION`, JSON; unknown keys are errors)."""

    # Normally: requests in the server at once; beyond them 503 + Retry-After at once. 96 = what Ray's
    # slots admitted before this gate (2 ingress replicas x 16 running + 64 queued at the proxy).
    admit: int = 96
    # While the backend is down (a Recommender replica restarting) and until its backlog drains: a
    # restart takes ~7 s, and at 84 req/s that is ~600 requests that wait for the successor instead of
    # being refused (`make soak`). Each waiting request is a few KB. Ray's own slots must hold this
    # many: the Ingress' num_replicas x max_ongoing_requests (2 x 512 in the YAML).
    admit_during_outage: int = 1024
    # The most an outage may hold the wider door open; a backend down for longer is a real outage, and
    # refusing is then the honest answer.
    outage_hold_s: float = 30.0
    # Requests out and no answer for this long (while this process itself kept up): the backend is down.
    stall_s: float = 1.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.admit <= self.admit_during_outage:
            raise ValueError(
                f"admission needs 1 <= admit <= admit_during_outage, got {self.admit} and "
                f"{self.admit_during_outage}"
            )
        if min(self.outage_hold_s, self.stall_s, self.retry_after_s) < 0:
            raise ValueError("outage_hold_s, stall_s and retry_after_s must be >= 0")

    @classmethod
    def from_json(cls, text: str | None, source: str = f"${ADMISSION_ENV}") -> AdmissionConfig:
        """The config a JSON object names (missing keys keep their defaults); None or "" = defaults."""
        if not text:
            return cls()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not JSON ({exc}): {text!r}") from None
        fields = cls.__dataclass_fields__
        if not isinstance(values, dict) or set(values) - set(fields):
            raise ValueError(f"{source} must be a JSON object with keys from {sorted(fields)}, got {text!r}")
        for key, value in values.items():
            # A count or Retry-After's whole seconds must be an integer; the durations may be 0.5.
            kinds = (int, float) if isinstance(fields[key].default, float) else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(
                    f"{source}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}"
                )
        return cls(**values)


class AdmissionGate:
    """Pure ASGI middleware in front of the whole server (Ray Serve's HTTP proxy) that refuses what
    the server should not take on, with 503 + Retry-After, before any work is spent on it.

    Normally it admits `admit` requests at once. When requests are out and no answer has come back for
    `stall_s` (a dead Recommender: the ingress holds its calls until Ray has started a successor),
    it admits up to `admit_during_outage`, so the requests that arrive meanwhile wait for the successor
    instead of being refused, until answers flow again and the backlog has drained to half of `admit`,
    or `outage_hold_s` has passed. A stall only counts while this process' own event loop kept up:
    under heavy overload the proxy itself can fall a second behind, which is not an outage.
    A GET or HEAD whose ingress replica died with it (Ray's proxy then has no answer at all) is asked
    once more. Ray's own endpoints (/-/healthz, /-/routes) pass untouched."""

    HEARTBEAT_S = 0.05
    HICCUP_S = 0.2  # a heartbeat this late: the loop was starved, and a silence says nothing then

    def __init__(
        self, app: Any, config: AdmissionConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.config = config or AdmissionConfig()
        self.clock = clock
        self.active = 0  # admitted requests not answered yet (their response not all sent)
        self.refused = 0
        self.replayed = 0  # requests asked again after their ingress replica died with them
        self._answered_at = clock()  # the last answer, or when requests went out after none were
        self._hiccup_at = float("-inf")  # the last time the event loop was late
        self._outage_from: float | None = None  # when the outage the door is open for began
        self._heartbeat: asyncio.Task | None = None

    def degraded_since(self) -> float | None:
        """When the backend went quiet (requests out, no answer for stall_s), or None."""
        if self.active == 0:
            return None
        quiet_from = max(self._answered_at, self._hiccup_at)
        return self._answered_at if self.clock() - quiet_from >= self.config.stall_s else None

    def limit(self) -> int:
        """How many requests may be in the server now."""
        config, now = self.config, self.clock()
        since = self.degraded_since()
        if self._outage_from is None and since is not None and now - since < config.outage_hold_s:
            self._outage_from = since
            log.warning(
                "no answer for %.1f s with %d requests out: admitting up to %d (not %d) for at most %g s",
                now - since,
                self.active,
                config.admit_during_outage,
                config.admit,
                config.outage_hold_s,
            )
        if self._outage_from is not None:
            # Half of admit, not admit: a backlog draining hovers around admit, and narrowing there
            # refused requests its tail still pushed up (`make soak`).
            drained = since is None and self.active <= config.admit // 2
            if drained or now - self._outage_from >= config.outage_hold_s:
                log.warning(
                    "%s after %.1f s: admitting %d again (%d refused so far)",
                    "backlog drained" if drained else "still no answer, the hold is over",
                    now - self._outage_from,
                    config.admit,
                    self.refused,
                )
                self._outage_from = None
        return config.admit_during_outage if self._outage_from is not None else config.admit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/-/"):
            await self.app(scope, receive, send)
            return
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        if self.active >= self.limit():
            self.refused += 1
            await self._refuse(scope, receive, send)
            return

        answered = False
        counted = True  # in `active` until its response is out (Ray's proxy returns up to ~0.1 s later)

        async def send_observed(message: dict) -> None:
            nonlocal answered, counted
            if message["type"] == "http.response.start":
                answered = True
                self._answered_at = self.clock()
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and counted:
                # Answered: its client may send the next request now, and that one must find room.
                counted = False
                self.active -= 1

        if self.active == 0:
            self._answered_at = self.clock()  # nothing was out: the silence starts now
        self.active += 1
        try:
            # Ray's proxy returns without a response when the ingress replica died with the request in
            # it (the server then answers a bare 500). A request that is safe to send twice (a read,
            # an idempotent write) is asked once more, and Ray routes it to a live replica.
            replay = _Replay(receive) if replayable(scope) else None
            await self.app(scope, replay or receive, send_observed)
            if not answered and replay is not None and replay.can_replay():
                self.replayed += 1
                log.warning(
                    "%s %s: its ingress replica died with it; asking again", scope["method"], scope["path"]
                )
                await self.app(scope, replay, send_observed)
        finally:
            if counted:
                self.active -= 1

    async def _beat(self) -> None:
        while True:
            due = self.clock() + self.HEARTBEAT_S
            await asyncio.sleep(self.HEARTBEAT_S)
            if self.clock() - due > self.HICCUP_S:
                self._hiccup_at = self.clock()

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        # The body every API error has (serving/api.py), rendered the same way.
        refusal = JSONResponse(
            {"error": "unavailable", "detail": "the server is at capacity; retry shortly"},
            status_code=503,
            headers={"Retry-After": str(self.config.retry_after_s)},
        )
        await refusal(scope, receive, send)


def replayable(scope: dict) -> bool:
    """Whether a request may be sent twice (see REPLAYABLE_WRITES)."""
    method, path = scope.get("method"), scope.get("path", "")
    if method in ("GET", "HEAD"):
        return True
    return any(
        method == m and (path.startswith(p) if p.endswith("/") else path == p) for m, p in REPLAYABLE_WRITES
    )


class _Replay:
    """The ASGI receive of a request, able to hand the request messages it read out once more."""

    def __init__(self, receive: Any) -> None:
        self.receive = receive
        self.read: list[dict] = []  # the http.request messages the first attempt read, in order
        self.size = 0
        self.pending: list[dict] = []
        self.disconnected = False

    async def __call__(self) -> dict:
        if self.pending:
            return self.pending.pop(0)
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            self.read.append(message)
            if self.size > REPLAY_BODY_BYTES:
                self.read.clear()  # it will not be replayed: keep nothing (a 50 MB upload is not held twice)
        elif message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    def can_replay(self) -> bool:
        """Whether another attempt makes sense (the client is still there, the body was small), and if
        so, rewind: the next reads return the request messages again, then the rest of the body, if
        the first attempt had not read it all."""
        if self.disconnected or self.size > REPLAY_BODY_BYTES:
            return False
        self.pending = self.read
        self.read = []  # the second attempt reads them again
        return True


def check_ingress_room(config: AdmissionConfig, ingress: dict, source: str = "the Serve config") -> None:
    """Refuse an Ingress whose Ray slots (`ingress`: its deployment options) hold fewer requests than
    the gate admits during an outage: Ray would refuse, at its proxy queue, what the gate means to
    let wait for a restarting replica."""
    replicas = ingress.get("num_replicas", 1)
    ongoing = ingress.get("max_ongoing_requests", 5)  # Ray Serve's default
    if isinstance(replicas, int) and replicas * ongoing < config.admit_during_outage:
        raise ValueError(
            f"{source} gives the Ingress {replicas} x {ongoing} request slots (num_replicas x "
            f"max_ongoing_requests), fewer than admit_during_outage {config.admit_during_outage} "
            f"(${ADMISSION_ENV}): raise max_ongoing_requests, or lower admit_during_outage"
        )


def gate_configured(environ: dict | None = None) -> bool:
    """Whether Ray's proxy on this node runs the gate (it reads the same environment as this process)."""
    environ = os.environ if environ is None else environ
    return PROXY_CALLBACK in environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "")


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback ($RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which `shopguide
    serve` sets to PROXY_CALLBACK): the admission gate, configured from $SHOPGUIDE_ADMISSION."""
    from starlette.middleware import Middleware

    from serving.ray_logs import log_to_serve_file

    log_to_serve_file(("shopguide.admission",))  # into the proxy's log file, beside Ray's own records
    # The entry point of the proxy process: Ray calls this with no arguments, so the environment
    # (set by `shopguide serve`, or by whoever runs `serve run`) is the only way in.
    config = AdmissionConfig.from_json(os.environ.get(ADMISSION_ENV))
    return [Middleware(AdmissionGate, config=config)]

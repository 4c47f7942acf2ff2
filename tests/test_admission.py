"""The admission gate: a narrow door normally, a wide one while the backend is down and its backlog drains."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.admission import (
    PROXY_CALLBACK,
    REPLAY_BODY_BYTES,
    AdmissionConfig,
    AdmissionGate,
    check_ingress_room,
    gate_configured,
    proxy_middlewares,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Held:
    """An ASGI app whose requests stay in flight until released (a backend that is slow or down)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def _request(gate: AdmissionGate, path: str = "/x") -> tuple[int, dict, bytes]:
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    await gate({"type": "http", "method": "GET", "path": path, "headers": []}, None, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def _gate(clock: Clock, **config) -> tuple[AdmissionGate, Held]:
    app = Held()
    return AdmissionGate(app, AdmissionConfig(**config), clock), app


def test_beyond_admit_a_request_is_refused_at_once_with_retry_after() -> None:
    async def scenario() -> None:
        gate, app = _gate(Clock(), admit=2, admit_during_outage=8)
        first = [asyncio.create_task(_request(gate)) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.active == 2
        status, headers, body = await _request(gate)  # answered while the two still wait
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(body) == {
            "error": "unavailable",
            "detail": "the server is at capacity; retry shortly",
        }
        assert gate.refused == 1
        app.release.set()
        assert [(await task)[0] for task in first] == [200, 200]
        assert gate.active == 0
        assert (await _request(gate))[0] == 200  # room again

    asyncio.run(scenario())


class Lingers:
    """Ray's proxy: it sends the whole response, then goes on with its own bookkeeping a while."""

    def __init__(self) -> None:
        self.done = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})
        await self.done.wait()


def test_a_request_stops_counting_once_its_response_is_out() -> None:
    async def scenario() -> None:
        app = Lingers()
        gate = AdmissionGate(app, AdmissionConfig(admit=1, admit_during_outage=1), Clock())
        first = asyncio.create_task(_request(gate))
        await asyncio.sleep(0)
        assert not first.done() and gate.active == 0  # answered; the proxy is still at work
        second = asyncio.create_task(_request(gate))  # its client's next request finds room
        await asyncio.sleep(0)
        app.done.set()
        assert [(await first)[0], (await second)[0]] == [200, 200] and gate.refused == 0
        assert gate.active == 0

    asyncio.run(scenario())


def test_a_silent_backend_opens_the_door_until_its_backlog_drains() -> None:
    async def scenario() -> None:
        clock = Clock()
        gate, app = _gate(clock, admit=4, admit_during_outage=8, stall_s=1, outage_hold_s=30)
        held = [asyncio.create_task(_request(gate)) for _ in range(4)]
        await asyncio.sleep(0)
        assert gate.degraded_since() is None and gate.limit() == 4  # out, but not for long
        clock.now += 0.5
        assert (await _request(gate))[0] == 503  # not yet an outage: the narrow door holds
        clock.now += 0.6  # 1.1 s with requests out and no answer: the backend is down
        assert gate.degraded_since() == 1000.0
        held += [asyncio.create_task(_request(gate)) for _ in range(4)]
        await asyncio.sleep(0)
        assert gate.active == 8 and gate.refused == 1  # these wait for the successor
        assert (await _request(gate))[0] == 503  # bounded even then
        app.release.set()  # the successor answers
        assert [(await task)[0] for task in held] == [200] * 8
        assert gate.degraded_since() is None and gate.limit() == 4  # answered, drained

    asyncio.run(scenario())


def test_the_door_narrows_only_once_the_backlog_is_down_to_half_of_admit() -> None:
    clock = Clock()
    gate, _ = _gate(clock, admit=4, admit_during_outage=8, stall_s=1)
    gate.active = 8
    clock.now += 2
    assert gate.limit() == 8  # down
    gate._answered_at = clock.now  # answers flow again; 8 still in the server
    assert gate.limit() == 8
    gate.active = 4
    assert gate.limit() == 8  # at admit: narrowing here would refuse the backlog's tail
    gate.active = 2
    assert gate.limit() == 4


def test_an_outage_holds_the_door_open_for_outage_hold_s_at_most() -> None:
    clock = Clock()
    gate, _ = _gate(clock, admit=2, admit_during_outage=6, stall_s=1, outage_hold_s=30)
    gate.active = 3
    clock.now += 1
    assert gate.limit() == 6
    clock.now += 28
    assert gate.limit() == 6
    clock.now += 1  # still no answer 30 s on: a real outage, so refuse instead of queueing more
    assert gate.limit() == 2
    clock.now += 100
    assert gate.limit() == 2  # the same silence does not reopen it
    gate._answered_at = clock.now  # an answer, then silence again: a new outage
    clock.now += 1
    assert gate.limit() == 6


def test_a_starved_event_loop_is_not_an_outage() -> None:
    async def scenario() -> None:
        clock = Clock()
        gate, app = _gate(clock, admit=2, admit_during_outage=6, stall_s=1)
        gate.HEARTBEAT_S = 0.01
        held = asyncio.create_task(_request(gate))
        await asyncio.sleep(0.02)
        clock.now += 5  # the loop was away for 5 s: the heartbeat comes late ...
        await asyncio.sleep(0.03)
        assert gate.degraded_since() is None  # ... so the silence says nothing
        for _ in range(12):  # but a silence the loop was awake for does: 1.2 s of timely beats
            clock.now += 0.1
            await asyncio.sleep(0.02)
        assert gate.degraded_since() is not None
        app.release.set()
        await held

    asyncio.run(scenario())


def test_rays_own_endpoints_and_other_scopes_pass_through() -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope.get("path", scope["type"]))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})

    gate = AdmissionGate(app, AdmissionConfig(admit=1, admit_during_outage=1))
    gate.active = 1  # full: an application request would be refused
    asyncio.run(gate({"type": "lifespan"}, None, None))
    assert asyncio.run(_request(gate, "/-/healthz"))[0] == 200
    assert asyncio.run(_request(gate, "/healthz"))[0] == 503
    assert seen == ["lifespan", "/-/healthz"]


class DiesWithRequests:
    """Ray's proxy when the ingress replica dies with the request in it: it has read the request and
    returns without a response, `dies` times; then it answers with what it read."""

    def __init__(self, dies: int) -> None:
        self.dies = dies
        self.calls = 0
        self.read: list[dict] = []

    async def __call__(self, scope: dict, receive, send) -> None:
        self.calls += 1
        body = b""
        while True:  # the whole body, as Ray's proxy hands it to the replica
            message = await receive()
            self.read.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.calls <= self.dies:
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def _once(
    gate: AdmissionGate, method: str, first: dict | list[dict], path: str = "/products/1/similar"
) -> list[dict]:
    """One request through the gate: the client sends `first` (one message or several), then it waits
    (connected)."""
    messages: list[dict] = []
    waiting = asyncio.Event()
    unsent = list(first) if isinstance(first, list) else [first]

    async def receive() -> dict:
        if unsent:
            return unsent.pop(0)
        await waiting.wait()  # a connected client: no disconnect while the server works
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    await gate({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    return messages


REQUEST = {"type": "http.request", "body": b"", "more_body": False}


def test_a_get_whose_ingress_replica_died_with_it_is_asked_again_once() -> None:
    app = DiesWithRequests(dies=1)
    gate = AdmissionGate(app, AdmissionConfig())
    messages = asyncio.run(_once(gate, "GET", REQUEST))
    assert messages[0]["status"] == 200 and app.calls == 2 and gate.replayed == 1
    assert app.read == [REQUEST, REQUEST]  # the second attempt read the request again
    assert gate.active == 0

    app = DiesWithRequests(dies=2)  # dead again: once is enough, the server answers its bare 500
    gate = AdmissionGate(app, AdmissionConfig())
    assert asyncio.run(_once(gate, "GET", REQUEST)) == [] and app.calls == 2 and gate.replayed == 1


def test_an_idempotent_write_is_asked_again_with_its_whole_body() -> None:
    chunks = [
        {"type": "http.request", "body": b'{"events": [{"event_id": "e1", ', "more_body": True},
        {
            "type": "http.request",
            "body": b'"user_id": "u1", "type": "view", "product_id": "101"}]}',
            "more_body": False,
        },
    ]
    for method, path in (("POST", "/events"), ("PATCH", "/products/101"), ("DELETE", "/users/u1")):
        app = DiesWithRequests(dies=1)
        gate = AdmissionGate(app, AdmissionConfig())
        messages = asyncio.run(_once(gate, method, chunks, path))
        assert messages[0]["status"] == 200 and app.calls == 2 and gate.replayed == 1, path
        assert messages[1]["body"] == chunks[0]["body"] + chunks[1]["body"]  # the same bytes, in order
        assert app.read == chunks + chunks


def test_other_writes_big_bodies_and_gone_clients_are_not_asked_again() -> None:
    post = {"type": "http.request", "body": b'{"events": []}', "more_body": False}
    photo = {"type": "http.request", "body": b"\xff" * (REPLAY_BODY_BYTES + 1), "more_body": False}
    for method, path, first in (
        ("POST", "/products/101", post),  # not an idempotent write of this API
        ("POST", "/events/x", post),
        ("POST", "/search/image", photo),  # too big to keep
        ("GET", "/products/1/similar", {"type": "http.disconnect"}),
    ):
        app = DiesWithRequests(dies=1)
        gate = AdmissionGate(app, AdmissionConfig())
        assert asyncio.run(_once(gate, method, first, path)) == []
        assert app.calls == 1 and gate.replayed == 0, (method, path)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="admit <= admit_during_outage"):
        AdmissionConfig(admit=10, admit_during_outage=5)
    with pytest.raises(ValueError, match="admit <= admit_during_outage"):
        AdmissionConfig(admit=0)
    with pytest.raises(ValueError, match=r"keys from \['admit', 'admit_during_outage', "):
        AdmissionConfig.from_json('{"admitt": 4}')
    with pytest.raises(ValueError, match="is not JSON"):
        AdmissionConfig.from_json("admit=4")
    assert AdmissionConfig.from_json(None) == AdmissionConfig.from_json("") == AdmissionConfig()
    with pytest.raises(ValueError, match="admit must be int, got '96'"):
        AdmissionConfig.from_json('{"admit": "96"}')
    with pytest.raises(ValueError, match="retry_after_s must be int, got 1.5"):
        AdmissionConfig.from_json('{"retry_after_s": 1.5}')
    config = AdmissionConfig.from_json('{"admit": 4, "stall_s": 0.5, "outage_hold_s": 20}')
    assert (config.admit, config.stall_s, config.outage_hold_s) == (4, 0.5, 20)


def test_the_ingress_must_hold_what_the_gate_admits() -> None:
    check_ingress_room(AdmissionConfig(), {"num_replicas": 2, "max_ongoing_requests": 512})
    with pytest.raises(ValueError, match=r"2 x 16 request slots .* fewer than admit_during_outage 1024"):
        check_ingress_room(AdmissionConfig(), {"num_replicas": 2, "max_ongoing_requests": 16})
    with pytest.raises(ValueError, match="1 x 5 request slots"):  # Ray's defaults
        check_ingress_room(AdmissionConfig(), {})


def test_the_proxy_callback_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPGUIDE_ADMISSION", '{"admit": 7, "admit_during_outage": 70}')
    (middleware,) = proxy_middlewares()
    assert middleware.cls is AdmissionGate
    assert middleware.kwargs["config"] == AdmissionConfig(admit=7, admit_during_outage=70)
    monkeypatch.setenv("SHOPGUIDE_ADMISSION", '{"admit": 0}')
    with pytest.raises(ValueError, match="admit <= admit_during_outage"):
        proxy_middlewares()


def test_whether_the_gate_is_configured_is_read_from_the_environment() -> None:
    assert gate_configured({"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK})
    assert not gate_configured({})
    assert not gate_configured({"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mine:callback"})

"""Nothing `shopguide serve` starts listens beyond loopback by default, Ray's own processes included.

Each test starts the real command in a process group of its own, lists the listening sockets of every
process in it (psutil), and stops it with SIGTERM. Ray Serve 2.60 binds every replica's
inter-deployment gRPC server to the wildcard address ("[::]:0", hard-coded in
ray/serve/_private/replica.py); `shopguide serve` moves it to loopback with a worker setup hook
(serving.server.replica_grpc_on_loopback), and this test demands loopback of it like of everything else.
Both tests also check the server's output and Ray's logs never held a shopper's id.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.serving_fixtures import API_KEY, serving_data_copy, tiny_ids

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHOPPER = "bind-privacy-shopper-c0ffee"  # must not appear in any log after the visit and the deletion
DEPLOYMENTS = {"Ingress", "Recommender", "TextEncoder", "ImageEncoder"}


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    process: str  # the process's command line, shortened

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} ({self.process})"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _process_group(leader: int) -> set[int]:
    """The server and everything it started: its session (it was started in a new one) and its
    descendants (in case a Ray process started a session of its own)."""
    pids = {leader}
    try:
        pids |= {child.pid for child in psutil.Process(leader).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader:
                pids.add(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _listeners(pids: set[int]) -> list[Listener]:
    """Listening TCP sockets and bound UDP sockets (IPv4 and IPv6) of these processes."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids or not conn.laddr:
            continue
        if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
            continue
        try:
            name = " ".join(psutil.Process(conn.pid).cmdline())[:120]
        except psutil.NoSuchProcess:
            continue
        found.append(Listener(conn.laddr.ip, conn.laddr.port, conn.pid, name))
    return found


def _settled_listeners(leader: int, timeout: float = 30) -> tuple[set[int], list[Listener]]:
    """The group's processes and listeners once two looks a second apart agree (a replica that has
    just reported ready may still be opening a port)."""
    deadline = time.monotonic() + timeout
    previous: set | None = None
    while True:
        pids = _process_group(leader)
        listeners = _listeners(pids)
        seen = {(x.ip, x.port, x.pid) for x in listeners}
        if seen == previous or time.monotonic() > deadline:
            return pids, listeners
        previous = seen
        time.sleep(1)


def _ray_logs_dir(pids: set[int]) -> Path | None:
    """This server's Ray session log folder, from the GCS server's command line."""
    for pid in pids:
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        for arg in args:
            if arg.startswith("--log_dir="):
                return Path(arg.split("=", 1)[1])
    return None


@contextmanager
def _serve(data_dir: Path, log: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`shopguide serve` in a new session, ready (GET /healthz answered 200); stopped with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "serving.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--port", str(port), "--api-key", API_KEY, *flags]
    # RAY_ADDRESS=local: always a cluster of its own, never one someone's `ray start` left running.
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in 300 s:\n{log.read_text()[-3000:]}"
            # Ready: the start-up line (printed once every deployment is up) and /healthz answering.
            if "shopguide is serving" in log.read_text(errors="replace"):
                try:
                    if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        yield process, base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        try:  # whatever Ray left behind in the group (a worker still exiting)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _visit_and_forget(base: str) -> None:
    """A shopper's events, feed and product page, then DELETE /users/{id}."""
    with httpx.Client(base_url=base, timeout=60) as http:
        events = [
            {"event_id": f"bind-{pid}", "user_id": SHOPPER, "product_id": pid, "type": "view"}
            for pid in tiny_ids("Red", "Handbags")[:3]
        ]
        assert http.post("/events", json={"events": events}, headers=AUTH).json()["accepted"] == 3
        assert http.get(f"/users/{SHOPPER}/feed", params={"k": 3}).json()["personalized"] is True
        assert http.get("/products/101/page", params={"user_id": SHOPPER, "k": 2}).status_code == 200
        assert http.get(f"/users/{SHOPPER}/feed", params={"k": 0}).status_code == 422  # a refusal too
        assert http.delete(f"/users/{SHOPPER}", headers=AUTH).json()["deleted_events"] == 3


def _files_holding(folder: Path, needle: str) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and needle.encode() in p.read_bytes()
    ]


def test_ray_serve_listens_on_loopback_only(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = serving_data_copy(tmp_path_factory, "bind-ray")
    log = data_dir.parent / "serve.log"
    with _serve(data_dir, log) as (process, base):
        pids, listeners = _settled_listeners(process.pid)
        logs_dir = _ray_logs_dir(pids)
        _visit_and_forget(base)
    processes = {listener.process for listener in listeners}
    # The test saw Ray's processes, not just the driver: GCS, raylet, agents, the Serve actors.
    for expected in (
        "gcs_server",
        "raylet",
        "ray::DashboardAgent",
        "ray::RuntimeEnvAgent",
        "ray::ProxyActor",
    ):
        assert any(expected in name for name in processes), (expected, sorted(processes))
    # "ray::ServeReplica:<app>:<deployment>[.<method it is running>]"
    replicas = {
        listener.pid: match.group(1)
        for listener in listeners
        if (match := re.match(r"ray::ServeReplica:[^:\s]+:(\w+)", listener.process))
    }
    assert set(replicas.values()) == DEPLOYMENTS, replicas
    api = [listener for listener in listeners if listener.port == int(base.rsplit(":", 1)[1])]
    assert [listener.ip for listener in api] == ["127.0.0.1"], [str(x) for x in api]

    # Nothing anywhere: not the replicas' gRPC servers, the GCS, raylet, object manager, workers,
    # agents, dashboard or exporters.
    exposed = [listener for listener in listeners if not is_loopback(listener.ip)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(map(str, exposed))

    assert logs_dir is not None and logs_dir.is_dir()
    assert SHOPPER not in log.read_text(errors="replace")
    assert not _files_holding(logs_dir, SHOPPER), "Ray's logs hold a shopper id"


def test_no_ray_listens_on_the_api_port_only(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = serving_data_copy(tmp_path_factory, "bind-no-ray")
    log = data_dir.parent / "serve.log"
    with _serve(data_dir, log, "--no-ray") as (process, base):
        _, listeners = _settled_listeners(process.pid)
        _visit_and_forget(base)
    port = int(base.rsplit(":", 1)[1])
    assert [(x.ip, x.port) for x in listeners] == [("127.0.0.1", port)], [str(x) for x in listeners]
    assert SHOPPER not in log.read_text(errors="replace")


def test_loopback_addresses_are_recognised() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "fe80::1"]))

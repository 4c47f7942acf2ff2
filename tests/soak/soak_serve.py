"""Overload soak and replica kills against the real `shopguide serve` (Ray Serve) on the full catalog.

One server, one run (`make soak`: about 5 minutes on 2 cores, most of it the fixed-length phases):
  1. unloaded p99: similar items, concurrency 1, 1000 requests;
  2. maximum throughput: similar items, closed loop at concurrency 16 for 15 s;
  3. 80% of the maximum, open loop (fixed-rate arrivals) for 60 s: p99 <= 3x unloaded, zero errors;
  4. 3x the maximum, open loop for 60 s: only 200 or 503 with Retry-After, peak RSS of the server's
     whole process tree (every 0.5 s), the server still alive;
  5. recovery: 50% of the maximum for 30 s: zero errors, p99 <= 3x unloaded;
  6. the Recommender replica SIGKILLed under 50% of the maximum (similar items and feeds): the time
     until requests succeed again and the errors among requests sent in the 10 s after the kill;
  7. the same for the Ingress replica (the proxy -> ingress hop).
Open-loop latency counts from each request's scheduled time, so a stalled server cannot hide behind a
client that waits for it (coordinated omission). The server runs on a private copy of the data dir, so
the soak neither writes into it nor collides with another server that owns its index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_serve import make_requests, seed_events  # noqa: E402
from tests.bench.common import (  # noqa: E402
    collector_paused,
    latency_histogram,
    start_server,
    stop_server,
    wait_ready,
    write_result,
)
from tests.soak.rss_sampler import RssSampler  # noqa: E402

# Process titles Ray gives the replicas (`ray::ServeReplica:<app>:<deployment>`).
RECOMMENDER_TITLE = "ServeReplica:shopguide:Recommender"
INGRESS_TITLE = "ServeReplica:shopguide:Ingress"
REQUEST_TIMEOUT_S = 30  # a request with no answer by then counts as an error (status 0)
SETTLED_S = 0.25  # /healthz answering within this after a kill: no backlog left


@dataclass
class Outcome:
    """One request: when it was due and done (monotonic seconds), what it was and what came back."""

    due: float
    done: float
    kind: str
    status: int  # HTTP status; 0 = no answer (connection refused or reset, or REQUEST_TIMEOUT_S)
    retry_after: str | None


def load() -> str:
    """The machine's 1/5/15-minute load averages, for every figure (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def request_stream(kinds: dict[str, int], product_ids: list[str], users: list[str], seed: int) -> Iterator:
    """(kind, path) forever, the kinds interleaved by weight (bench_serve's per-endpoint streams)."""
    rng = random.Random(seed)
    streams = {kind: make_requests(kind, product_ids, users, [], rng) for kind in kinds}
    order = [kind for kind, weight in kinds.items() for _ in range(weight)]
    while True:
        for kind in order:
            _, path, _ = next(streams[kind])
            yield kind, path


async def send(session: aiohttp.ClientSession, base: str, kind: str, path: str, due: float) -> Outcome:
    try:
        async with session.get(base + path) as response:
            await response.read()
            status, retry_after = response.status, response.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError):
        status, retry_after = 0, None
    return Outcome(due, time.monotonic(), kind, status, retry_after)


async def open_loop(
    session: aiohttp.ClientSession, base: str, stream: Iterator, rate: float, duration: float
) -> tuple[list[Outcome], float]:
    """Requests at a fixed rate for `duration` s whatever the server does; returns the outcomes and the
    client's worst lag behind its schedule (a lagging client under-loads the server: reported)."""
    start = time.monotonic()
    pending: list[asyncio.Task] = []
    worst_lag = 0.0
    for i in range(int(rate * duration)):
        due = start + i / rate
        ahead = due - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        else:
            worst_lag = max(worst_lag, -ahead)
        kind, path = next(stream)
        pending.append(asyncio.create_task(send(session, base, kind, path, due)))
    return list(await asyncio.gather(*pending)), worst_lag


async def closed_loop(
    session: aiohttp.ClientSession,
    base: str,
    stream: Iterator,
    concurrency: int,
    duration: float = float("inf"),
    requests: int | None = None,
) -> tuple[list[Outcome], float]:
    """`concurrency` clients, each sending its next request when the last one is answered, for
    `duration` s or `requests` requests in all."""
    outcomes: list[Outcome] = []
    start = time.monotonic()
    sent = 0

    async def client() -> None:
        nonlocal sent
        while time.monotonic() - start < duration and (requests is None or sent < requests):
            sent += 1
            kind, path = next(stream)
            outcomes.append(await send(session, base, kind, path, time.monotonic()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.monotonic() - start


def summarize(outcomes: list[Outcome], elapsed: float) -> dict:
    """Counts by status, latency of the successes (from when each was due) and their throughput."""
    ok_ms = np.array([(o.done - o.due) * 1000 for o in outcomes if o.status == 200])
    statuses = Counter(o.status for o in outcomes)
    shed = [o for o in outcomes if o.status == 503]
    return {
        "requests": len(outcomes),
        "ok": int(statuses[200]),
        "errors": len(outcomes) - int(statuses[200]),
        "status_counts": {str(status): n for status, n in sorted(statuses.items())},
        "shed_503": len(shed),
        "shed_503_without_retry_after": sum(1 for o in shed if not o.retry_after),
        "other_5xx": sum(n for status, n in statuses.items() if status >= 500 and status != 503),
        "no_answer": int(statuses[0]),
        "p50_ms": round(float(np.percentile(ok_ms, 50)), 2) if len(ok_ms) else None,
        "p99_ms": round(float(np.percentile(ok_ms, 99)), 2) if len(ok_ms) else None,
        "max_ms": round(float(ok_ms.max()), 2) if len(ok_ms) else None,
        "ok_throughput_rps": round(len(ok_ms) / elapsed, 1),
        "histogram_ms": latency_histogram(ok_ms) if len(ok_ms) else None,
    }


def cpu_seconds(server_pid: int) -> dict:
    """CPU seconds used so far by this client, the server's process tree and its HTTP proxy: where the
    2 cores went in a phase (the client shares them with the server)."""
    client = psutil.Process().cpu_times()
    tree = proxy = 0.0
    for process in [psutil.Process(server_pid), *psutil.Process(server_pid).children(recursive=True)]:
        try:
            used = sum(process.cpu_times()[:2])
            tree += used
            if "ProxyActor" in " ".join(process.cmdline()):
                proxy += used
        except psutil.NoSuchProcess:
            pass
    return {"client_cpu_s": client.user + client.system, "server_cpu_s": tree, "proxy_cpu_s": proxy}


def find_replica(server_pid: int, title: str) -> psutil.Process | None:
    """The replica process of the server's tree whose title (Ray sets `ray::<actor>`) holds `title`."""
    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            if title in " ".join(process.cmdline()):
                return process
        except psutil.NoSuchProcess:
            pass
    return None


async def kill_under_load(
    session: aiohttp.ClientSession,
    base: str,
    server_pid: int,
    title: str,
    stream: Iterator,
    rate: float,
    before: float,
    after: float,
) -> dict:
    """Open-loop load for before + after s; SIGKILL the replica titled `title` `before` s in."""
    victim = find_replica(server_pid, title)
    if victim is None:
        raise RuntimeError(f"no process titled {title!r} under the server (pid {server_pid}); is Ray up?")
    load_task = asyncio.create_task(open_loop(session, base, stream, rate, before + after))
    await asyncio.sleep(before)
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    outcomes, lag = await load_task
    successor = find_replica(server_pid, title)

    sent_after = [o for o in outcomes if o.due >= killed_at]
    first_ok = min((o.done for o in sent_after if o.status == 200), default=None)
    failed = [o for o in outcomes if o.status != 200]
    window = [o for o in sent_after if o.due < killed_at + 10]
    in_flight = [o for o in outcomes if o.due < killed_at <= o.done]
    result = {
        "replica": title,
        "killed_pid": victim.pid,
        "successor_pid": successor.pid if successor else None,
        "rate_rps": round(rate, 1),
        # From the kill until the first success of a request sent after it.
        "recovered_after_s": round(first_ok - killed_at, 2) if first_ok else None,
        # From the kill until the last failure seen (0: none failed).
        "last_error_after_s": round(max(o.done for o in failed) - killed_at, 2) if failed else 0.0,
        "window_10s": summarize(window, 10.0),
        "in_flight_at_kill": dict(Counter(str(o.status) for o in in_flight)),
        "whole_phase": summarize(outcomes, before + after),
        "client_lag_max_s": round(lag, 3),
    }
    requests = result["window_10s"]["requests"]
    result["error_rate_10s"] = round(result["window_10s"]["errors"] / requests, 4) if requests else None
    return result


async def wait_recovered(
    base: str, server_pid: int, titles: tuple[str, ...], session: aiohttp.ClientSession, timeout: float = 120
) -> float:
    """Wait until every titled replica runs and /healthz answers 200 within SETTLED_S (the backlog a
    kill left has drained, so the next phase starts from a steady server); returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if all(find_replica(server_pid, title) for title in titles):
            try:
                asked = time.monotonic()
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200 and time.monotonic() - asked < SETTLED_S:
                        return time.monotonic() - start
            except aiohttp.ClientError:
                pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the server did not recover within {timeout} s")


async def indexed_ids(session: aiohttp.ClientSession, base: str, catalog: Path, n: int = 400) -> list[str]:
    """Catalog product ids the index holds (the catalog folder may hold products ingest skipped)."""
    ids = [p.stem for p in sorted((catalog / "images").glob("*.jpg"))]
    found = []
    for pid in random.Random(0).sample(ids, min(n, len(ids))):
        async with session.get(f"{base}/products/{pid}") as response:
            if response.status == 200:
                found.append(pid)
    if not found:
        raise RuntimeError(f"none of {n} products of {catalog} is in the index; was it ingested?")
    return found


def phase_line(name: str, row: dict) -> str:
    return (
        f"{name:<24} {row['requests']:>7} {row['ok']:>7} {row['shed_503']:>6} {row['other_5xx']:>6} "
        f"{row['no_answer']:>6} {row['p50_ms'] or 0:>9.1f} {row['p99_ms'] or 0:>9.1f} "
        f"{row['ok_throughput_rps']:>8.1f}  {row['load']}"
    )


async def soak(args: argparse.Namespace, data_dir: Path, log_file: Path) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    process = start_server(data_dir, args.port, config=args.config, log_file=log_file)
    result: dict = {"phases": {}}
    phases = result["phases"]
    try:
        await wait_ready(base, process, log_file=log_file)
        result["startup_s"] = round(time.monotonic() - started, 1)
        users = await seed_events(base, args.events, args.users)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        # No connection cap: an open loop must not queue in the client instead of at the server.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            catalog = Path(json.loads((data_dir / "ingest.json").read_text())["catalog"])
            product_ids = await indexed_ids(session, base, catalog)
            similar = request_stream({"similar": 1}, product_ids, users, seed=1)
            mixed = request_stream({"similar": 2, "feed": 1}, product_ids, users, seed=2)

            async def phase(name: str, run, elapsed: float | None = None, **extra) -> dict:
                at_start, cpu_before = load(), cpu_seconds(process.pid)
                with collector_paused():
                    outcomes, measured = await run
                row = summarize(outcomes, elapsed or measured)
                cpu_after = cpu_seconds(process.pid)
                row.update({k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after})
                row.update(load=f"{at_start} -> {load()}", **extra)
                if elapsed is not None:
                    row["client_lag_max_s"] = round(measured, 3)
                phases[name] = row
                print(phase_line(name, row), flush=True)
                return row

            print(
                f"{'phase':<24} {'sent':>7} {'200':>7} {'503':>6} {'5xx':>6} {'none':>6} "
                f"{'p50 ms':>9} {'p99 ms':>9} {'ok/s':>8}  load 1/5/15 min (start -> end)",
                flush=True,
            )
            for _ in range(20):  # warm-up: connections, caches
                await send(session, base, *next(similar), time.monotonic())
            unloaded = await phase(
                "unloaded c=1", closed_loop(session, base, similar, 1, requests=args.unloaded_requests)
            )
            peak = await phase("max c=16", closed_loop(session, base, similar, 16, args.max_s))
            max_rps = peak["ok_throughput_rps"]
            with RssSampler(process.pid) as rss:
                await phase(
                    "80% of max",
                    open_loop(session, base, similar, 0.8 * max_rps, args.overload_s),
                    args.overload_s,
                    rate_rps=round(0.8 * max_rps, 1),
                )
            phases["80% of max"].update(rss.result())
            with RssSampler(process.pid) as rss:
                await phase(
                    "3x max",
                    open_loop(session, base, similar, 3 * max_rps, args.overload_s),
                    args.overload_s,
                    rate_rps=round(3 * max_rps, 1),
                )
            phases["3x max"].update(rss.result(), server_alive=process.poll() is None)
            await phase(
                "recovery 50% of max",
                open_loop(session, base, similar, 0.5 * max_rps, args.recovery_s),
                args.recovery_s,
                rate_rps=round(0.5 * max_rps, 1),
            )
            kills = {}
            if not args.skip_kill:
                for name, title in (("recommender", RECOMMENDER_TITLE), ("ingress", INGRESS_TITLE)):
                    at_start = load()
                    with collector_paused():
                        killed = await kill_under_load(
                            session, base, process.pid, title, mixed, 0.5 * max_rps, 5, args.kill_after_s
                        )
                    killed["load"] = f"{at_start} -> {load()}"
                    killed["settled_after_s"] = round(
                        await wait_recovered(base, process.pid, (RECOMMENDER_TITLE, INGRESS_TITLE), session),
                        1,
                    )
                    kills[name] = killed
                    window = killed["window_10s"]
                    print(
                        f"kill {name:<11}: recovered after {killed['recovered_after_s']} s, last error at "
                        f"{killed['last_error_after_s']} s; first 10 s: {window['requests']} sent, "
                        f"{window['errors']} errors ({window['status_counts']}), error rate "
                        f"{killed['error_rate_10s']}; in flight at the kill {killed['in_flight_at_kill']}; "
                        f"load {killed['load']}",
                        flush=True,
                    )
            result["kills"] = kills
            result["server_alive_at_end"] = process.poll() is None
        result["unloaded_p99_ms"] = unloaded["p99_ms"]
        result["max_throughput_rps"] = max_rps
        result["targets"] = targets(result)
        result["run_s"] = round(time.monotonic() - started, 1)
        return result
    finally:
        stop_server(process)


def targets(result: dict) -> dict:
    """Issue 7's figures, each with its bound and whether it was met."""
    phases, kills, p99 = result["phases"], result.get("kills", {}), result["unloaded_p99_ms"]
    rows = {
        "80%: p99 <= 3x unloaded p99": (phases["80% of max"]["p99_ms"], 3 * p99),
        "80%: errors == 0": (phases["80% of max"]["errors"], 0),
        "3x: 5xx other than 503 == 0": (phases["3x max"]["other_5xx"], 0),
        "3x: 503 without Retry-After == 0": (phases["3x max"]["shed_503_without_retry_after"], 0),
        "3x: no answer == 0": (phases["3x max"]["no_answer"], 0),
        "recovery: errors == 0": (phases["recovery 50% of max"]["errors"], 0),
        "recovery: p99 <= 3x unloaded p99": (phases["recovery 50% of max"]["p99_ms"], 3 * p99),
    }
    for name, killed in kills.items():
        rows[f"kill {name}: recovered within 10 s"] = (killed["recovered_after_s"], 10)
        rows[f"kill {name}: errors in 10 s <= 1%"] = (killed["error_rate_10s"], 0.01)
    out = {
        name: {"value": value, "bound": round(bound, 2), "met": value is not None and value <= bound}
        for name, (value, bound) in rows.items()
    }
    alive = bool(phases["3x max"]["server_alive"] and result.get("server_alive_at_end"))
    out["3x: server alive"] = {"value": alive, "bound": True, "met": alive}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"), help="what `make bench` built")
    parser.add_argument("--events", type=Path, help="default: DATA_DIR/events/simulated.jsonl")
    parser.add_argument("--users", type=int, default=200, help="simulated shoppers whose events are posted")
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument(
        "--config", type=Path, help="a Ray Serve config to try (default: infra/serve/shopguide.yaml)"
    )
    parser.add_argument(
        "--unloaded-requests", type=int, default=1000, help="its p99 rests on the slowest 1%% (10 of 1000)"
    )
    parser.add_argument("--max-s", type=float, default=15, help="closed loop at concurrency 16")
    parser.add_argument("--overload-s", type=float, default=60, help="each of the 80%% and 3x phases")
    parser.add_argument("--recovery-s", type=float, default=30)
    parser.add_argument("--kill-after-s", type=float, default=30, help="load after each kill")
    parser.add_argument("--skip-kill", action="store_true", help="only the overload phases")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the data copy and the server log")
    args = parser.parse_args()
    args.events = args.events or args.data_dir / "events" / "simulated.jsonl"
    if not (args.data_dir / "ingest.json").is_file() or not args.events.is_file():
        sys.exit(
            f"{args.data_dir} lacks an index or {args.events}: run `make soak` (builds them as `make bench` "
            "does), or `make bench`, first"
        )
    work = Path(tempfile.mkdtemp(prefix="shopguide-soak-"))
    try:
        data_dir = work / "data"
        # symlinks=True: the index's alias may be a symlink; copying its target would break the swap.
        shutil.copytree(args.data_dir, data_dir, symlinks=True)
        log_file = work / "server.log"
        print(
            f"soak on a copy of {args.data_dir} in {work}; server log {log_file}; load {load()}", flush=True
        )
        result = asyncio.run(soak(args, data_dir, log_file))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    missed = [name for name, target in result["targets"].items() if not target["met"]]
    for name, target in result["targets"].items():
        print(f"  {'ok  ' if target['met'] else 'MISS'} {name}: {target['value']} (bound {target['bound']})")
    print(f"run time {result['run_s']} s; load {load()}")
    write_result("soak", result)
    if missed and args.strict:
        sys.exit(f"targets missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()

"""HTTP end to end through Ray Serve: p50/p99 and throughput per endpoint at concurrency 1 and 8.

Starts the real `shopguide serve` on a data dir (the full catalog in `make bench`), posts simulated
shoppers' events so feeds are personal, then measures each endpoint right after `GET /healthz` in the
same run, so the ratios (similar-items throughput over healthz throughput) survive a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import (  # noqa: E402 - re-exported: other benchmarks and tests import them from here
    API_KEY,
    collector_paused,
    latency_histogram,
    start_server,
    stop_server,
    wait_ready,
    write_result,
)
from training.events import read_events  # noqa: E402

TEMPLATES = (
    "red women's handbag under 2000",
    "do you have black formal shoes for men?",
    "blue denim jeans",
    "white sports shoes for women",
    "show me a brown leather belt",
    "green tshirt for boys",
    "navy blue watch for men under 150",
    "something for a party",
)


async def seed_events(base: str, events_file: Path, users: int) -> list[str]:
    """Post the first `users` simulated shoppers' product events (their last 30 each); return their ids."""
    by_user: dict[str, list[dict]] = {}
    for event in read_events(events_file):
        if event.product_id is None:
            continue
        if event.user_id not in by_user and len(by_user) >= users:
            continue
        by_user.setdefault(event.user_id, []).append(event.to_dict())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        for user_events in by_user.values():
            async with session.post(
                f"{base}/events", json={"events": user_events[-30:]}, headers=headers
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"POST /events -> {r.status}: {await r.text()}")
    return list(by_user)


def make_requests(
    kind: str, product_ids: list[str], users: list[str], photos: list[Path], rng: random.Random
):
    """An endless stream of (method, path, body) for one endpoint."""
    while True:
        if kind == "healthz":
            yield "GET", "/healthz", None
        elif kind == "similar":
            yield "GET", f"/products/{rng.choice(product_ids)}/similar?k=10", None
        elif kind == "feed":
            yield "GET", f"/users/{rng.choice(users)}/feed?k=10", None
        elif kind == "text_search":
            yield "GET", f"/search?k=10&q={rng.choice(TEMPLATES)}", None
        elif kind == "image_search":
            yield "POST", "/search/image?k=10", rng.choice(photos).read_bytes()
        else:
            raise ValueError(kind)


async def measure(base: str, kind: str, concurrency: int, requests: int, stream) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = asyncio.Lock()
    remaining = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while True:
            async with lock:
                if remaining <= 0:
                    return
                remaining -= 1
                method, path, body = next(stream)
            started = time.perf_counter()
            if body is None:
                response = await session.request(method, base + path)
            else:
                form = aiohttp.FormData()
                form.add_field("image", body, filename="photo.jpg", content_type="image/jpeg")
                response = await session.request(method, base + path, data=form)
            await response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm = min(20, requests // 5)
        for _ in range(warm):  # warm-up: connections, caches, first batches
            method, path, body = next(stream)
            if body is None:
                await (await session.request(method, base + path)).read()
        with collector_paused():
            started = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "endpoint": kind,
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "throughput_rps": round(requests / elapsed, 1),
        "histogram_ms": latency_histogram(ms),
    }


async def run(args: argparse.Namespace) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    process = start_server(args.data_dir, args.port, args.no_ray)
    try:
        await wait_ready(base, process)
        users = await seed_events(base, args.events, args.users)
        async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as response:
            health = await response.json()
        catalog = Path(json.loads((args.data_dir / "ingest.json").read_text())["catalog"])
        rng = random.Random(0)
        product_ids = [p.stem for p in sorted((catalog / "images").glob("*.jpg"))]
        # Only ids in the index: the catalog folder may hold products that were skipped.
        async with aiohttp.ClientSession() as session:
            checked = []
            for pid in rng.sample(product_ids, 400):
                async with session.get(f"{base}/products/{pid}") as response:
                    if response.status == 200:
                        checked.append(pid)
        photos = [catalog / "images" / f"{pid}.jpg" for pid in checked[:100]]
        rows = []
        plan = [("similar", args.requests), ("feed", args.requests), ("text_search", args.requests // 2)]
        plan.append(("image_search", args.requests // 5))
        for kind, count in plan:
            for concurrency in (1, 8):
                n = count if concurrency == 1 else count * 2
                # healthz right before each endpoint: the pair shares the machine's state of the moment.
                health_row = await measure(
                    base, "healthz", concurrency, n, make_requests("healthz", checked, users, photos, rng)
                )
                row = await measure(
                    base, kind, concurrency, n, make_requests(kind, checked, users, photos, rng)
                )
                row["healthz_throughput_rps"] = health_row["throughput_rps"]
                row["healthz_p99_ms"] = health_row["p99_ms"]
                row["throughput_vs_healthz"] = round(row["throughput_rps"] / health_row["throughput_rps"], 3)
                rows.append(row)
                print(
                    f"{kind:>13} c={concurrency}: p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"{row['throughput_rps']:7.1f} req/s  ({row['throughput_vs_healthz']:.2f}x healthz "
                    f"{health_row['throughput_rps']:.1f} req/s)  errors {row['errors']}",
                    flush=True,
                )
        return {"server": "uvicorn (no Ray)" if args.no_ray else "ray serve", "index": health, "rows": rows}
    finally:
        stop_server(process)


def targets(rows: list[dict]) -> dict:
    def row(kind: str, c: int) -> dict:
        return next(r for r in rows if r["endpoint"] == kind and r["concurrency"] == c)

    return {
        "similar_p99_ms_c1": row("similar", 1)["p99_ms"],
        "similar_p99_target_ms": 20,
        "feed_p99_ms_c1": row("feed", 1)["p99_ms"],
        "feed_p99_target_ms": 30,
        "image_search_p99_ms_c1": row("image_search", 1)["p99_ms"],
        "image_search_p99_target_ms": 250,
        "similar_throughput_vs_healthz_c8": row("similar", 8)["throughput_vs_healthz"],
        "similar_throughput_vs_healthz_target": 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--events", type=Path, default=Path("data/bench/events/simulated.jsonl"))
    parser.add_argument("--users", type=int, default=200, help="simulated shoppers whose events are posted")
    parser.add_argument("--requests", type=int, default=400, help="requests per endpoint at concurrency 1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--no-ray", action="store_true", help="measure the single-process server instead")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    result["targets"] = targets(result["rows"])
    print(json.dumps(result["targets"], indent=2))
    write_result("serve-no-ray" if args.no_ray else "serve", result)


if __name__ == "__main__":
    main()

"""Event-to-effect latency: POST a view, then GET the shopper's feed, until the feed reflects the view.

"Reflects" is checked, not assumed: the feed after the event must differ from the feed before it and
name the viewed product in a reason ("similar to <title> you viewed"). Runs against the real
`shopguide serve` (Ray Serve) on a data dir; prints p50/p95 and writes bench-results/event_effect.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_serve import API_KEY, start_server  # noqa: E402
from tests.bench.common import write_result  # noqa: E402


def wait_ready(client: httpx.Client, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{process.stdout.read()}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server not ready")


def feed_ids(body: dict) -> list[str]:
    return [item["product_id"] for item in body["items"]]


def one_trial(client: httpx.Client, product: dict, user: str) -> dict:
    before = client.get(f"/users/{user}/feed?k=10").json()
    event = {
        "event_id": uuid.uuid4().hex,
        "user_id": user,
        "product_id": product["product_id"],
        "type": "view",
    }
    started = time.perf_counter()
    posted = client.post("/events", json={"events": [event]}, headers={"Authorization": f"Bearer {API_KEY}"})
    posted.raise_for_status()
    acked = time.perf_counter()
    after = client.get(f"/users/{user}/feed?k=10").json()
    done = time.perf_counter()
    title = product.get("title", product["product_id"])
    reflected = feed_ids(after) != feed_ids(before) and any(
        title in reason for item in after["items"] for reason in item["reasons"]
    )
    return {"ack_ms": (acked - started) * 1000, "effect_ms": (done - started) * 1000, "reflected": reflected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    process = start_server(args.data_dir, args.port, no_ray=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=30) as client:
            wait_ready(client, process)
            catalog = Path(json.loads((args.data_dir / "ingest.json").read_text())["catalog"])
            ids = [p.stem for p in sorted((catalog / "images").glob("*.jpg"))]
            rng = random.Random(0)
            products = []
            for pid in rng.sample(ids, 200):
                response = client.get(f"/products/{pid}")
                if response.status_code == 200:
                    products.append(response.json())
            trials = []
            for i in range(args.trials):
                # A fresh shopper per trial: the first view turns a cold-start feed into a personal one,
                # the change a shopper notices first.
                trials.append(
                    one_trial(client, rng.choice(products), f"bench-effect-{uuid.uuid4().hex[:8]}-{i}")
                )
    finally:
        process.terminate()
        process.wait(timeout=60)
    effect = np.array([t["effect_ms"] for t in trials])
    ack = np.array([t["ack_ms"] for t in trials])
    result = {
        "trials": len(trials),
        "reflected_share": round(float(np.mean([t["reflected"] for t in trials])), 4),
        "effect_p50_ms": round(float(np.percentile(effect, 50)), 2),
        "effect_p95_ms": round(float(np.percentile(effect, 95)), 2),
        "ack_p50_ms": round(float(np.percentile(ack, 50)), 2),
        "ack_p95_ms": round(float(np.percentile(ack, 95)), 2),
        "target_effect_p95_ms": 50,
    }
    print(json.dumps(result, indent=2))
    write_result("event_effect", result)


if __name__ == "__main__":
    main()

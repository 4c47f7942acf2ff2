"""Re-embedding throughput: single-process ingest vs Ray Data reembed on a local two-node cluster.

The same products, each run with a cold embedding cache in its own data dir, one after the other in
this process: `shopguide ingest` (one process), `shopguide reembed` without Ray (the same embedding
stage as the Ray one: photos and texts), and `shopguide reembed --ray-address` on a head node and a
worker node started here with `ray start` (one CPU each, one encoder actor per node).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from index import EdgeStore  # noqa: E402
from tests.bench.common import write_result  # noqa: E402
from tests.test_reembed_ray import RAY_ENV, LocalRayCluster, driver_auth_mode  # noqa: E402
from training.catalog import DEFAULT_CATALOG  # noqa: E402
from training.ingest import run_ingest  # noqa: E402
from training.reembed import RayConfig, run_reembed  # noqa: E402
from training.vectors import EncoderConfig  # noqa: E402


def ingest(catalog: Path, data_dir: Path, limit: int) -> dict:
    store = EdgeStore(data_dir / "index")
    try:
        start = time.perf_counter()
        summary = run_ingest(catalog, store, data_dir, limit=limit)
        return {
            "images": summary.images_embedded,
            "image_seconds": round(summary.image_seconds, 1),
            "images_per_s": round(summary.images_per_second, 2),  # photos only (ingest's own figure)
            "seconds": round(time.perf_counter() - start, 1),
            "products": summary.products_total,
        }
    finally:
        store.close()


def reembed(catalog: Path, data_dir: Path, limit: int, ray: RayConfig | None) -> dict:
    store = EdgeStore(data_dir / "index")
    try:
        start = time.perf_counter()
        summary = run_reembed(catalog, store, data_dir, EncoderConfig(), limit=limit, ray=ray)
        embed = summary.embed
        return {
            "images": embed.images,
            "texts": embed.texts,
            "embed_seconds": round(embed.seconds, 1),  # photos + texts (+ the actor pool's start)
            "images_per_s": round(embed.images_per_second, 2),
            "seconds": round(time.perf_counter() - start, 1),
            "products": summary.products_total,
            "validated": summary.validation.ok,
            "validation": {c.name: c.detail for c in summary.validation.checks},
            "actors": embed.actors,
            "nodes": len(embed.nodes),
        }
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--limit", type=int, default=1000, help="products (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench-reembed"))
    parser.add_argument("--actors", type=int, default=2, help="encoder actors (default: one per node)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not (args.catalog / "products.csv").is_file():
        sys.exit(f"catalog not found at {args.catalog}; pass --catalog")
    shutil.rmtree(args.data_dir, ignore_errors=True)

    print(f"== single-process ingest of {args.limit} products (cold cache)")
    single = ingest(args.catalog, args.data_dir / "ingest", args.limit)
    print(single)
    print("== single-process reembed (cold cache)")
    local = reembed(args.catalog, args.data_dir / "local", args.limit, None)
    print(local)
    print("== Ray Data reembed on a local 2-node cluster (cold cache)")
    os.environ.update({**RAY_ENV, "RAY_AUTH_MODE": driver_auth_mode()})
    start = time.perf_counter()
    with LocalRayCluster(head_cpus=1, worker_cpus=1) as cluster:
        cluster_start_s = round(time.perf_counter() - start, 1)
        ray = RayConfig(cluster.address, actors=args.actors, batch_size=args.batch_size)
        distributed = reembed(args.catalog, args.data_dir / "ray", args.limit, ray)
    print(distributed)

    result = {
        "catalog": str(args.catalog),
        "products": args.limit,
        "cluster": "ray start --head (1 CPU) + ray start --address (1 CPU), this machine",
        "cluster_start_seconds": cluster_start_s,
        "ingest": single,
        "reembed_local": local,
        "reembed_ray": distributed,
        "ray_vs_ingest_images_per_s": round(distributed["images_per_s"] / single["images_per_s"], 3),
        "ray_vs_local_embed_stage": round(local["embed_seconds"] / distributed["embed_seconds"], 3),
        "ray_vs_ingest_total_seconds": round(single["seconds"] / distributed["seconds"], 3),
    }
    rows = {
        "images/s": (
            single["images_per_s"],
            local["images_per_s"],
            distributed["images_per_s"],
        ),
        "embed stage s": (
            single["image_seconds"],
            local["embed_seconds"],
            distributed["embed_seconds"],
        ),
        "total s": (single["seconds"], local["seconds"], distributed["seconds"]),
    }
    print(f"\n{'figure':<34}{'ingest':>10}{'local':>10}{'ray':>10}")
    for name, (a, b, c) in rows.items():
        print(f"{name:<34}{a:>10}{b:>10}{c:>10}")
    print("(ingest: photos only; reembed: photos + texts; ray: + the actor pool's start)")
    print(f"ray / ingest images/s: {result['ray_vs_ingest_images_per_s']}")
    write_result("reembed", result)


if __name__ == "__main__":
    main()

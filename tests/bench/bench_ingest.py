"""Ingest speed: full ingest from scratch, cached re-runs, and pipeline vs raw-forward image throughput."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encoders import get_image_encoder  # noqa: E402
from index import EdgeStore  # noqa: E402
from tests.bench.common import write_result  # noqa: E402
from training.catalog import DEFAULT_CATALOG, load_catalog  # noqa: E402
from training.features import image_features  # noqa: E402
from training.ingest import run_ingest  # noqa: E402


def ingest(catalog: Path, data_dir: Path, limit: int | None) -> dict:
    store = EdgeStore(data_dir / "index")
    try:
        return run_ingest(catalog, store, data_dir, limit=limit).to_dict()
    finally:
        store.close()


def throughput(catalog: Path, n: int) -> dict:
    """Images/s of the ingest pipeline (read + decode + resize + CNN, no cache) vs the CNN alone on
    the same images already decoded into tensors, measured back to back in this process."""
    encoder = get_image_encoder("efficientnet_lite0")
    products = load_catalog(catalog, limit=n).products
    items = [(p.id, p.image_path) for p in products]
    encoder.encode_tensors(torch.zeros(4, 3, 224, 224))  # warm-up: first call allocates
    start = time.perf_counter()
    feats = image_features(encoder, items, cache=None, progress=False)
    pipeline_s = time.perf_counter() - start
    pixels = []
    for _, path in items:
        with Image.open(path) as image:
            pixels.append(encoder.preprocess(image))
    batches = [
        torch.stack(pixels[i : i + encoder.batch_size]) for i in range(0, len(pixels), encoder.batch_size)
    ]
    start = time.perf_counter()
    for batch in batches:
        encoder.encode_tensors(batch)
    raw_s = time.perf_counter() - start
    pipeline, raw = len(feats.ids) / pipeline_s, len(pixels) / raw_s
    return {
        "images": len(pixels),
        "pipeline_images_per_s": round(pipeline, 2),
        "raw_forward_images_per_s": round(raw, 2),
        "pipeline_vs_raw": round(pipeline / raw, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--limit", type=int, help="ingest only N products (default: the whole catalog)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--throughput-images", type=int, default=640)
    args = parser.parse_args()
    if not (args.catalog / "products.csv").is_file():
        sys.exit(f"catalog not found at {args.catalog}; pass --catalog")

    print("== image throughput: pipeline vs raw forward on preloaded tensors")
    speed = throughput(args.catalog, args.throughput_images)
    print(speed)

    shutil.rmtree(args.data_dir, ignore_errors=True)
    print(f"== ingest from scratch into {args.data_dir}")
    scratch = ingest(args.catalog, args.data_dir, args.limit)
    print("== re-run, nothing changed (embedding cache + unchanged-product check)")
    rerun = ingest(args.catalog, args.data_dir, args.limit)
    print("== rebuild the index from the embedding cache (index and heads deleted)")
    shutil.rmtree(args.data_dir / "index")
    shutil.rmtree(args.data_dir / "models")
    rebuild = ingest(args.catalog, args.data_dir, args.limit)

    result = {
        "catalog": str(args.catalog),
        "products": scratch["products_total"],
        "scratch_seconds": round(scratch["seconds"], 1),
        "scratch_images_per_s": scratch["images_per_second"],
        "scratch_image_seconds": round(scratch["image_seconds"], 1),
        "rerun_seconds": round(rerun["seconds"], 1),
        "rebuild_from_cache_seconds": round(rebuild["seconds"], 1),
        "rerun_vs_scratch": round(rerun["seconds"] / scratch["seconds"], 3),
        "heads": scratch["heads_metrics"],
        **speed,
        "targets": {"scratch_seconds": 600, "rerun_seconds": 60, "pipeline_vs_raw": 0.8},
    }
    print(f"\n{'figure':<36}{'value':>12}{'target':>10}")
    print(f"{'ingest from scratch (s)':<36}{result['scratch_seconds']:>12}{'<= 600':>10}")
    print(f"{'re-run unchanged (s)':<36}{result['rerun_seconds']:>12}{'<= 60':>10}")
    print(f"{'rebuild index from cache (s)':<36}{result['rebuild_from_cache_seconds']:>12}{'':>10}")
    print(f"{'pipeline / raw forward images/s':<36}{result['pipeline_vs_raw']:>12}{'>= 0.8':>10}")
    write_result("ingest", result)


if __name__ == "__main__":
    main()

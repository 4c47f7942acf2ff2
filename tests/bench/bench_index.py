"""Index speed and recall: embedded HNSW vs qdrant-client :memory:, recall@10 on real catalog vectors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from index.bench import bench_index  # noqa: E402
from tests.bench.common import write_result  # noqa: E402
from training.catalog import DEFAULT_CATALOG  # noqa: E402
from training.eval_catalog import real_vectors_for_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data/bench"),
        help="reuses the embedding cache of bench_ingest.py when present",
    )
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    real = real_vectors_for_bench(args.catalog, args.data_dir)
    if real is None:
        print(f"catalog not found at {args.catalog}: recall on real vectors is skipped")
    result = bench_index(points=args.points, dim=256, queries=args.queries, real_vectors=real)
    print(f"\n{'figure':<40}{'value':>12}{'target':>10}")
    print(f"{'filtered top-10 p50 speedup vs :memory:':<40}{result['speedup_p50']:>12.1f}{'>= 50':>10}")
    if "recall_at_10" in result:
        print(f"{'HNSW recall@10 on real vectors':<40}{result['recall_at_10']:>12.4f}{'>= 0.95':>10}")
    write_result("index", result)


if __name__ == "__main__":
    main()

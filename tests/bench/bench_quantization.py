"""int8 scalar quantization vs float32 in the embedded index: recall@10, latency, disk, RAM side by side."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from index import EdgeIndex, EdgeSettings, EdgeStore, IndexInUseError, Record, VectorSpace  # noqa: E402
from index.bench import exact_top_k  # noqa: E402

SPACE = "fused"  # the space searched by similar items and search, 256-d
LOAD_BATCH = 2000  # records per upsert call

# The collections built, by name: how the vectors are stored (fixed at creation).
COLLECTIONS = {
    "float": EdgeSettings(),  # float32 vectors in RAM: the engine default, and shopguide's today
    "int8": EdgeSettings(quantization="int8"),  # int8 copy searched first; float32 originals also in RAM
    "int8-disk": EdgeSettings(quantization="int8", vectors_on_disk=True),  # originals on disk, for rescoring
}
# Extra search settings on the int8-disk collection (search-time only, same shard).
SEARCH_VARIANTS = {
    "int8-disk/no-rescore": ("int8-disk", {"quantization_rescore": False}),
    "int8-disk/rescore-x2": ("int8-disk", {"quantization_rescore": True, "quantization_oversampling": 2.0}),
}


@dataclass(frozen=True)
class QuantBenchConfig:
    """What the benchmark builds and measures; the defaults are the issue's 100k x 256-d, 500 queries."""

    points: int = 100_000  # vectors in each collection
    queries: int = 500  # held-out query vectors (generated like the points, never inserted)
    k: int = 10  # recall@k and the search limit
    # Norm of the Gaussian perturbation added to a unit centre: cos(point, centre) ~ 1/sqrt(1 + noise^2)
    # (0.89 at 0.5, close to the median nearest-neighbour cosine 0.90 of the real fused vectors).
    noise: float = 0.5
    seed: int = 0
    source: Path = Path("data/bench/index")  # an ingested index: its fused vectors become the centres
    mixture_centres: int = 2000  # centres of the Gaussian-mixture fallback when `source` has no index
    collections: tuple[str, ...] = tuple(COLLECTIONS)
    warmup: int = 20  # untimed queries per variant before timing
    # Build HNSW and the int8 copy at any size (tiny thresholds): the engine otherwise scans segments
    # under ~10 MB exactly, so a toy-size run (the test) would measure no index at all.
    force_index: bool = False

    def settings(self, collection: str) -> EdgeSettings:
        base = COLLECTIONS[collection]
        return replace(base, full_scan_threshold_kb=1, indexing_threshold_kb=1) if self.force_index else base


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def read_centres(index_dir: Path, work_dir: Path) -> tuple[np.ndarray, list[dict]] | None:
    """Real fused vectors (m, 256) and payloads of an ingested index, read from a copy of it.

    The copy keeps this benchmark off the original's write-ahead-log lock, so a server or another
    benchmark may be using it meanwhile. None when there is no index there.
    """
    if not (index_dir / "aliases" / "products").is_file():
        return None
    copy = work_dir / "source-index"
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns("temp_segments"))
    try:
        with EdgeStore(copy) as store:
            index = store.open("products")
            if SPACE not in index.spaces:
                return None
            records = index.get(list(index.product_ids()), with_vectors=True)
    except IndexInUseError:
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    centres = np.stack([r.vectors[SPACE] for r in records])  # (m, 256)
    return _unit(centres), [r.payload for r in records]


def mixture_centres(count: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """The fallback: random unit centres and small synthetic payloads."""
    from index.bench import _payloads  # the payload generator of the index benchmark

    return _unit(rng.standard_normal((count, dim))), _payloads(rng, count)


def clustered(
    centres: np.ndarray, n: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors, each a random centre plus Gaussian noise of norm ~noise: (vectors, centre ids)."""
    ids = rng.integers(0, len(centres), n)
    dim = centres.shape[1]
    perturbation = rng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim))  # (n, dim)
    return _unit(centres[ids] + perturbation), ids


def folder_bytes(path: Path) -> dict[str, dict[str, int]]:
    """Bytes on disk by component: apparent size (st_size) and allocated (blocks; files may be sparse)."""
    out: dict[str, dict[str, int]] = {}
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        parts = file.relative_to(path).parts
        name = file.name
        if parts[0] == "wal":
            kind = "wal"
        elif any(p.startswith("vector_storage") for p in parts):
            kind = "vectors_int8" if "quantized" in name else "vectors_float32"
        elif any(p.startswith("vector_index") for p in parts):
            kind = "hnsw"
        elif any(p.startswith(("payload", "field_index")) for p in parts):
            kind = "payload"
        else:
            kind = "other"
        stat = file.stat()
        entry = out.setdefault(kind, {"apparent": 0, "allocated": 0})
        entry["apparent"] += stat.st_size
        entry["allocated"] += stat.st_blocks * 512
    return dict(sorted(out.items()))


def _rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MB
    return out


def _rss_probe(root: str, settings: EdgeSettings, queries: np.ndarray, k: int) -> dict[str, float]:
    """In a fresh process: resident memory added by opening the collection and running the queries."""
    before = _rss_mb()
    with EdgeStore(root, settings) as store:
        index = store.open_collection("bench")
        for row in queries:
            index.search(SPACE, row, k)
        after = _rss_mb()
    return {f"{key}_mb": after[key] - before[key] for key in after}


def _view(index: EdgeIndex, settings: EdgeSettings) -> EdgeIndex:
    # A second handle on the same open shard with other search settings (the engine's lock allows one
    # opener per folder); never closed itself: the store closes the shard.
    return EdgeIndex(index.name, index.path, index.shard, index.spaces, settings=settings)


def _percentile(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q))


def build(root: Path, settings: EdgeSettings, vectors: np.ndarray, payloads: list[dict]) -> dict:
    """Load the vectors into a new collection under root and build HNSW; returns timings and engine info."""
    with EdgeStore(root, settings) as store:
        index = store.create_collection("bench", [VectorSpace(SPACE, vectors.shape[1], "bench/clustered")])
        start = time.perf_counter()
        for lo in range(0, len(vectors), LOAD_BATCH):
            hi = min(lo + LOAD_BATCH, len(vectors))
            index.upsert([Record(str(i), {SPACE: vectors[i]}, payloads[i]) for i in range(lo, hi)])
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        index.optimize()
        build_s = time.perf_counter() - start
        info = index.info()
    return {"load_s": load_s, "hnsw_build_s": build_s, "indexed_vectors": info["indexed_vectors"]}


def run(config: QuantBenchConfig, work_dir: Path | None = None) -> dict:
    """Build each collection, then measure them side by side; returns the JSON result."""
    unknown = sorted(set(config.collections) - set(COLLECTIONS))
    if unknown:
        raise ValueError(f"unknown collections {unknown}; known: {list(COLLECTIONS)}")
    rng = np.random.default_rng(config.seed)
    result: dict = {"config": {**asdict(config), "source": str(config.source)}}
    with tempfile.TemporaryDirectory(prefix="shopguide-quant-", dir=work_dir) as tmp:
        tmp_path = Path(tmp)
        real = read_centres(config.source, tmp_path)
        if real is not None:
            centres, centre_payloads = real
            result["vectors"] = f"{len(centres)} real fused catalog vectors from {config.source} + noise"
        else:
            centres, centre_payloads = mixture_centres(config.mixture_centres, 256, rng)
            result["vectors"] = f"Gaussian mixture: {config.mixture_centres} random unit centres + noise"
        print(f"vectors: {result['vectors']} (noise {config.noise})")
        base, base_centres = clustered(centres, config.points, config.noise, rng)  # (points, dim)
        queries, _ = clustered(centres, config.queries, config.noise, rng)  # (queries, dim)
        payloads = [centre_payloads[c] for c in base_centres]
        start = time.perf_counter()
        exact = exact_top_k(base, queries, config.k)  # (queries, k) row indices
        result["exact_search_s"] = time.perf_counter() - start

        collections: dict[str, dict] = {}
        for name in config.collections:
            print(f"{name}: loading {config.points} points and building HNSW (minutes at 100k on 2 cores)")
            collections[name] = build(tmp_path / name, config.settings(name), base, payloads)
            collections[name]["disk"] = folder_bytes(tmp_path / name / "collections" / "bench")
        # Resident memory in a fresh process per collection (the shard must be closed here first).
        spawn = multiprocessing.get_context("spawn")
        for name in config.collections:
            with spawn.Pool(1) as pool:
                collections[name]["rss"] = pool.apply(
                    _rss_probe, (str(tmp_path / name), config.settings(name), queries, config.k)
                )

        # Latency and recall: every variant open at once, queries interleaved across variants so that
        # drift on this shared machine hits all of them alike.
        stores = {name: EdgeStore(tmp_path / name, config.settings(name)) for name in config.collections}
        try:
            variants = {name: store.open_collection("bench") for name, store in stores.items()}
            for name, (collection, overrides) in SEARCH_VARIANTS.items():
                if collection in variants:
                    settings = replace(config.settings(collection), **overrides)
                    variants[name] = _view(variants[collection], settings)
            names = list(variants)
            for name in names:
                for row in queries[: config.warmup]:
                    variants[name].search(SPACE, row, config.k)
            latencies: dict[str, list[float]] = {name: [] for name in names}
            hits: dict[str, list[list[int]]] = {name: [] for name in names}
            for qi, row in enumerate(queries):
                for j in range(len(names)):
                    name = names[(qi + j) % len(names)]  # rotate who goes first
                    start = time.perf_counter()
                    found = variants[name].search(SPACE, row, config.k)
                    latencies[name].append((time.perf_counter() - start) * 1000.0)
                    hits[name].append([int(h.product_id) for h in found])
        finally:
            for store in stores.values():
                store.close()

    searches: dict[str, dict] = {}
    for name in names:
        recall = np.mean(
            [
                len(set(got) & set(want)) / len(want)
                for got, want in zip(hits[name], exact.tolist(), strict=True)
            ]
        )
        searches[name] = {
            "recall_at_k": float(recall),
            "p50_ms": _percentile(latencies[name], 50),
            "p99_ms": _percentile(latencies[name], 99),
        }
    result["collections"] = collections
    result["searches"] = searches
    if "float" in searches:
        ref, ref_disk = searches["float"], collections["float"]
        result["ratios_vs_float"] = {
            name: {
                "recall": s["recall_at_k"] / ref["recall_at_k"],
                "p50": s["p50_ms"] / ref["p50_ms"],
                "p99": s["p99_ms"] / ref["p99_ms"],
            }
            for name, s in searches.items()
            if name != "float"
        }
        result["memory_ratios_vs_float"] = {
            name: {
                "rss": c["rss"]["VmRSS_mb"] / ref_disk["rss"]["VmRSS_mb"],
                "disk_vectors": _vector_bytes(c) / _vector_bytes(ref_disk),
            }
            for name, c in collections.items()
            if name != "float"
        }
    return result


def _vector_bytes(collection: dict) -> int:
    disk = collection["disk"]
    return sum(disk.get(kind, {}).get("apparent", 0) for kind in ("vectors_float32", "vectors_int8"))


def print_tables(result: dict) -> None:
    """The side-by-side tables (what the README quotes)."""
    mb = 1024 * 1024
    print(f"\n{'search':<24}{'recall@10':>10}{'p50 ms':>9}{'p99 ms':>9}{'p50 x':>8}{'p99 x':>8}")
    ratios = result.get("ratios_vs_float", {})
    for name, s in result["searches"].items():
        r = ratios.get(name, {"p50": 1.0, "p99": 1.0})
        print(
            f"{name:<24}{s['recall_at_k']:>10.4f}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}"
            f"{r['p50']:>8.2f}{r['p99']:>8.2f}"
        )
    kinds = ("vectors_float32", "vectors_int8", "hnsw", "payload", "wal", "other")
    print(f"\n{'collection (MB)':<16}" + "".join(f"{k:>16}" for k in kinds) + f"{'RSS':>8}{'build s':>9}")
    for name, c in result["collections"].items():
        sizes = "".join(f"{c['disk'].get(k, {}).get('apparent', 0) / mb:>16.1f}" for k in kinds)
        print(f"{name:<16}{sizes}{c['rss']['VmRSS_mb']:>8.1f}{c['hnsw_build_s']:>9.1f}")
    print("(disk: apparent file sizes; RSS: resident MB a fresh process adds by opening it and searching)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    defaults = QuantBenchConfig()
    parser.add_argument("--points", type=int, default=defaults.points)
    parser.add_argument("--queries", type=int, default=defaults.queries)
    parser.add_argument("--noise", type=float, default=defaults.noise)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--source", type=Path, default=defaults.source, help="ingested index for the centres")
    parser.add_argument(
        "--collections", default=",".join(defaults.collections), help=f"any of {','.join(COLLECTIONS)}"
    )
    parser.add_argument("--work-dir", type=Path, help="where the temporary collections go (default: $TMPDIR)")
    parser.add_argument("--result-name", default="quantization", help="writes bench-results/NAME.json")
    args = parser.parse_args()
    config = QuantBenchConfig(
        points=args.points,
        queries=args.queries,
        noise=args.noise,
        seed=args.seed,
        source=args.source,
        collections=tuple(c for c in args.collections.split(",") if c),
    )
    result = run(config, args.work_dir)
    result["cpus"] = os.cpu_count()
    print_tables(result)
    # Imported here: it imports torch, which the memory probes' fresh processes (spawned from this
    # module) need not pay for.
    from tests.bench.common import write_result

    write_result(args.result_name, result)


if __name__ == "__main__":
    main()

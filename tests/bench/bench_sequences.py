"""User-encoding latency: a 50-event history through the GRU encoder, one user at a time (p50/p99 ms)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encoders.sequence import EVENT_TYPES, GRUSequenceModel, SequenceEncoder, SequenceModelConfig  # noqa: E402
from tests.bench.common import write_result  # noqa: E402


def build_encoder(model_dir: Path | None, items: int) -> SequenceEncoder:
    """The trained model in `model_dir`, or a randomly initialized default-size one (same compute)."""
    if model_dir is not None:
        return SequenceEncoder.load(model_dir)
    torch.manual_seed(0)
    model = GRUSequenceModel(SequenceModelConfig(), n_items=items)
    return SequenceEncoder(model, [str(i + 1) for i in range(items)])


def latency(encoder: SequenceEncoder, events: int, users: int, seed: int = 0) -> dict:
    """Encode `users` random histories of `events` (item, event type) pairs one call each."""
    rng = np.random.default_rng(seed)
    histories = [
        [
            (encoder.item_ids[i], EVENT_TYPES[e])
            for i, e in zip(
                rng.integers(len(encoder.item_ids), size=events),
                rng.integers(len(EVENT_TYPES), size=events),
                strict=True,
            )
        ]
        for _ in range(users)
    ]
    for history in histories[:20]:  # warm-up: first calls allocate
        encoder.encode_users([history])
    times = []
    for history in histories:
        start = time.perf_counter()
        encoder.encode_users([history])
        times.append((time.perf_counter() - start) * 1000)
    times_ms = np.asarray(times)
    return {
        "events_per_history": events,
        "users": users,
        "p50_ms": round(float(np.percentile(times_ms, 50)), 3),
        "p99_ms": round(float(np.percentile(times_ms, 99)), 3),
        "mean_ms": round(float(times_ms.mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=Path, help="a `shopguide train sequences` folder (default: random init)"
    )
    parser.add_argument("--items", type=int, default=12_101, help="vocabulary size without --model (Beauty)")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (serving runs one per replica)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = build_encoder(args.model, args.items)
    result = {
        "model": str(args.model) if args.model else "random init, default SequenceModelConfig",
        "config": encoder.config.__dict__,
        "items": len(encoder.item_ids),
        "threads": args.threads,
        **latency(encoder, args.events, args.users),
        "targets": {"p99_ms": 5.0},
    }
    print(f"\n{'figure':<36}{'value':>12}{'target':>10}")
    print(f"{'encode 1 user, p50 (ms)':<36}{result['p50_ms']:>12}{'':>10}")
    print(f"{'encode 1 user, p99 (ms)':<36}{result['p99_ms']:>12}{'<= 5':>10}")
    write_result("sequences", result)


if __name__ == "__main__":
    main()

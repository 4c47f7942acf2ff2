"""Helpers shared by the benchmarks: argument defaults and writing the JSON result."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path("bench-results")


def write_result(name: str, result: dict) -> Path:
    """Write `bench-results/<name>.json` (with when and where it ran) and say so."""
    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path

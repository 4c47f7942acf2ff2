"""Helpers shared by the benchmarks: starting the server, latency histograms, writing the JSON result."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import numpy as np
import torch

RESULTS = Path("bench-results")
API_KEY = "bench-key"
# Fixed log-spaced latency bins, 0.1 ms to 10 s, 12 per decade (each ~21% wide): every run and row shares
# them, so `shopguide report` can overlay and compare histograms without the raw samples.
HISTOGRAM_EDGES_MS = [float(f"{edge:.4g}") for edge in np.geomspace(0.1, 10_000, 61)]


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


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a load generator times requests, then one collection.
    A full collection of the soak client's heap (tens of thousands of tasks and outcomes) stalled its
    event loop for 110 ms: every request in flight then looked 110 ms slower than the server made it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


def latency_histogram(ms: np.ndarray) -> dict:
    """Counts per HISTOGRAM_EDGES_MS bin; samples outside 0.1 ms..10 s go to the first or last bin."""
    edges = np.array(HISTOGRAM_EDGES_MS)
    counts, _ = np.histogram(np.clip(ms, edges[0], edges[-1]), bins=edges)
    return {"edges": HISTOGRAM_EDGES_MS, "counts": counts.tolist()}


def start_server(
    data_dir: Path,
    port: int,
    no_ray: bool = False,
    *,
    api_key: str | None = API_KEY,
    config: Path | None = None,
    log_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`shopguide serve` in a process group of its own (so the caller can stop exactly what it started);
    its output goes to `log_file`, else to a pipe (read it only after the process exited). `env`: more
    environment variables for it."""
    command = [sys.executable, "-m", "serving.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    command += ["--api-key", api_key] if api_key else ["--no-api-key"]
    command += (["--config", str(config)] if config else []) + (["--no-ray"] if no_ray else [])
    # RAY_ADDRESS=local: always a fresh cluster of our own, never one that someone's `ray start` left.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local", **(env or {})}
    output = open(log_file, "w") if log_file else subprocess.PIPE  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def server_output(process: subprocess.Popen, log_file: Path | None = None) -> str:
    """What a server started by start_server printed (after it exited, when it printed to a pipe)."""
    if log_file is not None:
        return Path(log_file).read_text(errors="replace")
    return process.stdout.read() if process.stdout else ""


async def wait_ready(
    base: str, process: subprocess.Popen, timeout: float = 300, log_file: Path | None = None
) -> None:
    """Poll GET /healthz until it answers 200; fail with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server_output(process, log_file)}")
            try:
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"{base} not ready after {timeout} s")


def stop_server(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (the server's clean shutdown: Serve, then Ray), then SIGKILL its whole process group."""
    process.terminate()  # SIGINT is ignored by jobs a non-interactive shell backgrounds
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
    try:  # whatever Ray left behind in the group (a worker still exiting)
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass

"""Resident memory of a process tree, sampled in a process of its own while the soak loads the server.

Walking Ray's ~20 processes through /proc takes ~3 ms. Done in the load generator's event loop every
0.5 s, that pause would add to the latency of every request in flight, so the sampler runs here:
`python -m tests.soak.rss_sampler PID PERIOD_S` prints one sample (MB) per line until SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def tree_rss(pid: int) -> int:
    """Bytes resident in the process and all its descendants (Ray's GCS, raylet, every replica)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between the listing and the read
            pass
    return total


class RssSampler:
    """Samples tree_rss of `pid` every `period` s in a subprocess while the block runs; keeps every
    sample and reports the peak."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period = pid, period
        self.samples_mb: list[float] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> RssSampler:
        command = [sys.executable, "-m", "tests.soak.rss_sampler", str(self.pid), str(self.period)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        out, _ = self._process.communicate(timeout=30)
        self.samples_mb = [float(line) for line in out.split()]

    def result(self) -> dict:
        """Peak, first and last sample in MB; None when nothing was sampled (never a made-up 0)."""
        samples = self.samples_mb
        return {
            "peak_rss_mb": round(max(samples), 1) if samples else None,
            "first_rss_mb": round(samples[0], 1) if samples else None,
            "last_rss_mb": round(samples[-1], 1) if samples else None,
            "rss_samples": len(samples),
        }


def main() -> None:
    pid, period = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        try:
            print(round(tree_rss(pid) / 2**20, 1), flush=True)
        except psutil.NoSuchProcess:  # the server itself is gone: nothing left to sample
            return
        time.sleep(period)


if __name__ == "__main__":
    main()

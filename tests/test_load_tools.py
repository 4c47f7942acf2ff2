"""The load generators' own instruments: a paused garbage collector and the out-of-process RSS sampler."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref

import psutil

from tests.bench.common import collector_paused
from tests.soak.rss_sampler import RssSampler

HELD_MB = 64


def test_the_collector_is_off_in_the_block_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_garbage_made_in_the_block_is_collected_after_it() -> None:
    class Node:
        pass

    alive: weakref.WeakSet = weakref.WeakSet()
    with collector_paused():
        for _ in range(1000):  # reference cycles: only the cyclic collector frees them
            a, b = Node(), Node()
            a.other, b.other = b, a
            alive.update((a, b))
        del a, b
        assert len(alive) == 2000  # nothing collected while paused
    assert len(alive) == 0


def test_rss_sampler_sees_memory_a_child_of_the_tree_holds() -> None:
    # A tree like the server's: this root, and a child that makes HELD_MB resident (bytes written, so
    # the pages are really there) after the sampler has seen the tree without it.
    root = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(0.8); x = b\"x\" * ({HELD_MB} << 20); time.sleep(30)']); "
            "time.sleep(30)",
        ]
    )
    try:
        with RssSampler(root.pid, period=0.1) as rss:
            time.sleep(2.5)
        result = rss.result()
    finally:
        for child in psutil.Process(root.pid).children(recursive=True):
            child.kill()
        root.kill()
        root.wait()
    assert result["rss_samples"] >= 10  # about one every 0.1 s, the subprocess' start-up aside
    assert result["first_rss_mb"] < HELD_MB
    assert result["peak_rss_mb"] - result["first_rss_mb"] >= 0.9 * HELD_MB
    assert result["peak_rss_mb"] == max(rss.samples_mb)


def test_rss_sampler_ends_when_the_tree_is_gone() -> None:
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    with RssSampler(short.pid, period=0.1) as rss:
        short.wait()
        time.sleep(0.5)
        assert rss._process is not None and rss._process.poll() is not None  # it stopped by itself
    assert 1 <= len(rss.samples_mb)


def test_rss_sampler_without_samples_reports_none_not_zero() -> None:
    assert RssSampler(1).result() == {
        "peak_rss_mb": None,
        "first_rss_mb": None,
        "last_rss_mb": None,
        "rss_samples": 0,
    }

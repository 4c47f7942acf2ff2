"""`shopguide worker`: the periodic jobs beside a running server (user-encoder updates, re-embedding).

Why a process of its own rather than a thread inside `shopguide serve`: training is seconds to minutes
of torch work (an incremental update 7.8 s, a full retrain 98 s on the full catalog, 2 cores) that
would compete with requests for the serving process's cores and interpreter lock; and in embedded mode
the server owns the index, so nothing here writes it. The worker only writes the model registry (and,
for re-embedding, a new collection beside the live one); the server follows the registry's LIVE pointer
and the collection alias on its own (`model_poll_s`), without a restart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from encoders.sequence import SequenceModelConfig
from training.sequences import TrainConfig
from training.update import STRATEGIES, update_and_promote


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker runs and how often."""

    update_every_s: float = 3600.0  # between user-encoder updates (a shop's events arrive all day)
    strategy: str = "hybrid"  # incremental | full | hybrid (see training.update)
    tolerance: float | None = None  # promotion gate tolerance (default: training.registry's 2%)
    holdout_days: float = 1.0  # the gate's held-out shoppers: active in the last N days of events
    reembed_every_s: float = 0.0  # catalog re-embedding job period (0 = off; needs `reembed` arguments)
    model_config: SequenceModelConfig | None = None  # a full retrain's model (default: the trainer's)
    train_config: TrainConfig | None = None  # how updates train (default: the trainer's)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.update_every_s <= 0:
            raise ValueError(f"update_every_s must be > 0, got {self.update_every_s}")
        if self.reembed_every_s < 0:
            raise ValueError(f"reembed_every_s must be >= 0 (0 = off), got {self.reembed_every_s}")


def snapshot_events(data_dir: Path) -> list:
    """Every stored event, read through SQLite's WAL snapshot while the server keeps writing."""
    from serving.event_store import SQLiteEventStore

    db = data_dir / "events.db"
    if not db.is_file():
        raise FileNotFoundError(
            f"no event store at {db}: start `shopguide serve` or `shopguide events import` "
            "(train update and models promote also take --events FILE.jsonl)"
        )
    with SQLiteEventStore(db) as store:
        return list(store.iter_events())


def update_job(data_dir: Path, config: WorkerConfig) -> dict:
    """One user-encoder update: snapshot, train per strategy, register, gated promote."""
    from training.registry import ModelRegistry

    events = snapshot_events(data_dir)
    registry = ModelRegistry(data_dir / "models" / "registry")
    return update_and_promote(
        events,
        registry,
        config.strategy,
        config.tolerance,
        config.holdout_days,
        model_config=config.model_config,
        train_config=config.train_config,
    )


def run_worker(
    data_dir: Path,
    config: WorkerConfig,
    once: bool = False,
    stop: threading.Event | None = None,
    reembed_job: Callable[[], dict] | None = None,
    report: Callable[[dict], None] = lambda entry: print(json.dumps(entry), flush=True),
) -> list[dict]:
    """Run the jobs on their periods until `stop` is set (or once each with `once`). Every run is one JSON
    line in DATA_DIR/worker.jsonl and passed to `report`; a failed job is logged and retried next period,
    never fatal (a worker that dies quietly stops the shop's learning)."""
    stop = stop or threading.Event()
    jobs = [("update", config.update_every_s, lambda: update_job(data_dir, config))]
    if reembed_job is not None and config.reembed_every_s > 0:
        jobs.append(("reembed", config.reembed_every_s, reembed_job))
    due = {name: 0.0 for name, _, _ in jobs}  # every job runs at start, then on its period
    done: list[dict] = []
    while not stop.is_set():
        for name, period, job in jobs:
            if time.monotonic() < due[name]:
                continue
            started = time.time()
            try:
                entry = {"job": name, "ok": True, **job()}
            except Exception as exc:  # noqa: BLE001 - any failure is reported, and the worker goes on
                entry = {"job": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            entry = {"ts": round(started, 3), "seconds": round(time.time() - started, 2), **entry}
            with (data_dir / "worker.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            report(entry)
            done.append(entry)
            due[name] = time.monotonic() + period
        if once:
            break
        stop.wait(max(0.5, min(due.values()) - time.monotonic()))
    return done

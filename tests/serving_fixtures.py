"""Serving test data: the tiny catalog ingested, simulated shoppers in an event store, a tiny GRU.

Built once per test session (ingest loads both encoders: about 15 s on 2 cores) and copied per test
module, so each module writes its own events and owns its own index folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ARTICLES, COLOURS, make_catalog

API_KEY = "sekret"
GENDERS = ("Men", "Women")
# The GRU is trained without these products' events, so they have no behavior vectors: behavior
# requests about them must fall back to content similarity, labelled as filler.
UNSEEN_BY_GRU = ("Green", "Tshirts")

_BUILT: dict[Path, Path] = {}  # session base temp -> the data dir built there


def tiny_ids(colour: str | None = None, article: str | None = None, gender: str | None = None) -> list[str]:
    """Product ids of the tiny catalog (tests/conftest.py make_catalog, 4 per combination) matching
    the given attributes, in id order."""
    ids = []
    pid = 100
    for c in COLOURS:
        for a in ARTICLES:
            for g in GENDERS:
                for _ in range(4):
                    pid += 1
                    if colour in (None, c) and article in (None, a) and gender in (None, g):
                        ids.append(str(pid))
    return ids


def build_serving_data(root: Path) -> Path:
    """Catalog + index + behavior model + event store under `root`; returns the data dir."""
    from encoders.sequence import SequenceModelConfig
    from index import EdgeStore
    from serving.event_store import SQLiteEventStore
    from training.catalog import load_catalog
    from training.events import write_events
    from training.ingest import run_ingest
    from training.sequences import TrainConfig, run_train_sequences
    from training.simulator import SimulatorConfig, simulate_sessions

    catalog = make_catalog(root / "catalog")
    data_dir = root / "data"
    store = EdgeStore(data_dir / "index")
    try:
        summary = run_ingest(catalog, store, data_dir, progress=False)
    finally:
        store.close()
    assert summary.products_total == 72
    events, _ = simulate_sessions(load_catalog(catalog).products, SimulatorConfig(30, 3, 0), progress=False)
    unseen = set(tiny_ids(*UNSEEN_BY_GRU))
    write_events([e for e in events if e.product_id not in unseen], root / "train_events.jsonl")
    # A model at DATA_DIR/models/sequence is what resolve_paths picks up by default.
    run_train_sequences(
        root / "train_events.jsonl",
        data_dir / "models" / "sequence",
        model_config=SequenceModelConfig(dim=8, hidden=16),
        train_config=TrainConfig(max_epochs=2),
        progress=False,
    )
    # Past shoppers (all simulated events, dated January 2026) give the cold start its popularity.
    with SQLiteEventStore(data_dir / "events.db") as store_events:
        store_events.add(events)
    return data_dir


def serving_data_copy(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy of the session's serving data dir (built on first use)."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        _BUILT[base] = build_serving_data(tmp_path_factory.mktemp("serving-base"))
    copy = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(_BUILT[base], copy)
    return copy

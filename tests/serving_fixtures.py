"""Serving test data: the tiny catalog ingested, simulated shoppers in an event store, a tiny GRU.

Built once per test session (ingest loads both encoders: about 15 s on 2 cores) and copied per test
module, so each module writes its own events and owns its own index folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import ARTICLES, COLOURS, make_catalog

if TYPE_CHECKING:
    from index.server import ServerStore

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


def _ingest(catalog: Path, data_dir: Path) -> int:
    """Index the catalog with the real encoders; returns the products in the index."""
    from index import EdgeStore
    from training.ingest import run_ingest

    store = EdgeStore(data_dir / "index")
    try:
        return run_ingest(catalog, store, data_dir, progress=False).products_total
    finally:
        store.close()


def _train_and_store(root: Path, data_dir: Path, train_events: list, store_events: list) -> None:
    """A tiny GRU at DATA_DIR/models/sequence (what resolve_paths picks up by default) trained on
    `train_events`, and `store_events` in the event store (the cold start's popularity)."""
    from encoders.sequence import SequenceModelConfig
    from serving.event_store import SQLiteEventStore
    from training.events import write_events
    from training.sequences import TrainConfig, run_train_sequences

    write_events(train_events, root / "train_events.jsonl")
    run_train_sequences(
        root / "train_events.jsonl",
        data_dir / "models" / "sequence",
        model_config=SequenceModelConfig(dim=8, hidden=16),
        train_config=TrainConfig(max_epochs=2),
        progress=False,
    )
    with SQLiteEventStore(data_dir / "events.db") as store:
        store.add(store_events)


def build_serving_data(root: Path) -> Path:
    """Catalog + index + behavior model + event store under `root`; returns the data dir."""
    from training.catalog import load_catalog
    from training.simulator import SimulatorConfig, simulate_sessions

    catalog = make_catalog(root / "catalog")
    data_dir = root / "data"
    assert _ingest(catalog, data_dir) == 72
    events, _ = simulate_sessions(load_catalog(catalog).products, SimulatorConfig(30, 3, 0), progress=False)
    unseen = set(tiny_ids(*UNSEEN_BY_GRU))
    # Past shoppers (all simulated events, dated January 2026) give the cold start its popularity.
    _train_and_store(root, data_dir, [e for e in events if e.product_id not in unseen], events)
    return data_dir


def _private_copy(tmp_path_factory: pytest.TempPathFactory, name: str, build, built: dict) -> Path:
    """A private copy of a data dir built once per test session by `build(root)`."""
    base = tmp_path_factory.getbasetemp()
    if base not in built:
        built[base] = build(tmp_path_factory.mktemp(f"{build.__name__}-base"))
    copy = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(built[base], copy)
    return copy


def serving_data_copy(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy of the session's serving data dir (built on first use)."""
    return _private_copy(tmp_path_factory, name, build_serving_data, _BUILT)


def ingest_into_memory_qdrant(data_dir: Path) -> ServerStore:
    """A qdrant-client ":memory:" store (the server backend's API, in-process) holding the catalog of
    `data_dir`, ingested into it with the real ingest (the embedding cache and heads in data_dir make
    the vectors the embedded index's; about 10 s on 2 cores, mostly loading the encoders).

    Every ":memory:" store is a separate, empty database: hand this same store to the Recommender
    (`build_recommender(paths, store=...)`) and close it after the Recommender."""
    from index.server import ServerStore
    from training.ingest import MANIFEST, run_ingest

    catalog = Path(json.loads((data_dir / MANIFEST).read_text())["catalog"])
    store = ServerStore(":memory:")
    try:
        summary = run_ingest(catalog, store, data_dir, progress=False)
    except BaseException:
        store.close()
        raise
    # Every feature came from the cache, so the vectors are exactly the embedded index's.
    assert summary.images_embedded == 0 and not summary.skipped, summary
    return store


# ---- the storefront's catalog: the tiny catalog plus black (and a few brown) shoes -----------------
# The browser test searches "black shoes"; the tiny catalog has none. These rows come after its 72
# products (ids 201+), which stay exactly as they are.
SHOE_COLOURS = {"Black": (25, 25, 25), "Brown": (120, 72, 36)}
SHOE_ARTICLES = ("Formal Shoes", "Casual Shoes")
# (colour, articleType) -> products per gender: 16 black shoes, 4 brown ones so "black" has to filter.
SHOE_COUNTS = {
    ("Black", "Formal Shoes"): 4,
    ("Black", "Casual Shoes"): 4,
    ("Brown", "Casual Shoes"): 2,
}


def draw_shoe(path: Path, colour: tuple[int, int, int], formal: bool, jitter: int) -> None:
    """A 96x128 'shoe photo' in profile: a sole, an upper and (casual) white laces, on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 128), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, y0 = 8 + jitter, 60 + jitter
    if formal:  # low and pointed
        draw.polygon([(x0, y0 + 8), (x0 + 30, y0 + 2), (x0 + 78, y0 + 22), (x0, y0 + 26)], fill=colour)
    else:  # high ankle, round toe, laces
        draw.polygon([(x0, y0 - 14), (x0 + 26, y0 - 14), (x0 + 76, y0 + 14), (x0, y0 + 26)], fill=colour)
        for step in range(3):
            draw.line(
                [(x0 + 26 + step * 9, y0 - 8 + step * 5), (x0 + 32 + step * 9, y0 - 2 + step * 5)], "white"
            )
    draw.rectangle((x0, y0 + 26, x0 + 80, y0 + 32), fill=(200, 200, 200))  # the sole
    image.save(path, quality=90)


def shoe_ids(colour: str | None = None, article: str | None = None) -> list[str]:
    """Product ids of the storefront catalog's shoes matching the given attributes, in id order."""
    return [row[0] for row in _shoe_rows() if colour in (None, row[5]) and article in (None, row[4])]


def _shoe_rows() -> list[list[str]]:
    rows = []
    pid = 200
    for (colour, article), count in SHOE_COUNTS.items():
        for gender in GENDERS:
            for j in range(count):
                pid += 1
                title = f"Brand{j} {gender} {colour} {article}"
                usage = "Formal" if article == "Formal Shoes" else "Casual"
                rows.append(
                    [str(pid), gender, "Footwear", "Shoes", article, colour, "Fall", "2013", usage, title]
                )
    return rows


def build_storefront_data(root: Path) -> Path:
    """The tiny catalog plus shoes, ingested with the real encoders, with simulated shoppers' events
    in the event store (popularity, co-occurrence) and a tiny GRU; returns the data dir."""
    from training.catalog import load_catalog
    from training.simulator import SimulatorConfig, simulate_sessions

    rows = _shoe_rows()
    catalog = make_catalog(root / "catalog", extra_rows=rows)
    for row in rows:
        rgb = SHOE_COLOURS[row[5]]
        draw_shoe(catalog / "images" / f"{row[0]}.jpg", rgb, row[4] == "Formal Shoes", int(row[0]) % 4 * 3)
    data_dir = root / "data"
    assert _ingest(catalog, data_dir) == 72 + len(rows)
    events, _ = simulate_sessions(load_catalog(catalog).products, SimulatorConfig(30, 3, 0), progress=False)
    _train_and_store(root, data_dir, events, events)
    return data_dir


_BUILT_STOREFRONT: dict[Path, Path] = {}  # session base temp -> the storefront data dir built there


def storefront_data_copy(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy of the session's storefront data dir (tiny catalog + shoes; built on first use)."""
    return _private_copy(tmp_path_factory, name, build_storefront_data, _BUILT_STOREFRONT)


def local_backend(data_dir: Path):
    """(recommender, LocalBackend with the data dir's real query encoders) for an in-process app."""
    import json

    from encoders import get_image_encoder, get_text_encoder
    from serving.api import LocalBackend
    from serving.deployments import AppArgs, build_recommender, resolve_paths

    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    encoders = json.loads((data_dir / "ingest.json").read_text())["encoders"]
    backend = LocalBackend(
        recommender,
        get_text_encoder(encoders["text_encoder"], **encoders.get("text_encoder_args", {})),
        get_image_encoder(encoders["image_encoder"], **encoders.get("image_encoder_args", {})),
    )
    return recommender, backend

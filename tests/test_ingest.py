"""Ingest end to end on a tiny generated catalog with the real encoders and the embedded index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from index import EdgeStore, Filters
from serving.cli import main
from serving.search import ProductSearch
from tests.conftest import draw_product, run_killed_on_third_upsert
from training.ingest import ALIAS, run_ingest


def _ingest(catalog: Path, data_dir: Path, **kwargs):
    store = EdgeStore(data_dir / "index")
    try:
        return run_ingest(catalog, store, data_dir, progress=False, **kwargs)
    finally:
        store.close()


@pytest.fixture
def ingested(tiny_catalog: Path, tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "data"
    summary = _ingest(tiny_catalog, data_dir)
    assert summary.products_indexed == 72 and summary.products_total == 72 and summary.alias_swapped
    return tiny_catalog, data_dir


def test_rerun_embeds_and_writes_nothing_when_unchanged(ingested) -> None:
    catalog, data_dir = ingested
    again = _ingest(catalog, data_dir)
    assert (again.images_embedded, again.products_indexed, again.products_unchanged) == (0, 0, 72)
    assert again.products_total == 72 and not again.alias_swapped


def test_rerun_touches_only_changed_new_and_deleted_products(ingested) -> None:
    catalog, data_dir = ingested
    draw_product(catalog / "images" / "101.jpg", (0, 0, 0), "circle", 9)  # changed photo
    lines = (catalog / "products.csv").read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in lines if not ln.startswith("102,")]  # deleted product
    lines = [ln.replace("Brand2", "Brand2 Deluxe") if ln.startswith("103,") else ln for ln in lines]
    shutil.copy(catalog / "images" / "104.jpg", catalog / "images" / "999.jpg")
    lines.append("999,Women,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Brand9 Women Red Tshirt ✓")
    (catalog / "products.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = _ingest(catalog, data_dir)
    assert summary.images_embedded == 1  # only the changed photo; 999 reuses 104's cached bytes
    assert summary.products_indexed == 3  # 101 (photo), 103 (title), 999 (new)
    assert summary.products_deleted == 1 and summary.products_total == 72


def test_killed_ingest_resumes_without_duplicates_or_gaps(
    tiny_catalog: Path, tmp_path: Path, monkeypatch
) -> None:
    from index.edge import EdgeIndex

    data_dir = tmp_path / "data"
    real_upsert = EdgeIndex.upsert
    calls = {"n": 0}

    def dying_upsert(self, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_upsert(self, records)

    monkeypatch.setattr("training.ingest.UPSERT_BATCH", 16)
    monkeypatch.setattr(EdgeIndex, "upsert", dying_upsert)
    with pytest.raises(KeyboardInterrupt):
        _ingest(tiny_catalog, data_dir)
    monkeypatch.setattr(EdgeIndex, "upsert", real_upsert)
    store = EdgeStore(data_dir / "index")
    assert store.get_alias(ALIAS) is None  # the alias never points at a half-filled collection
    store.close()
    summary = _ingest(tiny_catalog, data_dir)
    assert summary.images_embedded == 0  # every image was cached before the kill
    assert summary.products_indexed == 72 - 16 and summary.products_total == 72


def test_corrupt_image_is_skipped_with_its_reason(tiny_catalog: Path, tmp_path: Path) -> None:
    (tiny_catalog / "images" / "105.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    summary = _ingest(tiny_catalog, tmp_path / "data")
    assert [(s.product_id, "unreadable image" in s.reason) for s in summary.skipped] == [("105", True)]
    assert summary.products_total == 71


def test_queries_on_the_ingested_index(ingested) -> None:
    _, data_dir = ingested
    store = EdgeStore(data_dir / "index")
    search = ProductSearch(data_dir, store)
    try:
        for mode in ("fused", "image", "text"):
            hits = search.similar("101", k=5, mode=mode)
            assert len(hits) == 5 and "101" not in [h.product_id for h in hits]
            assert all(h.payload["articleType"] == "Handbags" for h in hits[:3])
        hits = search.search_text("red handbag", k=8, filters=Filters(gender=("Women",), in_stock=True))
        assert hits and all(h.payload["gender"] == "Women" and h.payload["in_stock"] for h in hits)
        cheap = search.search_text("blue watch", k=72, filters=Filters(max_price=30.0))
        assert cheap and all(h.payload["price"] <= 30.0 for h in cheap)
        with pytest.raises(ValueError, match="unknown mode"):
            search.similar("101", mode="behaviour")
        with pytest.raises(ValueError, match="empty search query"):
            search.search_text("   ")
        with pytest.raises(KeyError, match="not in the index"):
            search.similar("no-such-product")
    finally:
        search.close()
        store.close()


def test_cli_similar_and_search_json(ingested, capsys) -> None:
    catalog, data_dir = ingested
    assert main(["similar", "101", "--k", "3", "--json", "--data-dir", str(data_dir)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["product_id"] != "101" and "title" in rows[0]
    photo = catalog / "images" / "130.jpg"
    assert (
        main(
            [
                "search",
                "--image",
                str(photo),
                "--k",
                "2",
                "--mode",
                "image",
                "--json",
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    # The photo finds its own product (the fixture draws the Men and Women variants identically: a tie).
    assert "130" in [r["product_id"] for r in rows] and rows[0]["score"] > 0.99
    assert main(["search", "handbag", "--articleType", "Watches", "--data-dir", str(data_dir)]) == 0
    assert "Watch" in capsys.readouterr().out
    assert main(["similar", "nope", "--data-dir", str(data_dir)]) == 2
    assert "not in the index" in capsys.readouterr().err
    assert main(["search", "x", "--min-price", "50", "--max-price", "10", "--data-dir", str(data_dir)]) == 2


def test_cli_without_an_index_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert main(["similar", "1", "--data-dir", str(tmp_path)]) == 2
    assert "shopguide ingest" in capsys.readouterr().err


def test_queries_use_the_heads_the_live_collection_was_built_with(ingested, monkeypatch) -> None:
    """Retraining the heads without finishing an ingest must not pair new heads with old vectors."""
    from training.align import AlignTrainConfig

    catalog, data_dir = ingested
    # Training is seeded, so retraining with the same seed would give the very same heads.
    monkeypatch.setattr("training.vectors.AlignTrainConfig", lambda: AlignTrainConfig(seed=1))
    store = EdgeStore(data_dir / "index")
    before = ProductSearch(data_dir, store)
    query = before.text_query_vector("red handbag")
    live_version = before.heads.version
    before.close()
    store.close()
    from index.edge import EdgeIndex

    def killed(self, records):
        raise KeyboardInterrupt("simulated kill after retraining")

    monkeypatch.setattr(EdgeIndex, "upsert", killed)
    with pytest.raises(KeyboardInterrupt):
        _ingest(catalog, data_dir, retrain_heads=True)
    monkeypatch.undo()
    store = EdgeStore(data_dir / "index")
    after = ProductSearch(data_dir, store)
    try:
        assert after.heads.version == live_version
        assert after.text_query_vector("red handbag") == pytest.approx(query, abs=1e-6)
    finally:
        after.close()
        store.close()


def test_ingest_and_query_on_the_server_backend(tiny_catalog: Path, tmp_path: Path) -> None:
    """The same ingest and queries through qdrant-client (its in-process mode stands in for a server)."""
    from index import open_store

    store = open_store(qdrant_url=":memory:")
    try:
        summary = run_ingest(tiny_catalog, store, tmp_path / "data", progress=False)
        assert summary.products_total == 72 and store.get_alias(ALIAS) == summary.collection
        again = run_ingest(tiny_catalog, store, tmp_path / "data", progress=False)
        assert again.products_indexed == 0 and again.products_total == 72
        search = ProductSearch(tmp_path / "data", store)
        hits = search.similar("101", k=5, filters=Filters(articleType=("Handbags",)))
        assert len(hits) == 5 and all(h.payload["articleType"] == "Handbags" for h in hits)
    finally:
        store.close()


def test_ingest_killed_with_sigkill_loses_nothing(tiny_catalog: Path, tmp_path: Path) -> None:
    """A real kill -9 between two upsert batches (no flush, no close): the re-run completes the index."""
    data_dir = tmp_path / "data"
    proc = run_killed_on_third_upsert(f"""
        store = EdgeStore(Path({str(data_dir / "index")!r}))
        catalog, data = Path({str(tiny_catalog)!r}), Path({str(data_dir)!r})
        training.ingest.run_ingest(catalog, store, data, progress=False)
    """)
    assert proc.returncode == -9, proc.stderr[-2000:]
    summary = _ingest(tiny_catalog, data_dir)
    assert summary.images_embedded == 0
    assert summary.products_indexed == 72 - 32  # the two acknowledged batches survived the kill
    assert summary.products_total == 72
    store = EdgeStore(data_dir / "index")
    index = store.open(ALIAS)
    assert sorted(index.product_ids()) == sorted(str(i) for i in range(101, 173))
    store.close()


def test_cli_index_behavior_writes_the_models_vectors(ingested, tmp_path: Path, capsys) -> None:
    """Simulated shoppers -> GRU -> behavior vectors in the live collection, ranked like the model."""
    from encoders.sequence import SequenceEncoder, SequenceModelConfig
    from training.behavior import behavior_space, index_recall_at_k
    from training.catalog import load_catalog
    from training.events import write_events
    from training.sequences import TrainConfig, run_train_sequences
    from training.simulator import SimulatorConfig, simulate_sessions

    catalog, data_dir = ingested
    events, _ = simulate_sessions(load_catalog(catalog).products, SimulatorConfig(30, 3, 0), progress=False)
    write_events(events, tmp_path / "events.jsonl")
    config = SequenceModelConfig(dim=8, hidden=16)
    run_train_sequences(
        tmp_path / "events.jsonl",
        tmp_path / "gru",
        model_config=config,
        train_config=TrainConfig(max_epochs=2),
        progress=False,
    )
    assert main(["index", "behavior", "--model", str(tmp_path / "gru"), "--data-dir", str(data_dir)]) == 0
    assert "wrote behavior vectors" in capsys.readouterr().out
    store = EdgeStore(data_dir / "index")
    index = store.open(ALIAS)
    encoder = SequenceEncoder.load(tmp_path / "gru")
    assert index.spaces[behavior_space(encoder).name].dim == 10
    histories = [[(e.product_id, e.type)] for e in events[:20] if e.product_id]
    assert index_recall_at_k(index, encoder, histories, k=5) == 1.0
    store.close()


def test_reused_heads_get_their_versioned_copy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A data dir from before queries loaded heads by version holds only models/alignment.pt: an ingest
    that reuses those heads writes alignment-<version>.pt, so the server can load what the vectors used."""
    from types import SimpleNamespace

    from encoders.alignment import AlignmentHeads
    from serving.search import load_heads_for
    from tests.serving_fixtures import serving_data_copy
    from training.vectors import heads_path, load_or_train_heads, versioned_heads_path

    data_dir = serving_data_copy(tmp_path_factory, "heads-reuse")
    path = heads_path(data_dir)
    saved = AlignmentHeads.load(path)
    versioned_heads_path(data_dir, saved.version).unlink()
    config = saved.config
    towers = SimpleNamespace(
        image=SimpleNamespace(info=SimpleNamespace(id=config.image_encoder, dim=config.image_dim)),
        text=SimpleNamespace(info=SimpleNamespace(id=config.text_encoder, dim=config.text_dim)),
        config=SimpleNamespace(embed_dim=config.embed_dim),
    )
    heads, _ = load_or_train_heads(path, towers, [], None, [], progress=False)  # reused: nothing to train
    assert heads.version == saved.version
    assert versioned_heads_path(data_dir, saved.version).is_file()
    encoder = f"align[{config.image_encoder}+{config.text_encoder}]/{saved.version}"
    assert load_heads_for(data_dir, encoder).version == saved.version


def test_simulate_commands_refuse_an_out_they_cannot_write_before_running(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["simulate", "loop", "--out", str(folder), "--data-dir", str(tmp_path / "none")]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    assert main(["simulate", "sessions", "--out", str(folder), "--shoppers", "1", "--days", "1"]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["simulate", "loop", "--out", str(blocked / "x.json")]) == 2
    assert "cannot write --out" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing ran

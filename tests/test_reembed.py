"""`shopguide reembed` on the tiny catalog: new encoders into a new collection, validated, swapped, undone."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from index import EdgeStore, IndexInUseError
from serving.cli import main
from serving.search import ProductSearch
from tests.conftest import make_catalog, run_killed_on_third_upsert
from training.ingest import ALIAS, MANIFEST, read_alias_history, run_ingest
from training.reembed import (
    NothingToReembed,
    ValidationConfig,
    collection_manifest,
    run_reembed,
)
from training.vectors import EncoderConfig

TINY_CLIP = {"model_name": "shopguide-tiny-vit"}  # 64-px random-init ViT: loads and runs in a blink
# The live recipe before the re-embed: the tiny CLIP image tower (random init) with MiniLM for text.
OLD = EncoderConfig(image_encoder="clip", image_encoder_args=TINY_CLIP)
# Another recipe on the same towers (only the fusion differs): its heads and features are all there
# already, so the tests about validation and resuming spend no time embedding or training.
REWEIGHTED = replace(OLD, fused_image_weight=0.5)


@pytest.fixture(autouse=True)
def towers_built_once(monkeypatch) -> None:
    """Build each set of real encoders once per test process instead of once per run (MiniLM ~2 s)."""
    import training.reembed
    from training.vectors import Towers

    monkeypatch.setattr(training.reembed, "Towers", _cached_towers(Towers))


_TOWERS: dict[str, object] = {}


def _cached_towers(build):
    def towers(config: EncoderConfig):
        key = json.dumps(asdict(config), sort_keys=True)
        if key not in _TOWERS:
            _TOWERS[key] = build(config)
        return _TOWERS[key]

    return towers


@dataclass
class Live:
    catalog: Path
    data_dir: Path
    collection: str  # the live collection built with OLD
    new: EncoderConfig  # another image tower: the same tiny CLIP with other (seeded) weights
    new_yaml: Path  # `new` as an encoder config file for the CLI


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny catalog ingested with OLD (once per module) and a second tiny-CLIP checkpoint."""
    import open_clip

    from encoders.clip import CONFIG_DIR

    root = tmp_path_factory.mktemp("reembed-base")
    catalog = make_catalog(root / "catalog")
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(1)
    torch.save(open_clip.create_model("shopguide-tiny-vit").state_dict(), root / "tiny-clip-b.pt")
    store = EdgeStore(root / "data" / "index")
    try:
        summary = run_ingest(catalog, store, root / "data", encoder_config=OLD, progress=False)
    finally:
        store.close()
    assert summary.products_total == 72
    return root


@pytest.fixture
def live(base: Path, tmp_path: Path) -> Live:
    """A private copy of the ingested data dir (the catalog and checkpoint are shared, read only)."""
    shutil.copytree(base / "data", tmp_path / "data")
    new = replace(OLD, image_encoder_args={**TINY_CLIP, "checkpoint": str(base / "tiny-clip-b.pt")})
    new_yaml = tmp_path / "new.yaml"
    new_yaml.write_text(
        json.dumps({"image_encoder": new.image_encoder, "image_encoder_args": new.image_encoder_args})
    )
    store = EdgeStore(tmp_path / "data" / "index")
    collection = store.get_alias(ALIAS)
    store.close()
    return Live(base / "catalog", tmp_path / "data", collection, new, new_yaml)


def _reembed(live: Live, config: EncoderConfig, **kwargs):
    store = EdgeStore(live.data_dir / "index")
    try:
        return run_reembed(live.catalog, store, live.data_dir, config, progress=False, **kwargs)
    finally:
        store.close()


def _alias(data_dir: Path) -> str | None:
    store = EdgeStore(data_dir / "index")
    try:
        return store.get_alias(ALIAS)
    finally:
        store.close()


def _served(index, product_id: str = "101") -> list[tuple[str, float]]:
    """What a server answers for 'more like this' on the collection it holds."""
    vector = index.get([product_id], with_vectors=True)[0].vectors["fused"]
    return [(h.product_id, round(h.score, 6)) for h in index.search("fused", vector, k=8)]


def test_cli_reembed_swaps_while_a_server_holds_the_live_collection(live: Live, capsys) -> None:
    # A "server": this store owns the live shard for the whole test (a second opener gets IndexInUseError).
    server = EdgeStore(live.data_dir / "index")
    held = server.open(ALIAS)
    with pytest.raises(IndexInUseError):  # so the re-embed below cannot have opened it
        EdgeStore(live.data_dir / "index").open(ALIAS)
    before = _served(held)
    args = ["--catalog", str(live.catalog), "--data-dir", str(live.data_dir)]
    assert main(["reembed", "--encoder", "clip", "--config", str(live.new_yaml), *args]) == 0
    out = capsys.readouterr().out
    new = _alias(live.data_dir)
    assert new != live.collection and f"alias products: {live.collection} -> {new}" in out
    assert "FAIL" not in out and "ok   title_queries" in out
    assert _served(held) == before  # the old collection kept serving, untouched
    held.close()
    server.close()

    # What a server reads after the alias moved: the new towers and heads, and the old ones kept.
    manifest = collection_manifest(live.data_dir, new)
    assert manifest["encoders"]["image_encoder_args"] == live.new.image_encoder_args
    assert json.loads((live.data_dir / MANIFEST).read_text()) == manifest
    assert collection_manifest(live.data_dir, live.collection)["encoders"]["image_encoder_args"] == TINY_CLIP
    store = EdgeStore(live.data_dir / "index")
    search = ProductSearch(live.data_dir, store)
    try:
        assert search.index.name == new and search.heads.version == manifest["heads_version"]
        hits = search.search_text("red handbag", k=4)
        assert [(h.payload["baseColour"], h.payload["articleType"]) for h in hits] == [
            ("Red", "Handbags")
        ] * 4
    finally:
        search.close()
        store.close()

    assert main(["reembed", "--swap-back", "--data-dir", str(live.data_dir)]) == 0
    assert f"alias products: {new} -> {live.collection}" in capsys.readouterr().out
    assert _alias(live.data_dir) == live.collection
    assert json.loads((live.data_dir / MANIFEST).read_text())["collection"] == live.collection
    assert main(["reembed", "--swap-back", "--data-dir", str(live.data_dir)]) == 0  # and forth again
    assert _alias(live.data_dir) == new
    history = read_alias_history(live.data_dir)
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("ingest", None, live.collection),
        ("reembed", live.collection, new),
        ("swap-back", new, live.collection),
        ("swap-back", live.collection, new),
    ]


def test_refuses_the_live_recipe_and_a_missing_encoder(live: Live, capsys) -> None:
    args = ["--catalog", str(live.catalog), "--data-dir", str(live.data_dir)]
    # --encoder clip on a live tiny-CLIP collection keeps its args: the very same recipe.
    assert main(["reembed", "--encoder", "clip", *args]) == 2
    # Refused from the live manifest before any embedding or heads training.
    assert (
        "is already built with clip_shopguide-tiny-vit/1+random + minilm_l6_v2/1" in capsys.readouterr().err
    )
    assert main(["reembed", *args]) == 2
    assert "--encoder NAME" in capsys.readouterr().err
    assert main(["reembed", "--encoder", "no_such_net", *args]) == 2
    assert "unknown image encoder 'no_such_net'" in capsys.readouterr().err
    with pytest.raises(NothingToReembed):
        _reembed(live, OLD)
    store = EdgeStore(live.data_dir / "index")
    assert store.list_collections() == [live.collection] and store.get_alias(ALIAS) == live.collection
    store.close()
    assert main(["reembed", "--swap-back", "--data-dir", str(live.data_dir)]) == 2
    assert "nothing to swap back to" in capsys.readouterr().err


def test_missing_points_fail_validation_and_a_rerun_completes(live: Live, monkeypatch) -> None:
    import training.reembed

    real_write = training.reembed.write_collection

    def lossy_write(store, name, spaces, vectors, **kwargs):
        result = real_write(store, name, spaces, vectors, **kwargs)
        with store.open_collection(name) as index:
            index.delete(["101", "150", "172"])  # points lost on the way (a crash, a bug)
        return result

    monkeypatch.setattr(training.reembed, "write_collection", lossy_write)
    failed = _reembed(live, REWEIGHTED)
    assert not failed.swapped and failed.previous == live.collection
    assert "count" in [c.name for c in failed.validation.failures()]
    assert "missing 3" in failed.validation.checks[0].detail
    assert _alias(live.data_dir) == live.collection
    monkeypatch.undo()
    again = _reembed(live, REWEIGHTED)
    assert again.products_indexed == 3 and again.embed.images == 0  # resumed: only the lost points
    assert again.validation.ok and again.swapped and _alias(live.data_dir) == again.collection


def test_vectors_on_the_wrong_products_fail_until_rebuilt(live: Live, monkeypatch, capsys) -> None:
    import training.reembed

    real_write = training.reembed.write_collection

    def shifted_write(store, name, spaces, vectors, **kwargs):
        result = real_write(store, name, spaces, vectors, **kwargs)
        with store.open_collection(name) as index:  # every product gets its neighbour's vectors
            records = index.get([p.id for p in vectors.products], with_vectors=True)
            shifted = records[1:] + records[:1]
            index.update_vectors({r.product_id: s.vectors for r, s in zip(records, shifted, strict=True)})
        return result

    monkeypatch.setattr(training.reembed, "write_collection", shifted_write)
    reweighted_yaml = live.data_dir.parent / "reweighted.yaml"
    reweighted_yaml.write_text(json.dumps(asdict(REWEIGHTED)))
    args = [
        "--catalog",
        str(live.catalog),
        "--data-dir",
        str(live.data_dir),
        "--config",
        str(reweighted_yaml),
    ]
    assert main(["reembed", *args]) == 3
    captured = capsys.readouterr()
    assert "FAIL vectors" in captured.out and "cosine" in captured.out
    assert f"alias products still points at {live.collection}" in captured.err
    assert _alias(live.data_dir) == live.collection
    monkeypatch.undo()
    # Payloads are right, so a plain re-run writes nothing and fails the same way; --rebuild repairs it.
    assert main(["reembed", *args]) == 3
    capsys.readouterr()
    assert main(["reembed", "--rebuild", *args]) == 0
    assert "alias products:" in capsys.readouterr().out
    assert _alias(live.data_dir) != live.collection


def test_a_collapsed_image_encoder_fails_self_retrieval(live: Live) -> None:
    """An encoder that maps every photo to one vector (broken weights or preprocessing) never goes live."""
    from encoders.base import EncoderInfo, ImageEncoder
    from encoders.registry import register_image_encoder

    class Collapsed(ImageEncoder):
        info = EncoderInfo("test_collapsed", "1", 16)
        input_size = 32

        def preprocess(self, image):
            return torch.zeros(3, 32, 32)

        def encode_tensors(self, pixels):
            return np.full((len(pixels), 16), 0.25, np.float32)

    register_image_encoder("test_collapsed")(Collapsed)
    summary = _reembed(live, replace(OLD, image_encoder="test_collapsed", image_encoder_args={}))
    failed = {c.name: c.detail for c in summary.validation.failures()}
    assert "self_top1" in failed and "/image ->" in failed["self_top1"]
    assert not summary.swapped and _alias(live.data_dir) == live.collection


def test_cached_features_from_other_weights_fail_validation(live: Live) -> None:
    """Features another build of the same encoder id left in the cache (e.g. a Ray node with other
    weights files) are caught by recomputing a sample here."""
    from training.catalog import load_catalog
    from training.features import EmbeddingCache, file_hash
    from training.reembed import Towers  # the towers_built_once cache: no second load

    encoder_id = Towers(OLD).image.info.id
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(live.data_dir / "cache" / "embeddings.sqlite")
    try:
        photos = {file_hash(p.image_path) for p in load_catalog(live.catalog).products}
        rows = rng.normal(size=(len(photos), 64)).astype(np.float32)  # (photos, image_dim)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        cache.put_many(encoder_id, dict(zip(sorted(photos), rows, strict=True)))
    finally:
        cache.close()
    summary = _reembed(live, REWEIGHTED)
    failed = {c.name: c.detail for c in summary.validation.failures()}
    assert "features" in failed and "other weights" in failed["features"]
    assert not summary.swapped and _alias(live.data_dir) == live.collection


def test_reembed_and_swap_back_on_the_server_backend(live: Live) -> None:
    """The same job through qdrant-client (its in-process mode stands in for a Qdrant server)."""
    from index import open_store
    from training.reembed import swap_back

    store = open_store(qdrant_url=":memory:")
    try:
        old = run_ingest(live.catalog, store, live.data_dir, encoder_config=OLD, progress=False).collection
        summary = run_reembed(live.catalog, store, live.data_dir, REWEIGHTED, progress=False)
        assert summary.validation.ok and summary.swapped and store.get_alias(ALIAS) == summary.collection
        assert swap_back(store, live.data_dir) == (summary.collection, old)
        assert store.get_alias(ALIAS) == old and sorted(store.list_collections()) == sorted(
            [old, summary.collection]
        )
    finally:
        store.close()


def test_reembed_killed_with_sigkill_keeps_the_old_collection_serving(live: Live) -> None:
    """kill -9 between two upsert batches of the new collection: the alias never moved, the held live
    collection answers as before, and a re-run finishes the new collection from what was written."""
    server = EdgeStore(live.data_dir / "index")
    held = server.open(ALIAS)
    before = _served(held)
    proc = run_killed_on_third_upsert(f"""
        from training.reembed import run_reembed
        from training.vectors import EncoderConfig
        data = Path({str(live.data_dir)!r})
        config = EncoderConfig(image_encoder="clip", image_encoder_args={live.new.image_encoder_args!r})
        run_reembed(Path({str(live.catalog)!r}), EdgeStore(data / "index"), data, config, progress=False)
    """)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _alias(live.data_dir) == live.collection
    assert _served(held) == before and held.count() == 72
    held.close()
    server.close()
    summary = _reembed(live, live.new, validation=ValidationConfig(sample=72))
    assert summary.embed.images == 0  # every photo reached the cache before the kill
    assert summary.products_indexed == 72 - 32  # the two acknowledged batches survived
    assert summary.validation.ok and summary.swapped and summary.previous == live.collection
    assert _alias(live.data_dir) == summary.collection

"""Model registry: versions, the gated promotion, rollback, and a live pointer that is never torn."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders.sequence import CHECKPOINT_NAME
from training.registry import GATE_METRIC, ModelRegistry, RegistryError


def _model(tmp_path: Path, name: str, score: float) -> Path:
    """A stand-in model folder whose checkpoint bytes carry its score (the registry never loads it)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / CHECKPOINT_NAME).write_text(str(score))
    return folder


def _evaluate(folder: Path) -> dict:
    return {GATE_METRIC: float((folder / CHECKPOINT_NAME).read_text()), "HR@10": 0.5}


def test_register_list_and_first_promotion(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.register(_model(tmp_path, "a", 0.30), "full", training={"events": 100})
    assert registry.live() is None
    assert [v.version for v in registry.list()] == [first.version]
    result = registry.promote(first.version, _evaluate)
    assert result.promoted and result.reason == "no live model yet" and registry.live() == first.version
    assert (registry.path(first.version) / CHECKPOINT_NAME).read_text() == "0.3"
    assert registry.get(first.version).training == {"events": 100}


def test_promotion_is_gated_on_the_same_held_out_events(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    live = registry.register(_model(tmp_path, "a", 0.30), "full")
    registry.promote(live.version, _evaluate)
    worse = registry.register(_model(tmp_path, "b", 0.28), "incremental", parent=live.version)
    refused = registry.promote(worse.version, _evaluate, tolerance=0.02)
    assert not refused.promoted and registry.live() == live.version
    assert refused.live_metrics[GATE_METRIC] == 0.30 and "floor 0.2940" in refused.reason
    slightly_worse = registry.register(_model(tmp_path, "c", 0.295), "incremental", parent=live.version)
    assert registry.promote(slightly_worse.version, _evaluate, tolerance=0.02).promoted  # within tolerance
    forced = registry.promote(worse.version, _evaluate, tolerance=0.0, force=True)
    assert forced.promoted and "--force" in forced.reason and registry.live() == worse.version


def test_rollback_walks_back_through_promotions(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    versions = [
        registry.register(_model(tmp_path, n, s), "full") for n, s in (("a", 0.1), ("b", 0.2), ("c", 0.3))
    ]
    for v in versions:
        assert registry.promote(v.version, _evaluate).promoted
    assert registry.rollback() == versions[1].version
    assert registry.rollback() == versions[0].version  # two steps back, not back and forth
    with pytest.raises(RegistryError, match="first live version"):
        registry.rollback()
    assert [e["action"] for e in registry.history()] == ["promote"] * 3 + ["rollback"] * 2


def test_clear_errors(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(RegistryError, match="no sequence_model.pt"):
        registry.register(tmp_path, "full")
    with pytest.raises(RegistryError, match="no model version 'nope'"):
        registry.get("nope")
    with pytest.raises(RegistryError, match="nothing is live"):
        registry.rollback()
    v = registry.register(_model(tmp_path, "a", 0.1), "full")
    with pytest.raises(RegistryError, match="without NDCG@10"):
        registry.promote(v.version, lambda folder: {"HR@10": 0.1})


def test_a_half_copied_version_is_invisible(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    (registry.root / "versions" / "20260101-000000-abcdef.partial").mkdir()
    assert registry.list() == []

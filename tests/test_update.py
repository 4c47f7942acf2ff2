"""User-encoder updates: full, incremental (warm start, vocabulary growth), hybrid triggers, the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.sequence import SequenceEncoder, SequenceModelConfig
from training.events import Event
from training.registry import ModelRegistry
from training.sequences import TrainConfig
from training.session_data import histories_from_events
from training.update import UpdatePolicy, decide, expand_model, holdout_metrics, run_update

MODEL = SequenceModelConfig(dim=8, hidden=16)
TRAIN = TrainConfig(max_epochs=3, batch_size=32)
DAY = 86400.0


def _events(users: range, items: int, start: float, seed: int, offset: int = 0) -> list[Event]:
    """Shoppers walking a ring of products (p -> p+1 -> p+2 ...): a pattern a GRU learns in a few epochs."""
    rng = np.random.default_rng(seed)
    out = []
    for user in users:
        first = int(rng.integers(items))
        for step in range(6):
            pid = f"p{offset + (first + step) % items}"
            out.append(Event(f"e{seed}-{user}-{step}", f"u{user}", pid, "view", ts=start + user * 60 + step))
    return out


def test_full_then_incremental_grows_the_vocabulary_and_keeps_lineage(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    day1 = _events(range(60), 20, start=0.0, seed=1)
    full = run_update(day1, registry, "full", model_config=MODEL, train_config=TRAIN)
    assert full["strategy"] == "full" and full["items"] == 20 and full["parent"] is None
    registry.promote(full["version"], lambda folder: holdout_metrics(folder, histories_from_events(day1)))
    # Day 2: new shoppers, and five products the live model has never seen.
    day2 = _events(range(100, 140), 25, start=DAY, seed=2)
    update = run_update(day1 + day2, registry, "incremental", train_config=TRAIN)
    assert update["strategy"] == "incremental" and update["parent"] == full["version"]
    assert update["items"] == 25 and update["users"] == 40  # only shoppers with events since the watermark
    encoder = SequenceEncoder.load(registry.path(update["version"]))
    assert encoder.item_ids[:20] == SequenceEncoder.load(registry.path(full["version"])).item_ids
    assert set(encoder.item_ids[20:]) == {f"p{i}" for i in range(20, 25)}
    assert registry.get(update["version"]).training["watermark_ts"] == max(e.ts for e in day2)


def test_expand_model_keeps_old_scores_and_starts_new_items_average(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    events = _events(range(40), 12, start=0.0, seed=3)
    version = run_update(events, registry, "full", model_config=MODEL, train_config=TRAIN)["version"]
    encoder = SequenceEncoder.load(registry.path(version))
    grown = SequenceEncoder(
        expand_model(encoder, [*encoder.item_ids, "new1", "new2"]), [*encoder.item_ids, "new1", "new2"]
    )
    history = [[("p1", "view"), ("p2", "view")]]
    np.testing.assert_allclose(grown.scores(history)[:, :12], encoder.scores(history), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        table = grown.model.item_embedding.weight
        torch.testing.assert_close(table[13], table[1:13].mean(dim=0))
    with pytest.raises(ValueError, match="must start with"):
        expand_model(encoder, ["other", *encoder.item_ids])


def test_hybrid_triggers(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    policy = UpdatePolicy(max_vocab_growth=0.10, max_full_age_days=7)
    assert decide(registry, [], policy, now=0.0) == ("full", "no live model yet")
    day1 = _events(range(60), 20, start=0.0, seed=1)
    version = run_update(day1, registry, "full", model_config=MODEL, train_config=TRAIN, now=0.0)["version"]
    registry.promote(version, lambda folder: holdout_metrics(folder, histories_from_events(day1)))
    created = registry.get(version).created
    same_items = _events(range(100, 120), 20, start=DAY, seed=4)
    assert decide(registry, day1 + same_items, policy, now=created + DAY)[0] == "incremental"
    many_new = _events(range(200, 220), 10, start=DAY, seed=5, offset=100)
    strategy, reason = decide(registry, day1 + many_new, policy, now=created + DAY)
    assert strategy == "full" and "new products" in reason
    strategy, reason = decide(registry, day1 + same_items, policy, now=created + 8 * DAY)
    assert strategy == "full" and "days old" in reason


def test_a_stale_model_pays_for_unknown_targets(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = run_update(
        _events(range(40), 12, 0.0, seed=6), registry, "full", model_config=MODEL, train_config=TRAIN
    )
    unknown = {"u": [("p1", "view"), ("zzz", "view")]}
    assert holdout_metrics(registry.path(version["version"]), unknown)["HR@10"] == 0.0
    with pytest.raises(ValueError, match="unknown strategy"):
        run_update([], registry, "sometimes")


def test_cli_update_promote_list_rollback(tmp_path: Path, capsys) -> None:
    from serving.cli import main
    from training.events import write_events

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {dim: 8, hidden: 16}\ntrain: {max_epochs: 2, batch_size: 32}\n")
    day1 = _events(range(40), 12, start=0.0, seed=7)
    write_events(day1, tmp_path / "day1.jsonl")
    write_events(day1 + _events(range(100, 130), 14, start=DAY, seed=8), tmp_path / "day2.jsonl")
    common = ["--data-dir", str(tmp_path / "data"), "--config", str(config), "--no-progress"]
    assert (
        main(
            [
                "train",
                "update",
                "--strategy",
                "full",
                "--events",
                str(tmp_path / "day1.jsonl"),
                "--promote",
                *common,
            ]
        )
        == 0
    )
    assert "promoted: no live model yet" in capsys.readouterr().out
    code = main(["train", "update", "--strategy", "incremental", "--events", str(tmp_path / "day2.jsonl"),
                 "--promote", "--force", *common])  # fmt: skip
    assert code == 0 and "incremental update" in capsys.readouterr().out
    assert main(["models", "list", "--data-dir", str(tmp_path / "data")]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 2 and listing[1].startswith("* ") and "incremental" in listing[1]
    assert main(["models", "rollback", "--data-dir", str(tmp_path / "data")]) == 0
    assert "live model is now" in capsys.readouterr().out
    assert main(["models", "rollback", "--data-dir", str(tmp_path / "data")]) == 2  # nothing earlier
    assert "first live version" in capsys.readouterr().err


def test_cli_update_reads_the_event_store_by_default(tmp_path: Path, capsys) -> None:
    from serving.cli import main
    from serving.event_store import SQLiteEventStore

    events = _events(range(40), 12, start=0.0, seed=9)
    with SQLiteEventStore(tmp_path / "data" / "events.db") as store:
        store.add(events)
        assert [e.event_id for e in store.iter_events(batch=7)] == [e.event_id for e in events]
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {dim: 8, hidden: 16}\ntrain: {max_epochs: 1, batch_size: 32}\n")
    args = [
        "train",
        "update",
        "--strategy",
        "full",
        "--data-dir",
        str(tmp_path / "data"),
        "--config",
        str(config),
    ]
    assert main([*args, "--no-progress"]) == 0
    assert "full update" in capsys.readouterr().out
    trained = ModelRegistry(tmp_path / "data" / "models" / "registry").list()
    assert len(trained) == 1 and trained[0].training["events"] == len(events)  # the store's whole snapshot
    assert main(["train", "update", "--data-dir", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "no event store" in capsys.readouterr().err

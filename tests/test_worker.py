"""`shopguide worker`: periodic updates land in the registry, and a running recommender follows them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from encoders.sequence import SequenceModelConfig
from serving.cli import main
from serving.deployments import AppArgs, build_recommender, resolve_paths
from tests.serving_fixtures import serving_data_copy
from training.events import Event
from training.registry import ModelRegistry
from training.sequences import TrainConfig
from training.worker import WorkerConfig, run_worker

# Tiny, quick training (the real defaults train for minutes).
FAST = {"model_config": SequenceModelConfig(dim=8, hidden=16), "train_config": TrainConfig(max_epochs=2)}


@pytest.fixture
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serving_data_copy(tmp_path_factory, "worker")


def test_worker_updates_promote_and_the_server_follows(data_dir: Path) -> None:
    recommender = build_recommender(resolve_paths(AppArgs(data_dir=str(data_dir))))
    assert recommender.model_versions()["user_encoder_version"] == "folder:sequence"
    first = run_worker(data_dir, WorkerConfig(strategy="full", **FAST), once=True, report=lambda _: None)
    assert [(e["job"], e["ok"], e["ran"], e["promoted"]) for e in first] == [("update", True, "full", True)]
    live = ModelRegistry(data_dir / "models" / "registry").live()
    assert live == first[0]["version"]
    assert recommender.refresh()["live_model"]["to"] == live  # what the server's watcher does
    # Nothing new since the live model's watermark: the next run trains nothing.
    again = run_worker(data_dir, WorkerConfig(strategy="hybrid", **FAST), once=True, report=lambda _: None)
    assert again[0]["ran"] == "skipped" and ModelRegistry(data_dir / "models" / "registry").live() == live
    # New events (posted through the server while it runs): an incremental update from the live model.
    shopper = [
        Event(f"w-{j}", "worker-shopper", pid, "click", ts=2e9 + j)
        for j, pid in enumerate(["101", "102", "103"])
    ]
    recommender.add_events([e.to_dict() for e in shopper])
    third = run_worker(
        data_dir, WorkerConfig(strategy="incremental", **FAST), once=True, report=lambda _: None
    )
    assert third[0]["ran"] == "incremental" and third[0]["train_seconds"] > 0
    log = [json.loads(line) for line in (data_dir / "worker.jsonl").read_text().splitlines()]
    assert [entry["ran"] for entry in log] == ["full", "skipped", "incremental"]
    recommender.close()


def test_a_failing_job_is_reported_and_the_worker_goes_on(tmp_path: Path) -> None:
    stop = threading.Event()
    seen: list[dict] = []

    def report(entry: dict) -> None:
        seen.append(entry)
        if len(seen) == 2:
            stop.set()

    run_worker(tmp_path, WorkerConfig(update_every_s=0.05), stop=stop, report=report)
    assert len(seen) == 2 and not any(e["ok"] for e in seen)
    assert "no event store" in seen[0]["error"] and "shopguide serve" in seen[0]["error"]


def test_worker_cli_runs_once_and_rejects_bad_settings(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "fast.yaml"
    config.write_text("model: {dim: 8, hidden: 16}\ntrain: {max_epochs: 2}\n")
    args = ["worker", "--data-dir", str(data_dir), "--strategy", "full", "--once", "--config", str(config)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"job": "update"' in out and '"promoted": true' in out
    with pytest.raises(ValueError, match="update_every_s must be > 0"):
        WorkerConfig(update_every_s=0)

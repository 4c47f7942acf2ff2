"""Model registry: every trained user encoder is a version folder (model, config, metrics, lineage);
one of them is live, promotion is gated on offline metrics, and rollback restores the previous live one.

Layout under ROOT (e.g. DATA_DIR/models/registry):
    versions/<version>/sequence_model.pt   the checkpoint (state_dict + config + item ids)
    versions/<version>/meta.json           {version, created, strategy, parent, training, metrics}
    LIVE                                   the live version id (replaced atomically by rename)
    history.jsonl                          one line per promotion or rollback, oldest first

A running server watches LIVE; the registry itself never touches a server.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from encoders.sequence import CHECKPOINT_NAME

GATE_METRIC = "NDCG@10"  # what promotion compares; recall-style HR@10 moves with it
DEFAULT_TOLERANCE = 0.02  # a candidate may be up to 2% (relative) below the live model and still go live


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked; the message says why and what to do."""


@dataclass
class ModelVersion:
    """What the registry knows about one trained model."""

    version: str
    created: float  # seconds since the epoch
    strategy: str  # "full" | "incremental" | "imported"
    parent: str | None = None  # the version an incremental update started from
    training: dict = field(default_factory=dict)  # events used: watermark, counts, seconds, vocabulary size
    metrics: dict = field(default_factory=dict)  # offline metrics on the held-out events it was trained for


@dataclass
class Promotion:
    """The outcome of a gated promotion: both sides measured on the same held-out events."""

    promoted: bool
    candidate: str
    live: str | None
    candidate_metrics: dict
    live_metrics: dict | None
    reason: str


class ModelRegistry:
    """Versions of the GRU user encoder in a folder; see the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)

    # ---- versions ----------------------------------------------------------------------------------
    def register(
        self,
        model_folder: Path,
        strategy: str,
        parent: str | None = None,
        training: dict | None = None,
        metrics: dict | None = None,
    ) -> ModelVersion:
        """Copy a trained model folder in as a new version (never live until promoted)."""
        checkpoint = Path(model_folder) / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise RegistryError(f"no {CHECKPOINT_NAME} in {model_folder}; train a model there first")
        if parent is not None:
            self.get(parent)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        version = ModelVersion(
            f"{stamp}-{uuid.uuid4().hex[:6]}", time.time(), strategy, parent, training or {}, metrics or {}
        )
        target = self.root / "versions" / version.version
        staging = target.with_name(target.name + ".partial")
        staging.mkdir()
        shutil.copy2(checkpoint, staging / CHECKPOINT_NAME)
        (staging / "meta.json").write_text(json.dumps(asdict(version), indent=2))
        staging.rename(target)  # a version folder is complete or absent, never half-written
        return version

    def get(self, version: str) -> ModelVersion:
        meta = self.root / "versions" / version / "meta.json"
        if not meta.is_file():
            known = ", ".join(v.version for v in self.list()) or "none"
            raise RegistryError(f"no model version {version!r} in {self.root}; known: {known}")
        return ModelVersion(**json.loads(meta.read_text()))

    def path(self, version: str) -> Path:
        """The version's folder (what `SequenceEncoder.load` takes)."""
        self.get(version)
        return self.root / "versions" / version

    def list(self) -> list[ModelVersion]:
        """Every complete version, oldest first."""
        found = []
        for folder in (self.root / "versions").iterdir():
            if folder.is_dir() and not folder.name.endswith(".partial") and (folder / "meta.json").is_file():
                found.append(ModelVersion(**json.loads((folder / "meta.json").read_text())))
        return sorted(found, key=lambda v: (v.created, v.version))

    # ---- the live pointer --------------------------------------------------------------------------
    def live(self) -> str | None:
        pointer = self.root / "LIVE"
        if not pointer.is_file():
            return None
        return pointer.read_text().strip() or None

    def _set_live(self, version: str, action: str, detail: dict) -> None:
        tmp = self.root / f"LIVE.{os.getpid()}.tmp"
        tmp.write_text(version + "\n")
        tmp.replace(self.root / "LIVE")  # atomic: a reader sees the old or the new id, never a mix
        with (self.root / "history.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"ts": time.time(), "action": action, "version": version, **detail}) + "\n")

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def promote(
        self,
        candidate: str,
        evaluate: Callable[[Path], dict],
        tolerance: float = DEFAULT_TOLERANCE,
        force: bool = False,
    ) -> Promotion:
        """Make `candidate` live if its GATE_METRIC on the caller's held-out events is not more than
        `tolerance` (relative) below the live model's on the same events. `evaluate(model_folder)` returns
        metrics for a model; both models are evaluated here, now, so the comparison is like for like."""
        self.get(candidate)
        current = self.live()
        candidate_metrics = evaluate(self.path(candidate))
        if GATE_METRIC not in candidate_metrics:
            raise RegistryError(f"evaluate() returned {sorted(candidate_metrics)}, without {GATE_METRIC}")
        live_metrics = evaluate(self.path(current)) if current and current != candidate else None
        if live_metrics is None:
            reason = "no live model yet" if current is None else "already live"
            passed = True
        else:
            floor = live_metrics[GATE_METRIC] * (1 - tolerance)
            passed = candidate_metrics[GATE_METRIC] >= floor
            reason = (
                f"{GATE_METRIC} {candidate_metrics[GATE_METRIC]:.4f} vs live {live_metrics[GATE_METRIC]:.4f} "
                f"(floor {floor:.4f} at tolerance {tolerance:.0%})"
            )
        if not passed and force:
            reason += "; promoted anyway (--force)"
            passed = True
        if passed and candidate != current:
            self._set_live(candidate, "promote", {"previous": current, "reason": reason})
        return Promotion(passed, candidate, current, candidate_metrics, live_metrics, reason)

    def rollback(self) -> str:
        """Make the previously live version live again; returns it."""
        current = self.live()
        if current is None:
            raise RegistryError("nothing is live, so there is nothing to roll back")
        previous = None
        # The version that was live when `current` was last promoted (rolling back twice goes two steps
        # back, not back and forth).
        for entry in reversed(self.history()):
            if entry["version"] == current and entry["action"] == "promote":
                previous = entry.get("previous")
                break
        if previous is None:
            raise RegistryError(f"{current} is the first live version; there is no earlier one to go back to")
        self.get(previous)
        self._set_live(previous, "rollback", {"previous": current, "reason": f"rolled back from {current}"})
        return previous

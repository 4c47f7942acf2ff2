"""User-encoder updates from shopper events: incremental (warm start), full retrain, or hybrid.

- full: train from scratch on every event.
- incremental: start from the live model; products first seen since its watermark get embedding rows
  (initialized to the mean item row, so they start as an "average product"); fine-tune for a few epochs
  on the shoppers with events since the watermark (their whole histories, so the GRU sees context).
- hybrid: incremental, unless a trigger calls for a full retrain (UpdatePolicy: vocabulary growth since
  the last full retrain, the live model's metric drop on recent events, the age of the last full retrain).

Every result is registered as a version (training.registry) with its watermark, lineage and metrics;
promotion is a separate, gated step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from encoders.sequence import GRUSequenceModel, SequenceEncoder, SequenceModelConfig
from training.events import Event
from training.registry import ModelRegistry
from training.sequences import (
    SequenceData,
    TrainConfig,
    evaluate_model,
    item_vocabulary,
    leave_one_out,
    train_model,
)
from training.session_data import histories_from_events

STRATEGIES = ("incremental", "full", "hybrid")


@dataclass
class UpdatePolicy:
    """When hybrid retrains from scratch, and how incremental updates train."""

    max_vocab_growth: float = 0.10  # full retrain when products unknown to the live model exceed this share
    max_metric_drop: float = 0.10  # ...or its NDCG@10 on recent events fell this much (relative) below
    # the value recorded when it was trained
    max_full_age_days: float = 7.0  # ...or the last full retrain is older than this
    incremental_epochs: int = 3  # fine-tuning epochs of an incremental update
    incremental_lr: float = 5e-4  # a quarter of the from-scratch rate: adjust, do not forget


def _data(histories: dict[str, list[tuple[str, str]]], path: str = "events") -> tuple[SequenceData, list]:
    users = sorted(histories)
    data = SequenceData(users, [[pid for pid, _ in histories[u]] for u in users], path)
    return data, [[kind for _, kind in histories[u]] for u in users]


def expand_model(encoder: SequenceEncoder, item_ids: Sequence[str]) -> GRUSequenceModel:
    """A copy of the encoder's model over `item_ids` (its own ids first, in order, then new ones).

    New items get the mean item embedding and mean bias. Models with attribute bags are not expanded
    (the new items' attributes are unknown here): retrain those in full."""
    old = encoder.model
    n_old = len(encoder.item_ids)
    if list(item_ids[:n_old]) != encoder.item_ids:
        raise ValueError("the new vocabulary must start with the live model's item ids, in their order")
    if old.attribute_embedding is not None:
        raise ValueError("models with attribute bags cannot grow their vocabulary; run a full update")
    content = None
    if old.content_projection is not None:  # new items have no content row yet: zeros (no side info)
        content = torch.zeros(len(item_ids) + 1, old.content.shape[1])
        content[: n_old + 1] = old.content
    model = GRUSequenceModel(old.config, len(item_ids), content=content)
    state = old.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            source = state[name]
            if name in ("item_embedding.weight", "item_bias"):
                tensor[: n_old + 1] = source
                tensor[n_old + 1 :] = source[1:].mean(dim=0)  # row 0 is padding
            elif name != "content":
                tensor.copy_(source)
    return model


def _metric_on(encoder: SequenceEncoder, histories: dict[str, list[tuple[str, str]]]) -> float | None:
    """The model's validation NDCG@10 on these histories (leave-one-out), over its own vocabulary."""
    known = {u: [(p, t) for p, t in h if p in encoder.item_index] for u, h in histories.items()}
    known = {u: h for u, h in known.items() if len(h) >= 3}
    if not known:
        return None
    data, kinds = _data(known)
    split = leave_one_out(data, encoder.item_ids, kinds)
    return float(evaluate_model(encoder.model, split, "valid").metrics()["NDCG@10"])


def decide(
    registry: ModelRegistry, events: Sequence[Event], policy: UpdatePolicy, now: float
) -> tuple[str, str]:
    """(strategy, reason) for a hybrid update."""
    live = registry.live()
    if live is None:
        return "full", "no live model yet"
    encoder = SequenceEncoder.load(registry.path(live))
    meta = registry.get(live)
    full = meta
    while full.strategy != "full" and full.parent is not None:  # the full retrain this lineage started from
        full = registry.get(full.parent)
    new_items = {e.product_id for e in events if e.product_id and e.product_id not in encoder.item_index}
    growth = len(new_items) / max(1, len(encoder.item_ids))
    if growth > policy.max_vocab_growth:
        return (
            "full",
            f"{len(new_items)} new products = {growth:.1%} of the vocabulary > {policy.max_vocab_growth:.0%}",
        )
    age_days = (now - full.created) / 86400
    if age_days > policy.max_full_age_days:
        return "full", f"last full retrain is {age_days:.1f} days old > {policy.max_full_age_days}"
    recorded = meta.metrics.get("NDCG@10")
    watermark = meta.training.get("watermark_ts", 0.0)
    recent_users = {e.user_id for e in events if (e.ts or 0.0) > watermark}
    histories = {u: h for u, h in histories_from_events(events).items() if u in recent_users}
    current = _metric_on(encoder, histories)
    if recorded and current is not None and current < recorded * (1 - policy.max_metric_drop):
        return (
            "full",
            f"live NDCG@10 on recent events {current:.4f} < {recorded:.4f} - {policy.max_metric_drop:.0%}",
        )
    return "incremental", "no full-retrain trigger fired"


def run_update(
    events: Sequence[Event],
    registry: ModelRegistry,
    strategy: str = "hybrid",
    policy: UpdatePolicy | None = None,
    model_config: SequenceModelConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = False,
    now: float | None = None,
) -> dict:
    """Train per `strategy` and register the result (not live until promoted); returns a summary."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    policy = policy or UpdatePolicy()
    now = time.time() if now is None else now
    started = time.perf_counter()
    live = registry.live()
    reason = "asked for"
    if strategy == "hybrid":
        strategy, reason = decide(registry, events, policy, now)
    elif strategy == "incremental" and live is None:
        strategy, reason = "full", "no live model to start from"
    watermark = max((e.ts for e in events if e.ts is not None), default=0.0)
    histories = histories_from_events(events)
    train_config = train_config or TrainConfig()
    parent = None
    if strategy == "full":
        data, kinds = _data(histories)
        item_ids = item_vocabulary(data)
        split = leave_one_out(data, item_ids, kinds)
        config = model_config or SequenceModelConfig()
        model, summary = train_model(split, len(item_ids), config, train_config, progress=progress)
        trained_users = len(histories)
    else:
        parent = live
        encoder = SequenceEncoder.load(registry.path(live))
        since = registry.get(live).training.get("watermark_ts", 0.0)
        recent_users = {e.user_id for e in events if (e.ts or 0.0) > since}
        if not recent_users:
            raise ValueError(f"no events since the live model's watermark ({since}); nothing to update")
        histories = {u: h for u, h in histories.items() if u in recent_users}
        data, kinds = _data(histories)
        new_items = sorted({p for seq in data.sequences for p in seq} - set(encoder.item_ids))
        item_ids = [*encoder.item_ids, *new_items]
        split = leave_one_out(data, item_ids, kinds)
        if not split.user_ids:
            raise ValueError(
                f"none of the {len(histories)} shopper(s) active since the live model's watermark has 3 or "
                "more product events (the least a fine-tuning step and its validation need); wait for more "
                "events, or run a full update"
            )
        tuned = replace(train_config, lr=policy.incremental_lr, max_epochs=policy.incremental_epochs)
        model, summary = train_model(split, len(item_ids), encoder.config, tuned, progress=progress,
                                     init_model=expand_model(encoder, item_ids))  # fmt: skip
        trained_users = len(histories)
    training = {
        "watermark_ts": watermark,
        "events": len(events),
        "users": trained_users,
        "items": len(item_ids),
        "seconds": round(time.perf_counter() - started, 1),
        "reason": reason,
        "train_config": asdict(train_config),
    }
    with tempfile.TemporaryDirectory(prefix="shopguide-update-") as tmp:
        SequenceEncoder(model, item_ids).save(Path(tmp), extra={"training": training})
        version = registry.register(Path(tmp), strategy, parent, training, summary["valid"])
    return {"version": version.version, "strategy": strategy, "parent": parent, **training,
            "metrics": summary["valid"]}  # fmt: skip


def holdout_metrics(model_folder: Path, histories: dict[str, list[tuple[str, str]]]) -> dict:
    """HR@10 / NDCG@10 of a model on each history's last product given the rest (the promotion gate's
    held-out events). A target the model does not know counts as a miss: a stale model pays for it."""
    encoder = SequenceEncoder.load(model_folder)
    usable = {u: h for u, h in histories.items() if len(h) >= 2}
    if not usable:
        raise ValueError("no held-out shopper has two or more product events")
    inputs = [h[:-1] for h in usable.values()]
    targets = [h[-1][0] for h in usable.values()]
    scores = encoder.scores(inputs)  # (n, n_items)
    hits, gains = [], []
    for row, target in zip(scores, targets, strict=True):
        column = encoder.item_index.get(target)
        if column is None:
            hits.append(0.0)
            gains.append(0.0)
            continue
        rank = int((row > row[column - 1]).sum())  # items scored above the target
        hits.append(float(rank < 10))
        gains.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    return {"HR@10": float(np.mean(hits)), "NDCG@10": float(np.mean(gains)), "users": len(usable)}


def holdout_histories(events: Sequence[Event], days: float) -> dict[str, list[tuple[str, str]]]:
    """The promotion gate's held-out shoppers: those active in the last `days` of the events."""
    latest = max((e.ts for e in events if e.ts is not None), default=0.0)
    recent = {e.user_id for e in events if e.ts is not None and e.ts >= latest - days * 86400}
    return {u: h for u, h in histories_from_events(events).items() if u in recent}


def update_and_promote(
    events: Sequence[Event],
    registry: ModelRegistry,
    strategy: str = "hybrid",
    tolerance: float | None = None,
    holdout_days: float = 1.0,
    model_config: SequenceModelConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = False,
) -> dict:
    """`shopguide train update --strategy S --promote`: train, register, then promote through the gate
    (held-out: shoppers active in the last `holdout_days`). Skipped when no event is newer than the live
    model's watermark. Returns what ran, the version, whether it went live and why, and the seconds."""
    from training.registry import DEFAULT_TOLERANCE

    live = registry.live()
    watermark = registry.get(live).training.get("watermark_ts", 0.0) if live else 0.0
    if live and not any((e.ts or 0.0) > watermark for e in events):
        return {"ran": "skipped", "reason": "no events since the live model", "promoted": False,
                "train_seconds": 0.0}  # fmt: skip
    started = time.perf_counter()
    summary = run_update(events, registry, strategy, model_config=model_config, train_config=train_config,
                         progress=progress)  # fmt: skip
    holdout = holdout_histories(events, holdout_days)
    try:
        result = registry.promote(
            summary["version"],
            lambda folder: holdout_metrics(folder, holdout),
            tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        )
        promoted, gate = result.promoted, result.reason
    except ValueError as exc:  # no held-out shopper with two product events: the gate cannot judge
        promoted, gate = False, f"gate not run: {exc}"
    return {
        "ran": summary["strategy"],
        "reason": summary["reason"],
        "version": summary["version"],
        "promoted": promoted,
        "gate": gate,
        "fit_seconds": summary["seconds"],
        "train_seconds": round(time.perf_counter() - started, 2),
    }

"""Shopper events: the one schema shared by the simulator, training, the event store and `POST /events`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from encoders.sequence import EVENT_TYPES

MAX_ID_LENGTH = 200  # ids are keys in stores and URLs; longer ones are refused, not truncated
MAX_QUERY_LENGTH = 1000


class EventError(ValueError):
    """An event that breaks the schema; the message names the field and the event."""


@dataclass(frozen=True)
class Event:
    """One shopper event.

    event_id: unique per event (ingestion is idempotent by it). user_id: the shopper. product_id: the
    product acted on (None only for a search). type: view | click | cart | purchase | search.
    query: the search text (search events). request_id: the recommendation response the event came from,
    if any (attributes clicks to what was shown). ts: seconds since the Unix epoch (UTC).
    """

    event_id: str
    user_id: str
    product_id: str | None
    type: str
    query: str | None = None
    request_id: str | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        for name in ("event_id", "user_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EventError(f"event {self.event_id!r}: {name} must be a non-empty string, got {value!r}")
            if len(value) > MAX_ID_LENGTH:
                raise EventError(f"event {self.event_id!r}: {name} is longer than {MAX_ID_LENGTH} characters")
        for name in ("query", "request_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise EventError(f"event {self.event_id!r}: {name} must be a string, got {value!r}")
        if self.type not in EVENT_TYPES:
            raise EventError(
                f"event {self.event_id!r}: type {self.type!r} is not one of {', '.join(EVENT_TYPES)}"
            )
        if self.type == "search":
            if not self.query or not str(self.query).strip():
                raise EventError(f"event {self.event_id!r}: a search event needs a non-empty query")
        elif not isinstance(self.product_id, str) or not self.product_id:
            raise EventError(f"event {self.event_id!r}: a {self.type} event needs a product_id")
        if self.query is not None and len(self.query) > MAX_QUERY_LENGTH:
            raise EventError(f"event {self.event_id!r}: query is longer than {MAX_QUERY_LENGTH} characters")
        if self.ts is not None and (not isinstance(self.ts, int | float) or not math.isfinite(self.ts)):
            raise EventError(
                f"event {self.event_id!r}: ts must be a finite number of seconds, got {self.ts!r}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> Event:
        """Build from a JSON object; unknown fields are errors (a typo must not drop data silently)."""
        if not isinstance(data, dict):
            raise EventError(f"an event must be a JSON object, got {type(data).__name__}")
        known = {"event_id", "user_id", "product_id", "type", "query", "request_id", "ts"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EventError(
                f"event {data.get('event_id')!r}: unknown field(s) {unknown}; known: {sorted(known)}"
            )
        missing = [f for f in ("event_id", "user_id", "type") if f not in data]
        if missing:
            raise EventError(f"event {data.get('event_id')!r}: missing field(s) {missing}")
        values = {"product_id": None, **data}  # a search event may leave product_id out
        for name in ("event_id", "user_id", "product_id"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = str(values[name])  # numeric ids from JSON are accepted as strings
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def write_events(events: Iterable[Event], path: Path) -> int:
    """Write events as JSON lines (UTF-8); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)  # a killed run never leaves a half-written file under the real name
    return count


def read_events(path: Path) -> Iterator[Event]:
    """Events from a JSON-lines file; a bad line raises EventError naming the line."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield Event.from_dict(json.loads(line))
            except (json.JSONDecodeError, EventError, TypeError) as exc:
                raise EventError(f"{path}:{number}: {exc}") from exc

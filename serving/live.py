"""What the recommender serves right now (user-encoder models, A/B arms), and the guard that swaps it."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from encoders.sequence import SequenceEncoder
from index import VectorSpace

FOLDER_PREFIX = "folder:"  # the version of a model served from a folder outside the registry


class SwapGuard:
    """Many requests share the serving state; a swap takes it alone, between requests.

    Requests hold it shared for their whole duration (reentrant per thread: a product page calls the
    feed), so a request never sees half of a swap: an old collection with new alignment heads, or a
    model whose behavior space was just dropped. A waiting swap stops new requests from entering, so a
    steady stream of requests cannot starve it; it holds the guard only to assign a few attributes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass(frozen=True)
class ModelSlot:
    """One GRU user encoder being served and the index space that holds its item vectors."""

    version: str  # registry version, or "folder:NAME" for a model folder outside the registry
    encoder: SequenceEncoder
    space: VectorSpace  # behavior space named after the model's item vectors (training.behavior)
    covered: frozenset[str]  # products with a vector in `space`: the model's own, or mapped from content
    mapped: int  # how many of them came from the content mapping (products the model never saw)


def ab_arm(user_id: str, split: float, salt: str) -> str:
    """ "A" or "B" for a shopper, stable across requests and servers: a hash of salt + user id, so a
    new salt reshuffles everyone for the next experiment. `split` is the share of shoppers in arm A."""
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()
    return "A" if int.from_bytes(digest[:8], "big") / 2**64 < split else "B"


def wanted_models(
    registry_root: Path | None, folder: Path | None, ab_versions: tuple[str, ...]
) -> tuple[str | None, dict[str, Path]]:
    """(live version, {version: model folder}) the recommender should serve now: the registry's live
    version when it has one, else the model folder; plus the A/B arms' versions from the registry."""
    from training.registry import ModelRegistry, RegistryError

    wanted: dict[str, Path] = {}
    registry = ModelRegistry(registry_root) if registry_root and (registry_root / "LIVE").is_file() else None
    live = registry.live() if registry is not None else None
    if live is not None:
        wanted[live] = registry.path(live)
    elif folder is not None:
        live = f"{FOLDER_PREFIX}{folder.name}"
        wanted[live] = folder
    for version in ab_versions:
        if version in wanted:
            continue
        if registry_root is None or not (registry_root / "versions" / version).is_dir():
            raise RegistryError(
                f"A/B arm {version!r} is not a version in the model registry at {registry_root}; "
                "see `shopguide models list`"
            )
        wanted[version] = ModelRegistry(registry_root).path(version)
    return live, wanted

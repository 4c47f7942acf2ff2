"""Query encoders that follow the live collection's recipe: a re-embed may change the towers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from training.ingest import MANIFEST


class QueryTower:
    """The text or image encoder that embeds queries, rebuilt when the live manifest names another.

    `shopguide reembed --encoder NAME` swaps in a collection whose vectors come from another tower, then
    rewrites DATA_DIR/ingest.json; the recommender refuses features of the wrong size with a 503 until
    this tower has caught up (checked at most every `check_every_s`, by the file's mtime).

    `device` (cpu, cuda, cuda:N, auto) is where this process runs every tower it builds; it stays out of
    `spec`, which is compared with the manifest's recipe."""

    def __init__(
        self,
        modality: str,
        name: str,
        args: dict,
        data_dir: Path | None = None,
        check_every_s: float = 2.0,
        device: str = "cpu",
    ) -> None:
        if modality not in ("text", "image"):
            raise ValueError(f"modality is 'text' or 'image', got {modality!r}")
        self.modality = modality
        self.device = device
        self.data_dir = data_dir
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._mtime = self._manifest_mtime()
        self.spec = (name, dict(args))
        self.encoder = self._build(name, args)

    def _build(self, name: str, args: dict) -> Any:
        from encoders import get_image_encoder, get_text_encoder
        from encoders.base import device_kwargs

        factory = get_text_encoder if self.modality == "text" else get_image_encoder
        return factory(name, **args, **device_kwargs(self.device))

    def on_device(self, device: str) -> QueryTower:
        """This tower, or a new one for its current recipe on `device` when that is another. The new one
        is built before the caller swaps it in (requests meanwhile use this one); a device that cannot
        load raises and leaves this one serving."""
        if device == self.device:
            return self
        name, args = self.spec
        return QueryTower(self.modality, name, args, self.data_dir, self.check_every_s, device)

    def _manifest_mtime(self) -> float | None:
        try:
            return (self.data_dir / MANIFEST).stat().st_mtime if self.data_dir else None
        except OSError:
            return None

    def current(self) -> Any:
        """The encoder for the live recipe (rebuilt here, once, after a re-embed changed it)."""
        if self.data_dir is None or time.monotonic() - self._checked < self.check_every_s:
            return self.encoder
        with self._lock:
            self._checked = time.monotonic()
            mtime = self._manifest_mtime()
            if mtime is None or mtime == self._mtime:
                return self.encoder
            self._mtime = mtime
            encoders = json.loads((self.data_dir / MANIFEST).read_text())["encoders"]
            spec = (
                encoders[f"{self.modality}_encoder"],
                dict(encoders.get(f"{self.modality}_encoder_args") or {}),
            )
            if spec != self.spec:
                self.encoder, self.spec = self._build(*spec), spec
            return self.encoder

    def encode_texts(self, texts: list[str]):
        return self.current().encode_texts(texts)

    def encode_images(self, images: list[Any]):
        return self.current().encode_images(images)

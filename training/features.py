"""Raw encoder features for catalog products, with an on-disk cache keyed by (encoder, content hash)."""

from __future__ import annotations

import hashlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from encoders.base import ImageEncoder, TextEncoder


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes: the cache key of an image (a changed photo is re-embedded)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """SQLite table (encoder id, content hash) -> float32 vector. Committed per batch, so a killed
    run keeps everything it finished and a re-run embeds only what is new or changed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (encoder TEXT, content_hash TEXT, vector BLOB,"
            " PRIMARY KEY (encoder, content_hash))"
        )

    def get_many(self, encoder: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        wanted = list(dict.fromkeys(hashes))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT content_hash, vector FROM vectors WHERE encoder = ? AND content_hash IN ({marks})",
                [encoder, *chunk],
            )
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, encoder: str, items: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                [(encoder, key, np.asarray(vec, dtype=np.float32).tobytes()) for key, vec in items.items()],
            )

    def close(self) -> None:
        self.db.close()


@dataclass
class ImageFeatures:
    """Raw image features for the products that decoded; failures are reported by product id."""

    ids: list[str]
    vectors: np.ndarray  # (n, dim) float32 unit rows
    hashes: dict[str, str]  # product id -> image content hash
    failed: dict[str, str] = field(default_factory=dict)  # product id -> reason
    embedded: int = 0  # how many were computed (not from the cache)
    seconds: float = 0.0  # wall time spent computing them


def _prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Run a producer iterator in a thread, `depth` items ahead: JPEG decoding overlaps the CNN."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                buffer.put(item)
        except BaseException as exc:  # surfaced in the consumer, never swallowed
            buffer.put(exc)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def decode_batches(
    encoder: ImageEncoder, items: Sequence[tuple[str, Path]], batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor | None, dict[str, str]]]:
    """(ids, (n, 3, H, W) pixels, failures) per batch; a corrupt image is a failure, not an exception."""
    for start in range(0, len(items), batch_size):
        ids, tensors, failed = [], [], {}
        for pid, path in items[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    # Shops upload multi-megapixel photos: let libjpeg decode at 1/2..1/8 scale when
                    # that still leaves at least the model's input size (5-20x faster on large files).
                    image.draft("RGB", (encoder.input_size, encoder.input_size))
                    image.load()
                    tensors.append(encoder.preprocess(image))
                ids.append(pid)
            except Exception as exc:  # PIL raises many types for bad files; each is reported per product
                failed[pid] = f"unreadable image {path.name}: {type(exc).__name__}: {exc}"
        yield ids, (torch.stack(tensors) if tensors else None), failed


def image_features(
    encoder: ImageEncoder,
    items: Sequence[tuple[str, Path]],
    cache: EmbeddingCache | None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> ImageFeatures:
    """Features for (product id, image path) pairs: cached ones are read, the rest embedded in batches."""
    hashes, failed = {}, {}
    for pid, path in items:
        try:
            hashes[pid] = file_hash(path)
        except OSError as exc:
            failed[pid] = f"unreadable image {path.name}: {exc}"
    cached = cache.get_many(encoder.info.id, list(hashes.values())) if cache else {}
    todo = [(pid, path) for pid, path in items if pid in hashes and hashes[pid] not in cached]
    vectors: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    with tqdm(
        total=len(todo), desc=f"embed images ({encoder.info.name})", unit="img", disable=not progress
    ) as bar:
        for ids, pixels, bad in _prefetch(decode_batches(encoder, todo, encoder.batch_size)):
            failed.update(bad)
            if pixels is not None:
                rows = encoder.encode_tensors(pixels)
                fresh = {hashes[pid]: row for pid, row in zip(ids, rows, strict=True)}
                cached.update(fresh)
                if cache:
                    cache.put_many(encoder.info.id, fresh)
            bar.update(len(ids) + len(bad))
            if on_batch:
                on_batch(len(ids))
    seconds = time.perf_counter() - start
    ok = [pid for pid, _ in items if pid in hashes and pid not in failed]
    for pid in ok:
        vectors[pid] = cached[hashes[pid]]
    matrix = np.stack([vectors[p] for p in ok]) if ok else np.zeros((0, encoder.info.dim), np.float32)
    return ImageFeatures(
        ok,
        matrix,
        hashes,
        failed,
        embedded=len(todo) - len(set(failed) & {p for p, _ in todo}),
        seconds=seconds,
    )


def text_features(
    encoder: TextEncoder, texts: Sequence[str], cache: EmbeddingCache | None, progress: bool = True
) -> np.ndarray:
    """(n, dim) features for strings, reading the cache and embedding only the new ones."""
    keys = [text_hash(t) for t in texts]
    cached = cache.get_many(encoder.info.id, keys) if cache else {}
    todo = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in cached))
    step = 512
    with tqdm(
        total=len(todo), desc=f"embed texts ({encoder.info.name})", unit="txt", disable=not progress
    ) as bar:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            fresh = dict(zip((text_hash(t) for t in chunk), encoder.encode_texts(chunk), strict=True))
            cached.update(fresh)
            if cache:
                cache.put_many(encoder.info.id, fresh)
            bar.update(len(chunk))
    if not texts:
        return np.zeros((0, encoder.info.dim), np.float32)
    return np.stack([cached[k] for k in keys]).astype(np.float32, copy=False)

"""Encoder contracts: image and text encoders return float32 (n, dim) arrays with unit-norm rows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's vector space: a change in any field means a new index collection."""

    name: str  # registry name, e.g. "efficientnet_lite0"
    version: str  # bump when weights or preprocessing change, e.g. "1"
    dim: int  # output vector length

    @property
    def id(self) -> str:
        """`name/version`, the string stored beside every vector space in the index."""
        return f"{self.name}/{self.version}"


def l2_normalize(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows scaled to unit L2 norm as a float32 numpy array (a zero row stays zero, never NaN)."""
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().float().cpu().numpy()
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


DEVICES = "cpu, cuda, cuda:N or auto"  # what `device=` accepts, for error messages


def resolve_device(device: str = "cpu") -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (cuda when torch sees a GPU, else cpu) -> where weights go.

    A CUDA device that is not there fails here, by name, rather than deep inside torch at the first
    batch (or, on a Ray actor that got no GPU, as a puzzling error in a worker's log)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use {DEVICES}")
    if resolved.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested, but no CUDA device is visible to this process (check the "
            "driver and CUDA_VISIBLE_DEVICES, or on Ray reserve a GPU for it); use device 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= count:
        raise ValueError(f"device {device!r} requested, but only {count} CUDA device(s) are visible")
    # One spelling per GPU ("cuda" and "cuda:0" alike) so a shared model is loaded once per device.
    return torch.device("cuda", index)


def device_kwargs(device: str) -> dict:
    """Keyword arguments that put an encoder factory's model on `device`: none for the default cpu, so
    factories registered before `device` existed keep working there."""
    return {} if device == "cpu" else {"device": device}


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Letterbox onto a square canvas: product photos are mostly portrait on white, and a centre
    crop would cut off shoes and bag straps that carry the article type."""
    image = image.convert("RGB")
    side = max(image.size)
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class ImageEncoder(ABC):
    """Images -> (n, dim) float32 unit rows. Owns its preprocessing so weights travel with transforms."""

    info: EncoderInfo
    # Where the weights live (resolve_device); inputs are moved there, rows come back on the CPU.
    # Not part of `info`: the same weights give the same vector space on any device.
    device: torch.device = torch.device("cpu")
    batch_size: int = 32
    input_size: int = 224  # square side the model reads; lets JPEG decoding skip unneeded resolution

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> a (3, H, W) float tensor ready for `encode_tensors`."""

    @abstractmethod
    def encode_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) preprocessed batch -> (n, dim) unit rows. Runs under torch.inference_mode."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (n, dim) unit rows, in batches of `batch_size`."""
        if not images:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.encode_tensors(torch.stack([self.preprocess(im) for im in chunk])))
        return np.concatenate(out)


class TextEncoder(ABC):
    """Strings -> (n, dim) float32 unit rows."""

    info: EncoderInfo
    device: torch.device = torch.device("cpu")  # as ImageEncoder.device
    batch_size: int = 64

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (n, dim) unit rows; the same string gives the same row alone or in a batch."""

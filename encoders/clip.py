"""CLIP image and text towers through open_clip, weights from a local checkpoint file."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.base import (
    EncoderInfo,
    ImageEncoder,
    TextEncoder,
    l2_normalize,
    pad_to_square,
    resolve_device,
)
from encoders.registry import register_image_encoder, register_text_encoder

# Our own open_clip model configs (a tiny ViT for tests); registered with open_clip on first use.
CONFIG_DIR = Path(__file__).parent / "clip_configs"


def _file_tag(path: Path) -> str:
    """Short content hash of a checkpoint: the encoder version changes when the weights do."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class OpenClipModel:
    """One open_clip model shared by its image and text towers."""

    def __init__(self, model_name: str, checkpoint: str | Path | None = None, device: str = "cpu") -> None:
        import open_clip

        self.device = resolve_device(device)

        if CONFIG_DIR not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
            open_clip.add_model_config(CONFIG_DIR)
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; known: {', '.join(sorted(open_clip.list_models()))}"
            )
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise FileNotFoundError(
                    f"CLIP checkpoint for {model_name} not found at {checkpoint}; no weights can be "
                    "downloaded here, pass a local open_clip checkpoint file"
                )
        # pretrained_text=False: never let open_clip fetch base tower weights from a hub. Built on the
        # CPU, then moved: a seeded random init is then the same weights whatever the device.
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=str(checkpoint) if checkpoint else None,
            pretrained_text=False,
            device="cpu",
        )
        self.model = model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size = int(
            model.visual.image_size[0]
            if isinstance(model.visual.image_size, tuple)
            else model.visual.image_size
        )
        normalize = [t for t in getattr(preprocess, "transforms", []) if type(t).__name__ == "Normalize"]
        self.mean = tuple(normalize[0].mean) if normalize else (0.48145466, 0.4578275, 0.40821073)
        self.std = tuple(normalize[0].std) if normalize else (0.26862954, 0.26130258, 0.27577711)
        self.dim = int(
            model.text_projection.shape[1]
            if hasattr(model, "text_projection") and model.text_projection is not None
            else model.visual.output_dim
        )
        tag = _file_tag(checkpoint) if checkpoint else "random"
        self.name = f"clip_{model_name}"
        self.version = f"1+{tag}"


class ClipImageEncoder(ImageEncoder):
    """CLIP image tower, letterboxed to the model's input size."""

    def __init__(self, clip: OpenClipModel, batch_size: int = 32) -> None:
        from torchvision.transforms import functional as tvf

        self._tvf = tvf
        self.clip = clip
        self.info = EncoderInfo(clip.name, clip.version, clip.dim)
        self.device = clip.device
        self.batch_size = batch_size
        self.input_size = clip.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        size = self.clip.image_size
        image = pad_to_square(image).resize((size, size), Image.BICUBIC)
        return self._tvf.normalize(self._tvf.to_tensor(image), self.clip.mean, self.clip.std)

    def encode_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return l2_normalize(self.clip.model.encode_image(pixels.to(self.device)))


class ClipTextEncoder(TextEncoder):
    """CLIP text tower with open_clip's tokenizer."""

    def __init__(self, clip: OpenClipModel, batch_size: int = 64) -> None:
        self.clip = clip
        self.info = EncoderInfo(clip.name, clip.version, clip.dim)
        self.device = clip.device
        self.batch_size = batch_size

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.clip.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
                out.append(l2_normalize(self.clip.model.encode_text(tokens)))
        return np.concatenate(out)


_LOADED: dict[tuple[str, str | None, str], OpenClipModel] = {}


def _shared(model_name: str, checkpoint: str | None, device: str) -> OpenClipModel:
    # The image and text towers of one model share its weights: load them once per process and device.
    where = resolve_device(device)
    key = (model_name, str(checkpoint) if checkpoint else None, str(where))
    if key not in _LOADED:
        _LOADED[key] = OpenClipModel(model_name, checkpoint, str(where))
    return _LOADED[key]


@register_image_encoder("clip")
def clip_image(
    model_name: str = "ViT-B-32", checkpoint: str | None = None, batch_size: int = 32, device: str = "cpu"
) -> ClipImageEncoder:
    """open_clip image tower: any open_clip model name, weights from `checkpoint` (None = random init)."""
    return ClipImageEncoder(_shared(model_name, checkpoint, device), batch_size)


@register_text_encoder("clip")
def clip_text(
    model_name: str = "ViT-B-32", checkpoint: str | None = None, batch_size: int = 64, device: str = "cpu"
) -> ClipTextEncoder:
    """open_clip text tower: any open_clip model name, weights from `checkpoint` (None = random init)."""
    return ClipTextEncoder(_shared(model_name, checkpoint, device), batch_size)

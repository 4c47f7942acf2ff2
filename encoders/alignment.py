"""Projection heads that map frozen image and text features into one shared, aligned space."""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.base import l2_normalize, resolve_device


@dataclass(frozen=True)
class AlignmentConfig:
    """Shape and regularization of the two projection heads (CPU-sized defaults: trains in seconds)."""

    image_encoder: str  # id of the frozen image tower, e.g. "efficientnet_lite0/1"
    text_encoder: str  # id of the frozen text tower, e.g. "minilm_l6_v2/1"
    image_dim: int  # input feature size of the image tower (1280 for EfficientNet-Lite0)
    text_dim: int  # input feature size of the text tower (384 for MiniLM)
    embed_dim: int = 256  # size of the shared space (the index's `image`, `text`, `fused` vectors)
    hidden_dim: int = 1024  # MLP width; 0 = a single linear projection
    dropout: float = 0.2  # on the hidden layer: 9k pairs overfit a 1.6M-parameter head quickly
    init_temperature: float = 0.07  # CLIP's initial softmax temperature (learned afterwards)


class ProjectionHead(nn.Module):
    """Linear skip + (optional) one-hidden-layer MLP; the skip keeps the frozen feature geometry
    reachable while the MLP learns the cross-modal correction."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.skip = nn.Linear(in_dim, out_dim)
        self.mlp = (
            nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
            )
            if hidden_dim
            else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (n, in_dim) -> (n, out_dim)
        out = self.skip(features)
        return out + self.mlp(features) if self.mlp is not None else out


class AlignmentHeads(nn.Module):
    """Image head + text head + learned temperature (CLIP-style)."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.config = config
        self.image_head = ProjectionHead(
            config.image_dim, config.embed_dim, config.hidden_dim, config.dropout
        )
        self.text_head = ProjectionHead(config.text_dim, config.embed_dim, config.hidden_dim, config.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / config.init_temperature))))

    def project_images(self, features: np.ndarray) -> np.ndarray:
        """(n, image_dim) frozen image features -> (n, embed_dim) unit rows in the shared space."""
        return self._project(self.image_head, features)

    def project_texts(self, features: np.ndarray) -> np.ndarray:
        """(n, text_dim) frozen text features -> (n, embed_dim) unit rows in the shared space."""
        return self._project(self.text_head, features)

    def _project(self, head: nn.Module, features: np.ndarray) -> np.ndarray:
        was_training = self.training
        self.eval()
        device = self.logit_scale.device  # where load(device=) or .to() put the heads
        with torch.inference_mode():
            rows = head(torch.as_tensor(np.asarray(features, dtype=np.float32), device=device))
        self.train(was_training)
        return l2_normalize(rows)

    @property
    def version(self) -> str:
        """Content hash of the weights: part of the index's encoder id, so new heads = new collection."""
        state = self.state_dict()
        # torch.save records each tensor's device: hash CPU copies so the version is the same on a GPU.
        # The copy keeps state_dict's metadata, so CPU heads hash to the bytes they always did.
        cpu_state = type(state)((key, tensor.cpu()) for key, tensor in state.items())
        if hasattr(state, "_metadata"):
            cpu_state._metadata = state._metadata
        buffer = io.BytesIO()
        torch.save(cpu_state, buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()[:10]

    def save(self, path: Path, metrics: dict | None = None) -> None:
        """Checkpoint = state_dict + the config that built it (+ training metrics), no pickled objects."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {"config": asdict(self.config), "state_dict": self.state_dict(), "metrics": metrics or {}}, tmp
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> AlignmentHeads:
        """Heads from `save`, on `device` (cpu, cuda, cuda:N or auto); projections return CPU rows."""
        where = resolve_device(device)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        heads = cls(AlignmentConfig(**blob["config"]))
        heads.load_state_dict(blob["state_dict"])
        return heads.eval().to(where)

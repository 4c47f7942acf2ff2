"""From a catalog to aligned product vectors: frozen features, alignment heads, fusion."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from encoders import get_image_encoder, get_text_encoder, l2_normalize
from encoders.alignment import AlignmentConfig, AlignmentHeads
from encoders.base import ImageEncoder, TextEncoder, device_kwargs
from training.align import AlignTrainConfig, is_heldout, train_alignment
from training.catalog import Catalog, Product, Skipped
from training.evaluate import attribute_phrase
from training.features import EmbeddingCache, image_features, text_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    """Which frozen towers embed the catalog, and how the fused vector mixes the aligned ones."""

    image_encoder: str = "efficientnet_lite0"  # registry name (see `shopguide encoders`)
    image_encoder_args: dict = field(default_factory=dict)  # e.g. {"weights_path": ...} or CLIP's
    text_encoder: str = "minilm_l6_v2"
    text_encoder_args: dict = field(default_factory=dict)
    fused_image_weight: float = 0.4  # fused = normalize(w * image + (1 - w) * text), both unit rows
    embed_dim: int = 256  # shared space size
    # Where this process runs both towers: cpu, cuda, cuda:N or auto (cuda when visible). In no encoder
    # id: the same weights make the same vector space on any device.
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fused_image_weight <= 1.0:
            raise ValueError(f"fused_image_weight must be in [0, 1], got {self.fused_image_weight}")
        for key in ("image_encoder_args", "text_encoder_args"):
            if "device" in getattr(self, key):
                # The args are the towers' recipe (servers rebuild query towers from them); where a
                # process runs them is its own business.
                raise ValueError(f"set `device` at the top of the encoder config, not in {key}")


@dataclass
class ProductVectors:
    """Aligned vectors for the usable products of a catalog (rows follow `products`)."""

    products: list[Product]
    image: np.ndarray  # (n, embed_dim) aligned image vectors
    text: np.ndarray  # (n, embed_dim) aligned text vectors of each product's document
    fused: np.ndarray  # (n, embed_dim)
    raw_image: np.ndarray  # (n, image_dim) frozen CNN/CLIP features (baselines, diagnostics)
    raw_title: np.ndarray  # (n, text_dim) frozen text features of the title
    image_hashes: dict[str, str]
    skipped: list[Skipped]
    heads: AlignmentHeads
    heads_metrics: dict
    images_embedded: int  # computed in this run (the rest came from the cache)
    image_seconds: float


def fuse(image: np.ndarray, text: np.ndarray, image_weight: float) -> np.ndarray:
    """The fused product vector: a weighted sum of the two aligned unit vectors, renormalized."""
    return l2_normalize(image_weight * image + (1.0 - image_weight) * text)


class Towers:
    """The frozen encoders, built once per process."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        device = device_kwargs(config.device)
        self.image: ImageEncoder = get_image_encoder(
            config.image_encoder, **config.image_encoder_args, **device
        )
        self.text: TextEncoder = get_text_encoder(config.text_encoder, **config.text_encoder_args, **device)


def heads_path(data_dir: Path) -> Path:
    """The heads the next ingest reuses (the latest trained)."""
    return data_dir / "models" / "alignment.pt"


def versioned_heads_path(data_dir: Path, version: str) -> Path:
    """An immutable copy per heads version: queries load the version the live collection was built with,
    so retraining (or a killed ingest after retraining) never pairs new heads with old vectors."""
    return data_dir / "models" / f"alignment-{version}.pt"


def load_or_train_heads(
    path: Path,
    towers: Towers,
    products: list[Product],
    raw_image: np.ndarray,
    text_views: list[np.ndarray],
    retrain: bool = False,
    progress: bool = True,
) -> tuple[AlignmentHeads, dict]:
    """Reuse the heads at `path` when they were built for the same towers, else train and save them.

    Held-out products (training.align.is_heldout) never train the heads."""
    model_config = AlignmentConfig(
        image_encoder=towers.image.info.id,
        text_encoder=towers.text.info.id,
        image_dim=towers.image.info.dim,
        text_dim=towers.text.info.dim,
        embed_dim=towers.config.embed_dim,
    )
    if path.is_file() and not retrain:
        heads = AlignmentHeads.load(path)
        if heads.config == model_config:
            meta = (
                json.loads(path.with_suffix(".json").read_text())
                if path.with_suffix(".json").is_file()
                else {}
            )
            versioned = path.with_name(f"alignment-{heads.version}.pt")
            if not versioned.is_file():  # heads saved before queries loaded them by version
                heads.save(versioned, meta.get("metrics"))
            return heads, meta
        log.info("alignment heads in %s were built for %s; retraining", path, heads.config)
    train = np.array([not is_heldout(p.id) for p in products])
    result = train_alignment(
        raw_image[train], [v[train] for v in text_views], model_config, AlignTrainConfig(), progress=progress
    )
    result.heads.save(path, result.metrics)
    result.heads.save(path.with_name(f"alignment-{result.heads.version}.pt"), result.metrics)
    path.with_suffix(".json").write_text(
        json.dumps(
            {"config": asdict(model_config), "metrics": result.metrics, "version": result.heads.version},
            indent=2,
        )
    )
    return result.heads, {"metrics": result.metrics, "version": result.heads.version}


def build_product_vectors(
    catalog: Catalog,
    data_dir: Path,
    towers: Towers,
    retrain_heads: bool = False,
    progress: bool = True,
    heads_file: Path | None = None,
) -> ProductVectors:
    """Embed (or read from the cache) every product, fit or load the heads, and project + fuse.

    The heads live at `heads_file` (default: the data dir's serving heads, see heads_path)."""
    cache = EmbeddingCache(data_dir / "cache" / "embeddings.sqlite")
    try:
        feats = image_features(
            towers.image, [(p.id, p.image_path) for p in catalog.products], cache, progress
        )
        ok = set(feats.ids)
        products = [p for p in catalog.products if p.id in ok]
        skipped = list(catalog.skipped) + [Skipped(pid, reason) for pid, reason in feats.failed.items()]
        titles = text_features(towers.text, [p.title for p in products], cache, progress)
        documents = text_features(towers.text, [p.document() for p in products], cache, progress)
        phrases = text_features(
            towers.text,
            [attribute_phrase(p.baseColour, p.gender, p.articleType) or p.title for p in products],
            cache,
            progress,
        )
    finally:
        cache.close()
    if not products:
        raise ValueError(f"no usable products in {catalog.root} ({len(skipped)} skipped)")
    heads, meta = load_or_train_heads(
        heads_file or heads_path(data_dir),
        towers,
        products,
        feats.vectors,
        [titles, documents, phrases],
        retrain_heads,
        progress,
    )
    image = heads.project_images(feats.vectors)
    text = heads.project_texts(documents)
    return ProductVectors(
        products=products,
        image=image,
        text=text,
        fused=fuse(image, text, towers.config.fused_image_weight),
        raw_image=feats.vectors,
        raw_title=titles,
        image_hashes=feats.hashes,
        skipped=skipped,
        heads=heads,
        heads_metrics=meta.get("metrics", {}),
        images_embedded=feats.embedded,
        image_seconds=feats.seconds,
    )

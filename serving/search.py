"""Similar items and text / image search as plain functions over the index (no Ray, no HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from encoders import get_image_encoder, get_text_encoder
from encoders.alignment import AlignmentHeads
from index import Filters, Hit, IndexStore, SchemaMismatchError, UnknownProductError
from training.ingest import ALIAS, MANIFEST
from training.vectors import EncoderConfig, versioned_heads_path

MODES = ("fused", "image", "text")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def check_k(k: int) -> int:
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    return k


def load_heads_for(data_dir: Path, space_encoder: str) -> AlignmentHeads:
    """The alignment heads a collection's vectors were built with (its encoder id ends in /<version>)."""
    version = space_encoder.rsplit("/", 1)[-1]
    path = versioned_heads_path(data_dir, version)
    if not path.is_file():
        raise FileNotFoundError(
            f"the live collection was built with alignment heads {version!r}, but {path} is missing; "
            f"re-run `shopguide ingest --data-dir {data_dir}`"
        )
    heads = AlignmentHeads.load(path)
    if heads.version != version:
        raise SchemaMismatchError(f"{path} holds heads {heads.version!r}, the collection needs {version!r}")
    return heads


class ProductSearch:
    """Owns the live collection (through the alias) and the encoders needed to turn queries into vectors."""

    def __init__(self, data_dir: Path, store: IndexStore) -> None:
        manifest_path = data_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no index in {data_dir}: run `shopguide ingest --data-dir {data_dir}` first"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.encoders = EncoderConfig(**self.manifest["encoders"])
        self.index = store.open(ALIAS)
        self.heads = load_heads_for(data_dir, self.index.spaces["image"].encoder)
        self._text = None
        self._image = None

    def close(self) -> None:
        self.index.close()

    @property
    def text_encoder(self):  # built on first use: a CLI `similar` call never needs it
        if self._text is None:
            self._text = get_text_encoder(self.encoders.text_encoder, **self.encoders.text_encoder_args)
        return self._text

    @property
    def image_encoder(self):
        if self._image is None:
            self._image = get_image_encoder(self.encoders.image_encoder, **self.encoders.image_encoder_args)
        return self._image

    def similar(
        self,
        product_id: str,
        k: int = 10,
        mode: str = "fused",
        filters: Filters | None = None,
        exclude: tuple[str, ...] = (),
    ) -> list[Hit]:
        """The k products nearest to `product_id` in one space (the product itself excluded)."""
        check_mode(mode)
        check_k(k)
        found = self.index.get([product_id], with_vectors=True)
        if not found:
            raise UnknownProductError(f"product {product_id!r} is not in the index")
        vector = found[0].vectors[mode]
        return self.index.search(mode, vector, k, filters, exclude_ids=(product_id, *exclude))

    def text_query_vector(self, query: str) -> np.ndarray:
        """(dim,) unit vector of a shopper's text query in the shared space."""
        if not query or not query.strip():
            raise ValueError("empty search query")
        return self.heads.project_texts(self.text_encoder.encode_texts([query.strip()]))[0]

    def search_text(
        self, query: str, k: int = 10, mode: str = "fused", filters: Filters | None = None
    ) -> list[Hit]:
        """Text search: against fused vectors, product texts, or photos (mode=image, cross-modal)."""
        check_mode(mode)
        check_k(k)
        return self.index.search(mode, self.text_query_vector(query), k, filters)

    def image_query_vector(self, image: Image.Image) -> np.ndarray:
        """(dim,) unit vector of an uploaded photo in the shared space."""
        raw = self.image_encoder.encode_images([image])
        return self.heads.project_images(raw)[0]

    def search_image(
        self, image: Image.Image, k: int = 10, mode: str = "fused", filters: Filters | None = None
    ) -> list[Hit]:
        """Image search: a photo against product photos, fused vectors, or product texts (mode=text)."""
        check_mode(mode)
        check_k(k)
        # The photo's aligned vector is searched as is in every mode: all three spaces are one space.
        return self.index.search(mode, self.image_query_vector(image), k, filters)

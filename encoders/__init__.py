"""Image, text and alignment encoders that turn products and queries into unit vectors."""

from encoders.base import EncoderInfo, ImageEncoder, TextEncoder, l2_normalize
from encoders.registry import (
    get_image_encoder,
    get_text_encoder,
    list_image_encoders,
    list_text_encoders,
)

__all__ = [
    "EncoderInfo",
    "ImageEncoder",
    "TextEncoder",
    "get_image_encoder",
    "get_text_encoder",
    "l2_normalize",
    "list_image_encoders",
    "list_text_encoders",
]

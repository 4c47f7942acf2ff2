"""Uploaded photos: checked by content and size before and while decoding, never trusted by extension."""

from __future__ import annotations

import io
import warnings

from PIL import Image

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MB; checked on the raw bytes before any decoding
MAX_PIXELS = 40_000_000  # a 40-megapixel photo is plausible; more is a decompression bomb
QUERY_SIDE = 512  # uploads are shrunk to this longest side: encoders look at 224-320 px anyway
_RESEND = "save the photo again (or take another) and re-send it"

# Magic bytes of the formats an image search accepts (what the file is, whatever it is called).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


class UploadError(ValueError):
    """A rejected upload; `status` is the HTTP status that describes why (413, 415 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with (JPEG, PNG, GIF, BMP, WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_upload(
    data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Validate and decode an uploaded photo into an RGB image no larger than QUERY_SIDE.

    Raises UploadError: 413 too large (bytes or pixels), 415 not an image by content, 422 a corrupt or
    truncated image."""
    if len(data) > max_bytes:
        raise UploadError(413, f"the upload is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    if not data:
        raise UploadError(422, "the upload is empty; send a JPEG, PNG, GIF, BMP or WEBP photo")
    kind = sniff_format(data)
    if kind is None:
        raise UploadError(
            415,
            "the upload is not an image (checked by content, not name); send a JPEG, PNG, GIF, BMP or WEBP",
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; make every oversize image an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as image:
                width, height = image.size  # read from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise UploadError(
                        413,
                        f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                        f"{max_pixels:,} (a decompression bomb or an oversized photo)",
                    )
                image.draft("RGB", (QUERY_SIDE, QUERY_SIDE))  # JPEG: decode at a reduced scale
                image.load()
                rgb = image.convert("RGB")
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(
            413, f"the image is too large to decode safely ({exc}); send a photo under {max_pixels:,} pixels"
        ) from None
    except Image.UnidentifiedImageError:
        # Pillow's message names an in-memory buffer object: nothing the sender can act on.
        raise UploadError(
            422, f"the {kind} image is corrupt or truncated: its header does not decode; {_RESEND}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(422, f"the {kind} image is corrupt or truncated ({exc}); {_RESEND}") from None
    rgb.thumbnail((QUERY_SIDE, QUERY_SIDE))
    return rgb

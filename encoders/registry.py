"""Build encoders by name through a small registry that fails loudly on unknown names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from encoders.base import ImageEncoder, TextEncoder

_IMAGE: dict[str, Callable[..., ImageEncoder]] = {}
_TEXT: dict[str, Callable[..., TextEncoder]] = {}


def register_image_encoder(name: str) -> Callable:
    """Decorator: register a factory `(**kwargs) -> ImageEncoder` under `name`."""

    def wrap(factory: Callable[..., ImageEncoder]) -> Callable[..., ImageEncoder]:
        _IMAGE[name] = factory
        return factory

    return wrap


def register_text_encoder(name: str) -> Callable:
    """Decorator: register a factory `(**kwargs) -> TextEncoder` under `name`."""

    def wrap(factory: Callable[..., TextEncoder]) -> Callable[..., TextEncoder]:
        _TEXT[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    # Imported for their @register side effects; kept lazy so `import encoders` stays cheap.
    import encoders.clip  # noqa: F401
    import encoders.cnn  # noqa: F401
    import encoders.text  # noqa: F401


def list_image_encoders() -> list[str]:
    _load_builtins()
    return sorted(_IMAGE)


def list_text_encoders() -> list[str]:
    _load_builtins()
    return sorted(_TEXT)


def get_image_encoder(name: str, **kwargs: Any) -> ImageEncoder:
    """Build a registered image encoder; an unknown name lists the known ones."""
    _load_builtins()
    if name not in _IMAGE:
        raise ValueError(f"unknown image encoder {name!r}; known: {', '.join(sorted(_IMAGE))}")
    return _IMAGE[name](**kwargs)


def get_text_encoder(name: str, **kwargs: Any) -> TextEncoder:
    """Build a registered text encoder; an unknown name lists the known ones."""
    _load_builtins()
    if name not in _TEXT:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(sorted(_TEXT))}")
    return _TEXT[name](**kwargs)

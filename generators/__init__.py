"""Generator architectures, one per file, behind one registry.

Every generator maps a latent batch (and, for conditional ones, class labels) to images with
pixels in [0, 1] at the teacher's channels and size; the synthesizer normalises them into the
teacher's input space.

Example:
    >>> g = create_generator("dcgan", channels=1, size=28, num_classes=10, latent_dim=64, width=32)
    >>> g(torch.randn(4, 64)).shape
    torch.Size([4, 1, 28, 28])
"""
from __future__ import annotations

from typing import Callable

from datafree.errors import UserError

GENERATORS: dict[str, Callable] = {}


def register_generator(name: str):
    """Decorator: register a constructor ``fn(channels, size, num_classes, **kwargs)``."""

    def add(cls):
        GENERATORS[name] = cls
        return cls

    return add


def create_generator(name: str, channels: int, size: int, num_classes: int, **kwargs):
    """Build a registered generator by name."""
    if name not in GENERATORS:
        raise UserError(f"unknown generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
    try:
        return GENERATORS[name](channels=channels, size=size, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"generator {name!r} does not take these settings: {e}") from None


from generators import conditional, dcgan, pixels  # noqa: E402,F401  (registers them)

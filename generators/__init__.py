"""Generator architectures, one per file, behind one registry.

Every generator maps a latent batch (and, for conditional ones, class labels) to images with
pixels in [0, 1] at the teacher's channels and size; the synthesizer normalises them into the
teacher's input space.

Example:
    >>> import torch
    >>> g = create_generator("dcgan", channels=1, size=28, num_classes=10, latent_dim=64, width=32)
    >>> g(torch.randn(4, 64)).shape
    torch.Size([4, 1, 28, 28])
"""
from __future__ import annotations

from datafree.base.registry import Registry

GENERATORS = Registry("generator")
register_generator = GENERATORS.register  # decorator for constructors fn(channels, size, num_classes, **kwargs)


def create_generator(name: str, channels: int, size: int, num_classes: int, **kwargs):
    """Build a registered generator by name."""
    return GENERATORS.create(name, channels=channels, size=size, num_classes=num_classes, **kwargs)


from generators import conditional, dcgan, pixels  # noqa: E402,F401  (registers them)

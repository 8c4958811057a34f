"""Differentiable siamese augmentation (DSA): one augmentation family per step, the same parameters
applied to the real and the synthetic batch, gradients flowing to the synthetic images.

Families (Zhao & Bilen 2021): ``colour`` (brightness, saturation, contrast), ``crop`` (translation),
``cutout``, ``scale``, ``rotate``, ``flip`` (off for digits). Geometry uses kornia's differentiable
warps; the colour family is a few lines here, since kornia's colour ops expect [0, 1] RGB and these
images are normalised (and often grey).

Example:
    >>> dsa = SiameseAugment(families=("crop", "rotate"))
    >>> params = dsa.sample(torch.Generator().manual_seed(0))
    >>> real_aug, syn_aug = dsa.apply(real, params), dsa.apply(syn, params)   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DIGIT_FAMILIES = ("colour", "crop", "cutout", "scale", "rotate")
ALL_FAMILIES = DIGIT_FAMILIES + ("flip",)


@dataclass
class AugmentParams:
    """One draw: the family and its numbers: shape (4,), shared by every image of both batches
    (siamese), or (n, 4), one row per image (a plain training augmentation)."""

    family: str
    values: torch.Tensor


class SiameseAugment:
    """DSA with the published strengths: brightness 1.0, saturation 2.0, contrast 0.5, crop 0.125,
    cutout 0.5, scale 1.2, rotate 15 degrees."""

    def __init__(self, families=DIGIT_FAMILIES, brightness=1.0, saturation=2.0, contrast=0.5, crop=0.125,
                 cutout=0.5, scale=1.2, rotate=15.0):
        unknown = set(families) - set(ALL_FAMILIES)
        if unknown:
            from datafree.base.errors import UserError
            raise UserError(f"unknown augmentation family {sorted(unknown)}; known: {', '.join(ALL_FAMILIES)}")
        self.families = tuple(families)
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self.crop, self.cutout, self.scale, self.rotate = crop, cutout, scale, rotate

    def sample(self, rng: torch.Generator, per_image: int | None = None) -> AugmentParams:
        """Draw one family and its parameters: one set for the whole batch (siamese), or with
        ``per_image=n`` a set for each of n images, as the reference code draws them when it trains
        an evaluation model (``DiffAugment`` with ``seed=-1``)."""
        family = self.families[int(torch.randint(len(self.families), (1,), generator=rng))]
        u = torch.rand(4, generator=rng) if per_image is None else torch.rand(per_image, 4, generator=rng)
        return AugmentParams(family, u)

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Apply the drawn augmentation to a batch (differentiable in ``x``)."""
        u = p.values.view(1, 4).expand(len(x), 4) if p.values.dim() == 1 else p.values
        if len(u) != len(x):
            raise ValueError(f"{len(u)} per-image draws for a batch of {len(x)}")
        return getattr(self, f"_{p.family}")(x, u.to(device=x.device, dtype=x.dtype))  # drawn on the CPU, used where x is

    def __call__(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(rng))

    # --- families: ``u`` holds one row of four uniform numbers per image ---------------------------
    def _colour(self, x, u):
        u = u.view(-1, 4, 1, 1, 1)
        x = x + (u[:, 0] - 0.5) * self.brightness
        if x.shape[1] > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (u[:, 1] * self.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (u[:, 2] + self.contrast) + mean

    def _crop(self, x, u):
        from kornia.geometry.transform import translate

        shift = ((u[:, :2] * 2 - 1) * self.crop * x.shape[-1]).round()
        return translate(x, shift, padding_mode="zeros")

    def _cutout(self, x, u):
        size = x.shape[-1]
        half = int(size * self.cutout / 2)
        rows = torch.arange(size, device=x.device)
        centre = (u[:, :2] * size).long()                     # (n, 2): cy, cx
        inside = (rows >= centre[:, :, None] - half) & (rows < centre[:, :, None] + half)  # (n, 2, size)
        hole = inside[:, 0, :, None] & inside[:, 1, None, :]  # (n, size, size)
        return x * (~hole).to(x.dtype)[:, None]

    def _scale(self, x, u):
        from kornia.geometry.transform import scale

        return scale(x, u[:, :2] * (self.scale - 1 / self.scale) + 1 / self.scale, padding_mode="zeros")

    def _rotate(self, x, u):
        from kornia.geometry.transform import rotate

        return rotate(x, (u[:, 0] * 2 - 1) * self.rotate, padding_mode="zeros")

    def _flip(self, x, u):
        return torch.where(u[:, 0].view(-1, 1, 1, 1) < 0.5, x.flip(-1), x)


def families_for(dataset: str) -> tuple[str, ...]:
    """No flips for digits; every family otherwise."""
    return DIGIT_FAMILIES if "mnist" in dataset and "fashion" not in dataset else ALL_FAMILIES


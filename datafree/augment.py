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
    """One draw: the family and its numbers, shared by every image of both batches."""

    family: str
    values: torch.Tensor


class SiameseAugment:
    """DSA with the published strengths: brightness 1.0, saturation 2.0, contrast 0.5, crop 0.125,
    cutout 0.5, scale 1.2, rotate 15 degrees."""

    def __init__(self, families=DIGIT_FAMILIES, brightness=1.0, saturation=2.0, contrast=0.5, crop=0.125,
                 cutout=0.5, scale=1.2, rotate=15.0):
        unknown = set(families) - set(ALL_FAMILIES)
        if unknown:
            from datafree.errors import UserError
            raise UserError(f"unknown augmentation family {sorted(unknown)}; known: {', '.join(ALL_FAMILIES)}")
        self.families = tuple(families)
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self.crop, self.cutout, self.scale, self.rotate = crop, cutout, scale, rotate

    def sample(self, rng: torch.Generator) -> AugmentParams:
        """Draw one family and its parameters."""
        family = self.families[int(torch.randint(len(self.families), (1,), generator=rng))]
        u = torch.rand(4, generator=rng)
        return AugmentParams(family, u)

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Apply the drawn augmentation to a batch (differentiable in ``x``)."""
        return getattr(self, f"_{p.family}")(x, p.values)

    def __call__(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(rng))

    # --- families ---------------------------------------------------------------------------------
    def _colour(self, x, u):
        x = x + (u[0] - 0.5) * self.brightness
        if x.shape[1] > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (u[1] * self.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (u[2] + self.contrast) + mean

    def _crop(self, x, u):
        from kornia.geometry.transform import translate

        shift = ((u[:2] * 2 - 1) * self.crop * x.shape[-1]).round()
        return translate(x, shift.view(1, 2).expand(len(x), 2).to(x.dtype), padding_mode="zeros")

    def _cutout(self, x, u):
        size = x.shape[-1]
        half = int(size * self.cutout / 2)
        cy, cx = int(u[0] * size), int(u[1] * size)
        mask = torch.ones(size, size, dtype=x.dtype, device=x.device)
        mask[max(0, cy - half):cy + half, max(0, cx - half):cx + half] = 0
        return x * mask

    def _scale(self, x, u):
        from kornia.geometry.transform import scale

        factors = (u[:2] * (self.scale - 1 / self.scale) + 1 / self.scale).view(1, 2).expand(len(x), 2)
        return scale(x, factors.to(x.dtype), padding_mode="zeros")

    def _rotate(self, x, u):
        from kornia.geometry.transform import rotate

        angle = (u[0] * 2 - 1) * self.rotate
        return rotate(x, angle.expand(len(x)).to(x.dtype), padding_mode="zeros")

    def _flip(self, x, u):
        return x.flip(-1) if u[0] < 0.5 else x


def families_for(dataset: str) -> tuple[str, ...]:
    """No flips for digits; every family otherwise."""
    return DIGIT_FAMILIES if "mnist" in dataset and "fashion" not in dataset else ALL_FAMILIES


"""Direct pixel parameterisation: a learnable image batch, for DeepInversion-style optimisation.

The "generator" is the batch itself (pixels = sigmoid(parameters)); with ``resolution`` below the
image size the parameters are a coarser grid upsampled bilinearly, which gives smoother strokes and
fewer unknowns per image. ``reset()`` draws a fresh batch
and fresh target classes, so the same synthesis loop runs generator training and pixel
optimisation alike.

Example:
    >>> g = PixelGenerator(channels=1, size=28, num_classes=10, batch_size=8)
    >>> g().shape, sorted(g.targets.tolist())
    (torch.Size([8, 1, 28, 28]), [0, 1, 2, 3, 4, 5, 6, 7])
"""
import torch
import torch.nn.functional as F
from torch import nn

from generators import register_generator


@register_generator("pixels")
class PixelGenerator(nn.Module):
    conditional = True
    latent_dim = 0

    def __init__(self, channels=1, size=28, num_classes=10, batch_size=256, init_std=1.0, resolution=None):
        super().__init__()
        self.num_classes, self.init_std, self.size = num_classes, init_std, size
        res = resolution or size
        self.logits = nn.Parameter(torch.zeros(batch_size, channels, res, res))
        self.register_buffer("targets", torch.arange(batch_size) % num_classes)
        self.reset()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Fresh random pixels; targets cycle through the classes in a fresh random order."""
        self.logits.copy_(torch.randn(self.logits.shape, generator=generator) * self.init_std)
        self.targets.copy_(torch.randperm(len(self.targets), generator=generator) % self.num_classes)

    def forward(self, z: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits
        if logits.shape[-1] != self.size:
            logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)

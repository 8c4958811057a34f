"""The DAFL/CMI generator: latent -> linear -> two (upsample, conv, BN, LeakyReLU) blocks -> image.

As published (DAFL, Chen et al. 2019) at ``width=64``; ``width`` 16-32 keeps it within a few times
a LeNet teacher's cost, which is what a CPU can afford.

Example:
    >>> DCGANGenerator(channels=1, size=28, latent_dim=100, width=64)(torch.randn(2, 100)).shape
    torch.Size([2, 1, 28, 28])
"""
import torch
from torch import nn

from generators import register_generator


def upsampling_body(width: int, channels: int, size: int, in_features: int) -> tuple[nn.Module, nn.Module, int]:
    """The shared trunk: linear to a (2*width, size/4, size/4) map, then two upsampling conv blocks."""
    if size % 4:
        raise ValueError(f"the image size {size} must be divisible by 4")
    init = size // 4
    project = nn.Linear(in_features, 2 * width * init * init)
    body = nn.Sequential(
        nn.BatchNorm2d(2 * width),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid(),
    )
    return project, body, init


@register_generator("dcgan")
class DCGANGenerator(nn.Module):
    conditional = False

    def __init__(self, channels=1, size=28, num_classes=10, latent_dim=100, width=64):
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        self.project, self.body, self.init = upsampling_body(width, channels, size, latent_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], 2 * self.width, self.init, self.init)
        return self.body(h)

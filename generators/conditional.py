"""A class-conditional generator: the DAFL trunk fed with noise concatenated to a label embedding.

Asking for class ``y`` and training with the one-hot prior against ``y`` lets a user (and the
synthesizer) draw a balanced transfer set, each class on demand.

Example:
    >>> g = ConditionalGenerator(channels=1, size=28, num_classes=10, latent_dim=64, width=32)
    >>> g(torch.randn(3, 64), torch.tensor([0, 1, 2])).shape
    torch.Size([3, 1, 28, 28])
"""
import torch
from torch import nn

from generators import register_generator
from generators.dcgan import upsampling_body


@register_generator("conditional")
class ConditionalGenerator(nn.Module):
    conditional = True

    def __init__(self, channels=1, size=28, num_classes=10, latent_dim=100, width=64, embed_dim=None):
        super().__init__()
        self.latent_dim, self.width, self.num_classes = latent_dim, width, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim or latent_dim)
        self.project, self.body, self.init = upsampling_body(width, channels, size, latent_dim + (embed_dim or latent_dim))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("the conditional generator needs class labels y")
        h = self.project(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], 2 * self.width, self.init, self.init)
        return self.body(h)

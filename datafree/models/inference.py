"""Inference without Lightning: a model's device, its logits in batches, accuracy and agreement.

Everything that only *runs* a model (audits, selection, handoff checks, reports) imports from here,
so it never loads the training stack.

Example:
    >>> from datafree.models.zoo import create_model
    >>> model = create_model("lenet5", 10, 1, 28)
    >>> predict(model, torch.zeros(3, 1, 28, 28)).shape
    torch.Size([3, 10])
"""
from __future__ import annotations

import torch
from torch import nn

from datafree.data.datasets import ImageSet


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one that has neither).

    Example:
        >>> module_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in eval mode, in batches."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    out = torch.cat([model(chunk.to(device)).cpu() for chunk in images.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent."""
    return (predict(model, data.images, batch_size).argmax(1) == data.labels).float().mean().item() * 100


@torch.no_grad()
def agreement(student: nn.Module, images: torch.Tensor, t_logits: torch.Tensor) -> float:
    """Percent of images on which the student's argmax equals the teacher's."""
    return (predict(student, images).argmax(1) == t_logits.argmax(1).cpu()).float().mean().item() * 100

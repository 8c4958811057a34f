"""Knowledge beyond logits: optional student terms on the synthetic batches.

- ``hint`` (feature knowledge; Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the
  student's penultimate features, through a learned linear projection (a 1x1 convolution on a 1x1
  map), regress the teacher's penultimate features (mean squared error);
- ``attention`` (feature knowledge; Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR
  2017): the spatial attention maps (channel mean of the squared activations, L2-normalised) of the
  last spatial layer of student and teacher agree (squared error, the paper's weight 1000 / 2); maps
  of different sizes are average-pooled to the smaller one;
- ``rkd`` (relation knowledge; Park et al., "Relational Knowledge Distillation", CVPR 2019): the
  student's embeddings keep the teacher's pairwise distances (normalised by their mean) and the
  angles of triplets (smooth L1), with the paper's weights 25 (distance) and 50 (angle).

All need the teacher's insides (penultimate features; spatial maps for ``attention``); a teacher
that hides them (TorchScript) turns them off with a one-line note. ``DistillConfig.knowledge``
holds their weights, e.g. ``{"rkd": 1.0}``.

Example:
    >>> s, t = torch.randn(8, 5), torch.randn(8, 7)
    >>> rkd_loss(t, t).item(), round(rkd_loss(s, t).item(), 1) > 0
    (0.0, True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KNOWLEDGE_TERMS = ("hint", "attention", "rkd")
RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0  # Park et al. 2019
AT_BETA = 1000.0  # Zagoruyko & Komodakis 2017: the loss is beta / 2 times the mean squared difference of the maps
ANGLE_SAMPLES = 64  # the angle term is cubic in the batch: it uses the first 64 samples of a batch


def _distances(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    return d / d[d > 0].mean().clamp_min(1e-12)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance- and angle-wise relational KD between two batches of embeddings (any widths)."""
    s, t = student.flatten(1), teacher.flatten(1).detach()
    loss = RKD_DISTANCE * F.smooth_l1_loss(_distances(s), _distances(t))
    s, t = s[:ANGLE_SAMPLES], t[:ANGLE_SAMPLES]
    return loss + RKD_ANGLE * F.smooth_l1_loss(_angles(s), _angles(t))


def attention_map(activations: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """N x (H*W) spatial attention: the channel mean of squared activations (pooled to ``size``), L2-normalised."""
    energy = activations.pow(2).mean(1, keepdim=True)
    if size is not None and tuple(energy.shape[2:]) != tuple(size):
        energy = F.adaptive_avg_pool2d(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer between two N x C x H x W activations (any channels; sizes pooled to the smaller).

    Example:
        >>> a = torch.randn(4, 8, 6, 6)
        >>> attention_loss(a, a).item(), attention_loss(torch.randn(4, 3, 5, 5), a).item() > 0
        (0.0, True)
    """
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    diff = attention_map(student, size) - attention_map(teacher.detach(), size)
    return AT_BETA / 2 * diff.pow(2).mean()


class Hint(nn.Module):
    """The learned projection of the student's features onto the teacher's, and its loss.

    Example:
        >>> hint = Hint(5, 7)
        >>> hint(torch.randn(4, 5), torch.randn(4, 7)).shape
        torch.Size([])
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.project = nn.Linear(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.project(student.flatten(1)), teacher.flatten(1).detach())


def knowledge_terms(weights: dict, student_features: torch.Tensor, teacher_features: torch.Tensor,
                    hint: Hint | None, student_map: torch.Tensor | None = None,
                    teacher_map: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms named in ``weights`` (``hint`` needs the :class:`Hint` module, ``attention``
    the spatial maps of both)."""
    terms = {}
    if weights.get("hint") and hint is not None:
        terms["hint"] = weights["hint"] * hint(student_features, teacher_features)
    if weights.get("attention") and student_map is not None and teacher_map is not None:
        terms["attention"] = weights["attention"] * attention_loss(student_map, teacher_map)
    if weights.get("rkd"):
        terms["rkd"] = weights["rkd"] * rkd_loss(student_features, teacher_features)
    return terms

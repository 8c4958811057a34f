"""Knowledge beyond logits: optional student terms on the synthetic batches.

- ``hint`` (feature knowledge; Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the
  student's penultimate features, through a learned linear projection (a 1x1 convolution on a 1x1
  map), regress the teacher's penultimate features (mean squared error);
- ``rkd`` (relation knowledge; Park et al., "Relational Knowledge Distillation", CVPR 2019): the
  student's embeddings keep the teacher's pairwise distances (normalised by their mean) and the
  angles of triplets (smooth L1), with the paper's weights 25 (distance) and 50 (angle).

Both need the teacher's penultimate features; a teacher that hides them (TorchScript) turns them
off with a one-line note. ``DistillConfig.knowledge`` holds their weights, e.g. ``{"rkd": 1.0}``.

Example:
    >>> s, t = torch.randn(8, 5), torch.randn(8, 7)
    >>> rkd_loss(t, t).item(), round(rkd_loss(s, t).item(), 1) > 0
    (0.0, True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KNOWLEDGE_TERMS = ("hint", "rkd")
RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0  # Park et al. 2019
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
                    hint: Hint | None) -> dict[str, torch.Tensor]:
    """The weighted terms named in ``weights`` (``hint`` needs the :class:`Hint` module)."""
    terms = {}
    if weights.get("hint") and hint is not None:
        terms["hint"] = weights["hint"] * hint(student_features, teacher_features)
    if weights.get("rkd"):
        terms["rkd"] = weights["rkd"] * rkd_loss(student_features, teacher_features)
    return terms

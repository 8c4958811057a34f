"""The student's loss on the teacher's logits.

Example:
    >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item()
    0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(s_logits, t_logits, temperature: float = 4.0, alpha: float = 0.0, kind: str = "kl") -> torch.Tensor:
    """KL(teacher || student) at temperature T scaled by T^2, mixed (alpha) with CE on the teacher's argmax.

    ``kind='l1'`` is DFAD's mean absolute logit difference instead of the KL term.

    Example:
        >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item()
        0.0
    """
    if kind == "l1":
        soft = (s_logits - t_logits).abs().mean()
    else:
        soft = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                        reduction="batchmean") * temperature ** 2
    if alpha <= 0:
        return soft
    return (1 - alpha) * soft + alpha * F.cross_entropy(s_logits, t_logits.argmax(1))

"""Synthesis losses ("priors"): each a named term over one synthetic batch, weighted by a preset.

Every prior takes a :class:`SynthesisBatch` (the images, the teacher's logits, features and BN
taps, the student's logits, the asked classes) and returns a scalar that the generator
*minimises*. The registry maps names to functions; a preset is a dict of weights over these names.

| name        | term (minimised by the generator)                                  | source                  |
|-------------|--------------------------------------------------------------------|-------------------------|
| bn          | sum over BN layers of ||mu - running_mean||_2 + ||var - running_var||_2 | DeepInversion, DFQ, CMI |
| onehot      | CE(teacher logits, asked class or the teacher's own argmax)         | DAFL                    |
| entropy     | -H(mean prediction over the batch): class balance                  | DAFL (information)      |
| activation  | -mean |penultimate features|                                        | DAFL                    |
| adv         | -disagreement(student, teacher) (L1 / KL / JS at temperature T)     | DFAD, ZSKT, DeepInv ADI |
| tv          | total variation of the images                                       | DeepInversion           |
| l2          | mean squared image (input space)                                    | DeepInversion           |
| soft        | CE(Dirichlet soft target from class similarity, teacher softmax at T=20) | ZSKD                |
| input       | ||batch mean||_2 + ||batch var - 1||_2 per channel, in input space  | ours (BN prior's form)  |

``input`` reads the teacher's input normalisation as a BatchNorm layer whose running statistics
are known: a teacher normalised by its data's mean and std sees real data with mean 0 and variance
1 per channel, so synthetic images should too. It needs no BN layer in the network, only an input
spec that carries the data's statistics (not the identity 0 / 1).

Example:
    >>> batch = SynthesisBatch(images=x, t_logits=teacher(x), taps=teacher.bn_taps())   # doctest: +SKIP
    >>> PRIORS["onehot"](batch)                                                       # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from datafree.teachers.taps import BNTap, bn_layer_losses


@dataclass
class SynthesisBatch:
    images: torch.Tensor
    t_logits: torch.Tensor
    features: torch.Tensor | None = None
    taps: list[BNTap] = field(default_factory=list)
    s_logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    soft_targets: torch.Tensor | None = None
    soft_temperature: float = 20.0


def onehot(batch: SynthesisBatch) -> torch.Tensor:
    target = batch.targets if batch.targets is not None else batch.t_logits.argmax(1)
    return F.cross_entropy(batch.t_logits, target)


def entropy(batch: SynthesisBatch) -> torch.Tensor:
    mean_p = F.softmax(batch.t_logits, dim=1).mean(0)
    return (mean_p * torch.log(mean_p + 1e-8)).sum()  # = -H(mean prediction); minimal when balanced


def activation(batch: SynthesisBatch) -> torch.Tensor:
    if batch.features is None:
        return torch.zeros((), device=batch.images.device)
    return -batch.features.abs().mean()


def disagreement(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str = "l1", temperature: float = 1.0) -> torch.Tensor:
    """How much the student disagrees with the teacher: ``l1`` on logits, ``kl`` or ``js`` at T."""
    if kind == "l1":
        return (s_logits - t_logits).abs().mean()
    p_t = F.softmax(t_logits / temperature, dim=1)
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    if kind == "kl":
        return F.kl_div(log_p_s, p_t, reduction="batchmean")
    if kind == "js":
        p_s = log_p_s.exp()
        m = 0.5 * (p_s + p_t)
        return 0.5 * (F.kl_div(m.log(), p_s, reduction="batchmean") + F.kl_div(m.log(), p_t, reduction="batchmean"))
    raise ValueError(f"unknown disagreement {kind!r}; use l1, kl or js")


def total_variation(images: torch.Tensor, p: int = 2) -> torch.Tensor:
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    if p == 1:
        return dx.abs().mean() + dy.abs().mean()
    return dx.pow(2).mean() + dy.pow(2).mean()


def soft_target(batch: SynthesisBatch) -> torch.Tensor:
    """Cross-entropy between each image's sampled soft target and the teacher's softmax at a high
    temperature (ZSKD's data impressions: Nayak et al., "Zero-Shot Knowledge Distillation in Deep
    Networks", ICML 2019, eq. 3, T = 20)."""
    if batch.soft_targets is None:
        raise ValueError("the soft-target prior needs soft targets (a pixels generator draws them at each reset)")
    log_p = F.log_softmax(batch.t_logits / batch.soft_temperature, dim=1)
    return -(batch.soft_targets * log_p).sum(1).mean()


def dirichlet_targets(classes: torch.Tensor, similarity: torch.Tensor, betas=(1.0, 0.1), floor: float = 1e-3) -> torch.Tensor:
    """One soft target per asked class: Dirichlet(beta * similarity row of the class), the first half
    of the batch at beta 1.0 and the second at 0.1 (ZSKD's two scales). Uses torch's global RNG.

    Example:
        >>> sim = torch.eye(3) * 0.9 + 0.1
        >>> dirichlet_targets(torch.tensor([0, 1, 2, 0]), sim).sum(1).round(decimals=4)
        tensor([1., 1., 1., 1.])
    """
    beta = torch.full((len(classes), 1), betas[0])
    beta[len(classes) // 2:] = betas[1]
    alpha = beta * similarity.cpu()[classes.cpu()] + floor
    return torch.distributions.Dirichlet(alpha).sample().to(classes.device)


def input_statistics(batch: SynthesisBatch) -> torch.Tensor:
    """The input normalisation as a BN layer: per channel, ||batch mean - 0||_2 + ||batch var - 1||_2
    in the teacher's input space, where its data had mean 0 and variance 1.

    Example:
        >>> x = torch.randn(512, 1, 8, 8)
        >>> input_statistics(SynthesisBatch(images=x, t_logits=torch.zeros(512, 10))).item() < 0.1
        True
    """
    x = batch.images
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    return bn_layer_losses([BNTap("input", mean, var, torch.zeros_like(mean), torch.ones_like(var))])[0]


PRIORS = {
    "onehot": onehot,
    "entropy": entropy,
    "activation": activation,
    "tv": lambda batch: total_variation(batch.images),
    "l2": lambda batch: batch.images.pow(2).mean(),
    "soft": soft_target,
    "input": input_statistics,
}
"""The stateless priors by name; ``bn`` (stateful, per layer) and ``adv`` (needs the student and
its options) are applied by the synthesizer with :class:`BNStatistics` and :func:`disagreement`."""

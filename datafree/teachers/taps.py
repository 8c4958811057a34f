"""Taps: what a forward pass shows of a network's insides, and the BatchNorm-statistics prior over it.

- :class:`BNTap`: one BatchNorm layer's batch mean / variance of its input beside its running
  statistics (recorded by :class:`TapRecorder`, in a ``torch.export`` graph by :class:`GraphTap`);
- :class:`SpatialTap`: the last spatial activation of any module (the map attention transfer reads);
- :class:`BNStatistics`: the distance of the taps to the running statistics, the prior that both
  pipelines use (distillation's ``bn`` term and condensation's ``teacher_bn`` term).

Example:
    >>> tap = BNTap("bn", torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3))
    >>> float(BNStatistics()([tap])[0])
    0.0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BNTap:
    """One BatchNorm layer seen in the last forward: batch mean/var of its input and its running stats."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    member: int = 0  # which teacher of an ensemble (each member's BN prior counts once)


class TapRecorder:
    """Collects per-channel mean/var of BN inputs during one forward pass."""

    def __init__(self):
        self.taps: list[BNTap] = []
        self.features: torch.Tensor | None = None
        self.spatial: torch.Tensor | None = None

    def reset(self):
        self.taps, self.features, self.spatial = [], None, None

    def record(self, name, x, running_mean, running_var):
        dims = [0] + list(range(2, x.dim()))
        x = x.float()  # statistics in fp32, also when the pass runs in bf16 (autocast)
        self.taps.append(BNTap(name, x.mean(dims), x.var(dims, unbiased=False), running_mean.detach().float(),
                               running_var.detach().float()))


class GraphTap(nn.Module):
    """Inserted into a ``torch.export`` graph before a batch-norm node; records and passes through."""

    def __init__(self, recorder: TapRecorder, name: str, kind: str):
        super().__init__()
        self.recorder, self.name, self.kind = recorder, name, kind

    def forward(self, x, running_mean=None, running_var=None):
        if self.kind == "bn":
            self.recorder.record(self.name, x, running_mean, running_var)
        elif self.kind == "spatial":
            self.recorder.spatial = x
        else:
            self.recorder.features = x
        return x


class SpatialTap:
    """Keeps the last spatial activation (a 4-D output of at least 2 x 2) that any leaf module of
    ``model`` produced in its latest forward: the map attention transfer compares.

    Example:
        >>> from datafree.models.zoo import create_model
        >>> model = create_model("lenet5", 10, 1, 28)
        >>> tap = SpatialTap(model)
        >>> _ = model(torch.zeros(2, 1, 28, 28))
        >>> tuple(tap.value.shape)
        (2, 16, 5, 5)
    """

    def __init__(self, model: nn.Module):
        self.value: torch.Tensor | None = None
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        if torch.is_tensor(output) and output.dim() == 4 and min(output.shape[2:]) >= 2:
            self.value = output


def bn_layer_losses(taps: list[BNTap]) -> list[torch.Tensor]:
    """Per BN layer: ||batch mean - running mean||_2 + ||batch var - running var||_2 (as published)."""
    return [torch.linalg.vector_norm(t.mean - t.running_mean) + torch.linalg.vector_norm(t.var - t.running_var) for t in taps]


class BNStatistics:
    """The BN prior with its options: extra weight on the first layer, momentum blend across batches.

    The prior sums its layers' losses; for an ensemble it is the mean of the members' sums (each
    member's first layer gets the extra weight), so it weighs as much against the other priors as
    one teacher's does, the scale the presets' weights were set for.

    With ``momentum`` m > 0 the batch statistics are blended with those of earlier batches,
    ``m * previous.detach() + (1 - m) * current`` (as in Fast / CMI), which matches the running
    statistics over many small batches instead of forcing each batch to match alone.

    Example:
        >>> prior = BNStatistics(first_layer_weight=2.0)
        >>> total, per_layer = prior(taps)   # doctest: +SKIP
    """

    def __init__(self, first_layer_weight: float = 1.0, momentum: float = 0.0):
        self.first_layer_weight, self.momentum = first_layer_weight, momentum
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, taps: list[BNTap]) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total (differentiable) and each layer's loss (detached, a 1-D tensor: it
        becomes Python floats only where it is logged, so a step does not wait for the device)."""
        if not taps:
            return torch.zeros(()), torch.zeros(0)
        if self.momentum > 0:
            taps = [self._blend(t) for t in taps]
        losses = bn_layer_losses(taps)
        members = sorted({t.member for t in taps})
        firsts = {next(i for i, t in enumerate(taps) if t.member == m) for m in members}
        weights = [self.first_layer_weight if i in firsts else 1.0 for i in range(len(taps))]
        total = sum(w * l for w, l in zip(weights, losses)) / len(members)  # an ensemble: the members' mean
        return total, torch.stack(losses).detach()

    def _blend(self, tap: BNTap) -> BNTap:
        m, key = self.momentum, f"{tap.member}/{tap.name}"
        if key in self.previous:
            pm, pv = self.previous[key]
            mean, var = m * pm + (1 - m) * tap.mean, m * pv + (1 - m) * tap.var
        else:
            mean, var = tap.mean, tap.var
        self.previous[key] = (mean.detach(), var.detach())
        return BNTap(tap.name, mean, var, tap.running_mean, tap.running_var, tap.member)

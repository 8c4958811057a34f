"""What every condensation method shares: its settings, its result, the registry of methods, and the matching network.

Methods register with :func:`register_condenser` under a name (``CONDENSERS``); :func:`~datafree.condense.condenser.condense`
looks them up.

Example:
    >>> CondenseSettings(ipc=1).loops(), matching_net_kwargs(CondenseSettings())["width"]
    ((1, 1), 32)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from datafree.base.precision import FP32, Precision, check_precision, choose
from datafree.base.registry import Registry
from datafree.data.datasets import ImageSet, InputSpec  # noqa: F401  (InputSpec: docstring example)
from datafree.models.zoo import create_model

CONDENSERS = Registry("condensation method")
register_condenser = CONDENSERS.register  # decorator for fn(source, settings, progress) -> Condensed


@dataclass
class CondenseSettings:
    """Settings of the matching condensers. The defaults are a CPU schedule: a width-32 matching
    ConvNet (chosen over 64 on a validation split of the training data at 4 minutes, BENCHMARKS.md), 128 real
    images per class per step (256 for ``gm_pool``, :data:`~datafree.condense.config.METHOD_DEFAULTS`) and 10 inner network updates; the published one is
    ``net_width=128, real_per_class=256, inner_loop=50``."""

    ipc: int = 10
    iterations: int | None = 1000        # None: no cap, the time budget ends the run
    outer_loop: int | None = None         # matching steps per fresh network; default 1 (ipc 1), 10 (ipc <= 10), 50
    inner_loop: int | None = None         # network updates between matching steps; default 1 (ipc 1), else 10
    real_per_class: int = 128
    lr_images: float = 0.1
    lr_net: float = 0.01
    net_width: int = 32
    net_depth: int = 3
    first_padding: int = 1                # matching ConvNet's first-layer padding: 1 chosen on the validation split over the
                                          # reference code's 3 for MNIST (models.reference_padding; BENCHMARKS.md)
    init: str = "real"                    # real | herding | noise | kmeans
    dm_layers: str = "last"               # dm: match the mean of the last embedding ("last", DM) or of every block ("all", as CAFE)
    factor: int = 1                       # multi-formation: each stored image holds factor x factor smaller images
    pool_size: int = 6                    # gm_pool, dm_pool: networks in the pool
    refresh_every: int = 100              # gm_pool, dm_pool: matching steps between replacing the oldest network
    aug_draws: int = 4                    # gm_pool, dm_pool: cached augmentation draws per network and class
    pool_train_steps: int = 200           # gm_pool, dm_pool: a pool network is trained on the real data for 0..this many steps
                                          # (100 and 200: +0.7 over 30 and 50 for gm_pool on an MNIST ipc 10 validation split only; BENCHMARKS.md)
    teacher_ce: float = 0.0               # data-free: weight of the teacher's cross-entropy on the synthetic images
    teacher_bn: float = 0.0               # data-free: weight of the teacher's BN-statistics prior on them
    time_budget: float | None = None      # seconds, counted across resumes
    checkpoint_every: float = 60.0        # seconds between checkpoints (when a checkpoint path is given)
    seed: int = 0
    precision: str = "fp32"               # the matching network's passes: auto | fp32 | bf16 | fp16 (base.precision; auto is timed)
    extra: dict = field(default_factory=dict)

    def loops(self) -> tuple[int, int]:
        outer = 1 if self.ipc == 1 else 10 if self.ipc <= 10 else 50
        inner = 1 if self.ipc == 1 else 10
        return self.outer_loop or outer, self.inner_loop or inner


@dataclass
class Condensed:
    images: torch.Tensor                  # what a model trains on (decoded, with --factor)
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    stored: torch.Tensor | None = None    # with factor > 1: the stored images (the storage budget), ipc per class
    history: list[dict] = field(default_factory=list)
    init_source: torch.Tensor | None = None   # per image: the source index it started from (-1: not a source image)
    precision: dict = field(default_factory=dict)  # what the matching network's passes ran in, and what was measured
    privacy: dict | None = None  # a DP run's plan (condense.private.PrivacyPlan) and the steps it made

    def cpu(self) -> "Condensed":
        """The result with every tensor on the CPU (where it is written and evaluated)."""
        moved = {name: value.cpu() if torch.is_tensor(value) else value for name, value in vars(self).items()}
        return Condensed(**moved)


def class_index(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def matching_net_kwargs(s: CondenseSettings) -> dict:
    """The ConvNet the matching methods (and the selection features) use, as ``create_model`` kwargs.

    Example:
        >>> matching_net_kwargs(CondenseSettings())
        {'width': 32, 'depth': 3, 'norm': 'instance', 'first_padding': 1}
    """
    return {"width": s.net_width, "depth": s.net_depth, "norm": "instance", "first_padding": s.first_padding}


def matching_net(source: ImageSet, s: CondenseSettings, precision: Precision = FP32) -> nn.Module:
    """A fresh matching ConvNet on the source's device, in the precision's memory layout."""
    spec = source.spec
    net = create_model("convnet", spec.num_classes, spec.channels, spec.size, **matching_net_kwargs(s))
    return precision.network(net.to(source.images.device))


def matching_precision(source: ImageSet, s: CondenseSettings) -> tuple[Precision, dict]:
    """The precision and layout the matching network's passes run in: ``s.precision``, or for
    ``auto`` the fastest measured on one class's real batch (a forward, the gradient with its graph,
    and the backward through it: the pattern of a gradient-matching step).

    Example:
        >>> spec = InputSpec(1, 28, (0.5,), (0.5,), [str(c) for c in range(10)])
        >>> tiny = ImageSet(torch.randn(40, 1, 28, 28), torch.arange(10).repeat(4), spec)
        >>> matching_precision(tiny, CondenseSettings(net_width=8, real_per_class=4))[0].describe()
        'fp32'
    """
    device = source.images.device
    if s.precision != "auto":
        check_precision(s.precision, device.type)
        return Precision(s.precision), {"requested": s.precision, "chosen": Precision(s.precision).as_dict()}
    x = source.images[:s.real_per_class]
    y = source.labels[:s.real_per_class].to(device)

    def step(p: Precision):
        net = matching_net(source, s, p)
        params = list(net.parameters())
        with p.autocast(device.type):
            loss = F.cross_entropy(net(x).float(), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sum(g.float().pow(2).sum() for g in grads).backward()

    state = torch.get_rng_state()
    try:
        chosen, measured = choose("auto", device, step)
    finally:
        torch.set_rng_state(state)
    return chosen, {"requested": "auto", "device": str(device), "chosen": chosen.as_dict(), "measured_ms": measured["ms"],
                    "failed": measured["failed"]}


DM_LAYERS = ("last", "all")

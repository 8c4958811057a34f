"""Structured pruning of a teacher's channels with Torch-Pruning (DepGraph, Fang et al., CVPR 2023).

The dependency graph couples every layer that must lose the same channels (a convolution, its
BatchNorm, the next layer's inputs, both sides of a residual add, the flatten into a linear layer),
so what is removed is whole channels and the network stays a plain, smaller network of the same
architecture: the teacher's remaining weights and BN layers are kept as they were. The classifier
head keeps every class.

Importance says which channels go:

- ``magnitude``: the L2 norm of each coupled channel group's weights (Torch-Pruning's default);
  reads the weights only;
- ``taylor``: first-order Taylor importance, |w * dL/dw| summed over a group (Molchanov et al.,
  CVPR 2019), with L the model's cross-entropy to its own predictions on *synthetic* batches:
  noise images optimised to match the teacher's BatchNorm statistics and a class each
  (DeepInversion's prior). No real image is read.

Example:
    >>> from datafree.teachers.formats import load_model
    >>> model, _ = load_model("assets/teachers/mnist_lenet5.safetensors")
    >>> pruned = prune_model(model, (1, 28, 28), target_macs=count_macs(model, (1, 28, 28)) // 2)
    >>> count_macs(pruned, (1, 28, 28)) <= count_macs(model, (1, 28, 28)) // 2
    True
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from datafree.base.errors import UserError

IMPORTANCES = ("magnitude", "taylor")
MAX_PRUNING_RATIO = 0.95  # the most of any layer's channels that pruning to a MACs target may remove
BISECTION_STEPS = 12  # pruning to a MACs target: the share of channels removed is found to 0.95 / 2**12


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image through ``model`` (Torch-Pruning's counter).

    Example:
        >>> count_macs(create_model("lenet5"), (1, 28, 28))   # doctest: +SKIP
        429780
    """
    import torch_pruning as tp

    was_training = model.training
    model.eval()  # a forward in training mode would move the BN running statistics
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(macs)


def parse_macs_target(text: str | float, teacher_macs: int) -> int:
    """A MACs target from ``N`` (a count, with an optional K/M/G suffix) or ``Rx`` (R times fewer than the teacher).

    Example:
        >>> parse_macs_target("2x", 1000), parse_macs_target("1.5M", 10 ** 7), parse_macs_target(400, 1000)
        (500, 1500000, 400)
    """
    raw = str(text).strip()
    try:
        if raw.lower().endswith("x"):
            factor = float(raw[:-1])
            if not math.isfinite(factor) or factor <= 1:
                raise ValueError
            return int(teacher_macs / factor)
        scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(raw[-1:].lower(), 1)
        value = float(raw[:-1] if scale > 1 else raw) * scale
        if not math.isfinite(value) or value <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"target MACs {text!r} is neither a count (e.g. 200000 or 1.5M) nor a reduction above 1 (e.g. 2x)") from None
    if value >= teacher_macs:
        raise UserError(f"target MACs {int(value):,} is not below the teacher's {teacher_macs:,}: nothing to prune")
    return int(value)


def synthetic_batches(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, images: int = 128,
                      steps: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images made from noise for ``model`` alone: each optimised (Adam) towards a class and, where the
    model has BatchNorm layers, towards their running statistics (DeepInversion's prior), with a
    small total-variation term. Returns the images and their classes. No real data.

    Example:
        >>> images, classes = synthetic_batches(model, (1, 28, 28), 10, images=32, steps=5)   # doctest: +SKIP
        >>> images.shape                                                                       # doctest: +SKIP
        torch.Size([32, 1, 28, 28])
    """
    from datafree.distill.priors import total_variation
    from datafree.teachers.taps import BNTap, bn_layer_losses

    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    taps: list[BNTap] = []

    def record(module, args):
        x = args[0]
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        taps.append(BNTap("", x.mean(dims), x.var(dims, unbiased=False), module.running_mean, module.running_var))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(images) % num_classes
    x = torch.randn(images, *input_shape, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.1)
    try:
        for _ in range(steps):
            taps.clear()
            loss = F.cross_entropy(net(x), classes) + 0.05 * total_variation(x)
            if taps:
                loss = loss + 0.1 * sum(bn_layer_losses(taps))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return x.detach(), classes


def prune_model(model: nn.Module, input_shape: tuple[int, int, int], sparsity: float | None = None,
                target_macs: int | None = None, importance: str = "magnitude",
                batches: torch.Tensor | None = None) -> nn.Module:
    """A pruned copy of ``model`` (a zoo classifier): every layer loses ``sparsity`` of its channels,
    or, for ``target_macs``, the smallest such share (found by bisection) whose MACs are at most the
    target. The head keeps every class; ``model`` itself is left as it was. ``taylor`` importance
    needs ``batches`` (images in the model's input space, e.g. from :func:`synthetic_batches`).

    Example:
        >>> pruned = prune_model(model, (1, 28, 28), sparsity=0.5)   # doctest: +SKIP
    """
    if (sparsity is None) == (target_macs is None):
        raise UserError("give either a sparsity or a target MACs count, not both")
    if sparsity is not None and not 0 < sparsity < 1:
        raise UserError(f"sparsity must be between 0 and 1 (the share of each layer's channels removed), got {sparsity!r}")
    if importance not in IMPORTANCES:
        raise UserError(f"unknown importance {importance!r}; use {' or '.join(IMPORTANCES)}")
    if importance == "taylor" and batches is None:
        raise UserError("taylor importance needs synthetic batches to take gradients on")
    if not isinstance(getattr(model, "head", None), nn.Linear):
        raise UserError("only zoo classifiers (a model with a linear head) can be pruned")
    if sparsity is not None:
        return _prune_once(model, input_shape, sparsity, importance, batches)
    low, high = 0.0, MAX_PRUNING_RATIO
    best = _prune_once(model, input_shape, high, importance, batches)
    if count_macs(best, input_shape) > target_macs:
        raise UserError(f"cannot reach {target_macs:,} MACs: removing {MAX_PRUNING_RATIO:.0%} of every layer's channels "
                        f"leaves {count_macs(best, input_shape):,}")
    for _ in range(BISECTION_STEPS):  # channel counts are whole numbers: MACs fall in steps as the share grows
        middle = (low + high) / 2
        candidate = _prune_once(model, input_shape, middle, importance, batches)
        if count_macs(candidate, input_shape) <= target_macs:
            high, best = middle, candidate
        else:
            low = middle
    return best


def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> int:
    """Re-estimate every BatchNorm layer's running statistics of ``model`` from ``images`` (synthetic:
    e.g. :func:`synthetic_batches` of the teacher), as a cumulative average; returns the layers reset.
    A pruned network keeps its teacher's statistics, which no longer describe its layers' inputs once
    channels before them are gone. Only the statistics change, no weight.

    Example:
        >>> recalibrate_bn(pruned, synthetic_batches(teacher, (1, 28, 28), 10)[0])   # doctest: +SKIP
        4
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts alike
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                model(chunk)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


def _prune_once(model: nn.Module, input_shape: tuple[int, int, int], ratio: float, importance: str,
                batches: torch.Tensor | None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every layer's channels removed by Torch-Pruning, in one step."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    scorer = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    # every layer keeps at least one channel (the library skips a layer it would empty, so MACs would jump back up)
    widths = {m: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features for m in pruned.modules()
              if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m is not pruned.head}
    ratios = {m: max(0.0, min(ratio, 1 - 1.5 / width)) for m, width in widths.items()}
    pruner = tp.pruner.BasePruner(pruned, torch.zeros(1, *input_shape), importance=scorer, pruning_ratio=ratio,
                                  pruning_ratio_dict=ratios, ignored_layers=[pruned.head],
                                  customized_pruners={nn.GroupNorm: _group_norm_pruner()})
    if importance == "taylor":
        _taylor_gradients(pruned, batches)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    for p in pruned.parameters():
        p.requires_grad_(True)
    return pruned


def _group_norm_pruner():
    """Torch-Pruning's GroupNorm pruner, except that a GroupNorm with one group per channel (instance
    norm, as the condensation ConvNet has it) loses channels freely and keeps one group per channel
    (the library would prune within each one-channel group: nothing)."""
    from torch_pruning.pruner.function import GroupNormPruner

    class PerChannelGroupNormPruner(GroupNormPruner):
        def prune_out_channels(self, layer: nn.GroupNorm, idxs):
            per_channel = layer.num_groups == layer.num_channels
            layer = super().prune_out_channels(layer, idxs)
            if per_channel:
                layer.num_groups = layer.num_channels
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1 if layer.num_groups == layer.num_channels else layer.num_groups

        get_in_channel_groups = get_out_channel_groups

    return PerChannelGroupNormPruner()


def _taylor_gradients(model: nn.Module, batches: torch.Tensor) -> None:
    """Gradients of the model's cross-entropy to its own predictions on ``batches`` (for Taylor importance)."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    for chunk in batches.split(64):
        logits = model(chunk)
        F.cross_entropy(logits, logits.argmax(1).detach()).backward()


def prune_summary(teacher: nn.Module, pruned: nn.Module, input_shape: tuple[int, int, int], seconds: float) -> dict:
    """Parameters and MACs before and after, with the channels each layer kept.

    Example:
        >>> prune_summary(model, pruned, (1, 28, 28), 0.4)["macs_ratio"]   # doctest: +SKIP
        2.04
    """
    from datafree.models.structure import layer_shapes
    from datafree.models.zoo import count_parameters

    teacher_macs, pruned_macs = count_macs(teacher, input_shape), count_macs(pruned, input_shape)
    return {"teacher_macs": teacher_macs, "macs": pruned_macs, "macs_ratio": round(teacher_macs / pruned_macs, 3),
            "teacher_parameters": count_parameters(teacher), "parameters": count_parameters(pruned),
            "layers": layer_shapes(pruned, teacher), "seconds": round(seconds, 2)}


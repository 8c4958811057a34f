"""Layer shapes that differ from a zoo architecture's: how a pruned model is saved and rebuilt.

Structured pruning (:mod:`datafree.compress.prune`) removes channels, so a pruned ResNet-20 is no
longer what ``create_model("resnet20")`` builds. Its card records, per layer that changed, the
attributes that say its size (``out_channels``, ``num_features``, ...); loading builds the zoo model,
resizes those layers to the recorded attributes and the saved tensors' shapes, then loads the
weights strictly as for any other model. No code is stored and nothing is unpickled.

Example:
    >>> from datafree.models.zoo import create_model
    >>> model, fresh = create_model("lenet5"), create_model("lenet5")
    >>> model.head = torch.nn.Linear(84, 10)          # unchanged sizes: nothing to record
    >>> layer_shapes(model, fresh)
    {}
"""
from __future__ import annotations

import torch
from torch import nn

from datafree.base.errors import UserError

# the attributes that give a layer's size in torch.nn (conv, linear, batch/group/instance norm, PReLU)
SIZE_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                   "num_groups", "num_channels", "num_parameters")


def layer_shapes(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """Per layer of ``model`` whose size differs from the same layer of ``reference`` (the zoo model
    it was made from), the size attributes that differ. Empty for an unchanged model.

    Example:
        >>> pruned = create_model("lenet5"); pruned.head = torch.nn.Linear(84, 3)   # doctest: +SKIP
        >>> layer_shapes(pruned, create_model("lenet5"))                             # doctest: +SKIP
        {'head': {'out_features': 3}}
    """
    layers = dict(reference.named_modules())
    changes = {}
    for name, module in model.named_modules():
        other = layers.get(name)
        if other is None or type(other) is not type(module):
            raise UserError(f"layer {name or '(model)'!r} is not in the architecture the model claims: only layer sizes may change")
        diff = {a: getattr(module, a) for a in SIZE_ATTRIBUTES if hasattr(module, a) and getattr(module, a) != getattr(other, a)}
        if diff:
            changes[name] = diff
    return changes


def apply_layer_shapes(model: nn.Module, shapes: dict[str, dict[str, int]], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the layers named in ``shapes`` (from :func:`layer_shapes`) to those sizes, with
    parameters and buffers shaped like ``tensors`` (the saved state), ready for a strict load.

    Example:
        >>> model = apply_layer_shapes(create_model("resnet20"), card["layer_shapes"], tensors)   # doctest: +SKIP
        >>> model.load_state_dict(tensors)                                                      # doctest: +SKIP
    """
    if not isinstance(shapes, dict):
        raise UserError("the card's 'layer_shapes' must be a mapping of layer names to sizes")
    for name, attributes in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"the card resizes layer {name!r}, which the architecture does not have") from None
        for attribute, value in attributes.items():
            if attribute not in SIZE_ATTRIBUTES or not hasattr(module, attribute) or not isinstance(value, int) or value < 1:
                raise UserError(f"the card sets {attribute!r} of layer {name!r} to {value!r}: not a layer size")
            setattr(module, attribute, value)
        prefix = f"{name}." if name else ""
        for slots in (module._parameters, module._buffers):
            for key, value in slots.items():
                saved = tensors.get(prefix + key)
                if value is None or saved is None or saved.shape == value.shape:
                    continue
                fresh = torch.empty(saved.shape, dtype=value.dtype)
                slots[key] = nn.Parameter(fresh, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else fresh
    return model

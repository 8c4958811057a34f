"""Teacher files: read a handed-over teacher in any of its forms, and write a model with its card.

A model owner can hand over a teacher in three forms, none of which needs their training code:

1. ``NAME.safetensors`` + ``NAME.json`` card (or an arch name from the zoo): full access;
2. a ``torch.export`` program (``.pt2``): the graph's batch-norm nodes are tapped, so BN-based
   synthesis works; the input of the last linear layer serves as the penultimate features, the last
   node with a spatial (4-D, at least 2 x 2) value as the map attention transfer reads;
3. TorchScript: logits only (hooks cannot be attached); BN-based methods refuse it.

Pickle files (``torch.save`` checkpoints) are refused: they are never unpickled.

The loaded model is wrapped in a :class:`~datafree.teachers.teacher.Teacher`, which freezes it.

Example:
    >>> teacher = load_teacher("assets/teachers/mnist_lenet5.safetensors")
    >>> logits = teacher(torch.zeros(4, *teacher.input_shape))
    >>> [tap.name for tap in teacher.bn_taps()][:2]
    ['body.1', 'body.5']
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from datafree.base.errors import UserError
from datafree.base.io import load_tensors, save_tensors, sha256_file, write_json
from datafree.data.datasets import InputSpec, dataset_spec
from datafree.models.structure import apply_layer_shapes, layer_shapes
from datafree.models.zoo import Classifier, count_parameters, create_model
from datafree.teachers.taps import GraphTap, TapRecorder
from datafree.teachers.teacher import Teacher

CARD_FORMAT = "datafree-model/1"


def save_model(model: Classifier, path, arch: str, spec: InputSpec, arch_kwargs: dict | None = None, **card_fields) -> dict:
    """Write ``path`` (.safetensors) and its card (.json beside it); return the card.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> save_model(create_model("lenet5"), path, "lenet5", dataset_spec("mnist"), dataset="mnist")["arch"]
        'lenet5'
    """
    path = Path(path)
    card = {"format": CARD_FORMAT, "arch": arch, "arch_kwargs": arch_kwargs or {}, "num_classes": spec.num_classes,
            "input_spec": spec.to_dict(), "parameters": count_parameters(model)}
    shapes = layer_shapes(model, build_from_card(card)[0])  # a pruned model: the layer sizes that differ from the arch's
    if shapes:
        card["layer_shapes"] = shapes
    save_tensors(path, model.state_dict(), metadata={"format": CARD_FORMAT, "arch": arch})
    card |= {**card_fields, "sha256": sha256_file(path)}
    write_json(path.with_suffix(".json"), card)
    return card


def build_from_card(card: dict) -> tuple[Classifier, InputSpec]:
    """Construct the (untrained) zoo model a card describes."""
    for key in ("arch", "input_spec"):
        if key not in card:
            raise UserError(f"the model card has no {key!r} field")
    spec = InputSpec.from_dict(card["input_spec"])
    model = create_model(card["arch"], spec.num_classes, spec.channels, spec.size, **card.get("arch_kwargs", {}))
    return model, spec


def load_model(path, arch: str | None = None, spec: InputSpec | None = None) -> tuple[Classifier, dict]:
    """Load a zoo model from safetensors + card (or an explicit arch and spec); the card comes back."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"the card {str(card_path)!r} is not valid JSON") from None
    elif arch and spec:
        card = {"arch": arch, "input_spec": spec.to_dict()}
    else:
        raise UserError(f"{str(path)!r} has no card ({card_path.name}); pass --arch and --dataset or --input-spec to say what it is")
    if arch:
        card["arch"] = arch
    if spec:
        card["input_spec"] = spec.to_dict()
    tensors = load_tensors(path)
    if card.get("sha256") and card["sha256"] != sha256_file(path):
        raise UserError(f"{str(path)!r} does not match the sha256 in its card: the weights were changed or damaged")
    model, _ = build_from_card(card)
    if card.get("layer_shapes"):  # a pruned model: its layers are smaller than the architecture's
        apply_layer_shapes(model, card["layer_shapes"], tensors)
    missing, unexpected = _state_mismatch(model, tensors)
    if missing or unexpected:
        raise UserError(f"the weights in {str(path)!r} do not fit the architecture {card['arch']!r} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"the weights in {str(path)!r} do not fit the architecture {card['arch']!r}: {first}") from None
    return model, card


def _state_mismatch(model: nn.Module, tensors: dict) -> tuple[list, list]:
    expected = set(model.state_dict())
    return sorted(expected - set(tensors)), sorted(set(tensors) - expected)


def sniff_format(path) -> str:
    """``safetensors``, ``pt2``, ``torchscript`` or ``pickle``, read from the file's bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no teacher file at {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            raise UserError(f"{str(path)!r} is a truncated or corrupt archive") from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "pt2"
        if any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        raise UserError(f"{str(path)!r} is a zip archive but neither a torch.export program nor TorchScript")
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise UserError(f"{str(path)!r} is not a model file datafree reads (safetensors + card, .pt2, TorchScript)")


def load_teacher(path: str | Path, arch: str | None = None, dataset: str | None = None, input_spec: str | InputSpec | None = None) -> Teacher:
    """Load a teacher file in any handed-over form and freeze it.

    Args:
        path: ``.safetensors`` (with its ``.json`` card beside it), ``.pt2``, or TorchScript.
        arch: zoo architecture, for safetensors without a card.
        dataset: data set name whose input spec applies (for files without a card).
        input_spec: ``CxHxW[:mean:std]`` or an :class:`InputSpec`, overriding everything else.

    Example:
        >>> load_teacher("assets/teachers/mnist_lenet5.safetensors").spec.describe()
        '1x28x28'
        >>> load_teacher("model.pt2").describe()["bn_layers"]      # doctest: +SKIP
        ['body.1', 'body.5', 'body.9', 'fc.1']
    """
    fmt = sniff_format(path)
    if fmt == "pickle":
        raise UserError(f"{str(path)!r} is a pickle file (torch.save); datafree never unpickles a file it is handed. "
                        "Send the weights as safetensors + card, or the model as a torch.export .pt2 program")
    spec = resolve_spec(dataset, input_spec)
    if fmt == "safetensors":
        model, card = load_model(path, arch, spec)
        return Teacher(model, InputSpec.from_dict(card["input_spec"]), fmt, card["arch"], card)
    if fmt == "pt2":
        return _load_exported(Path(path), spec)
    return _load_torchscript(Path(path), spec)


def resolve_spec(dataset: str | None, input_spec: str | InputSpec | None) -> InputSpec | None:
    """The spec a user named: ``--input-spec`` wins over ``--dataset``; None when neither is given.

    Example:
        >>> resolve_spec("mnist", None).describe()
        '1x28x28'
    """
    if isinstance(input_spec, InputSpec):
        return input_spec
    if input_spec:
        return InputSpec.parse(input_spec)
    return dataset_spec(dataset) if dataset else None


def _probe_classes(fn, shape) -> int:
    with torch.no_grad():
        out = fn(torch.zeros(*shape))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError("the teacher program must return one N x classes tensor of logits")
    return out.shape[1]


def _spec_from_card_or_shape(card: dict | None, spec: InputSpec | None, shape, n_classes_fn, path) -> InputSpec:
    if spec is not None:
        base = spec
    elif card and "program_input_spec" in card:
        return InputSpec.from_dict(card["program_input_spec"])
    elif shape is not None:
        c, h, w = shape
        if h != w:
            raise UserError(f"{str(path)!r} takes {h}x{w} images; datafree handles square images only")
        base = InputSpec(c, h, (0.0,) * c, (1.0,) * c)
    else:
        raise UserError(f"the input spec of {str(path)!r} is unknown: pass --input-spec CxHxW[:mean:std] (e.g. 1x28x28)")
    if not base.class_names:
        n = n_classes_fn((2, base.channels, base.size, base.size))
        names = (card or {}).get("class_names") or [str(i) for i in range(n)]
        base = InputSpec(base.channels, base.size, base.mean, base.std, list(names))
    return base


def _load_exported(path: Path, spec: InputSpec | None) -> Teacher:
    extra = {"datafree_card.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any failure to read a user's archive is their file's fault
        raise UserError(f"{str(path)!r} is not a readable torch.export program ({type(e).__name__}: {str(e)[:120]})") from None
    card = json.loads(extra["datafree_card.json"]) if extra["datafree_card.json"] else None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shape, fixed_batch = None, None
    if len(placeholders) == 1 and "val" in placeholders[0].meta:
        val_shape = placeholders[0].meta["val"].shape
        if len(val_shape) == 4:
            shape = tuple(int(s) for s in val_shape[1:])
            fixed_batch = int(val_shape[0]) if isinstance(val_shape[0], int) else None
    module = program.module()
    recorder = TapRecorder()
    bn_names = _insert_graph_taps(module, recorder)
    module._datafree_recorder = recorder

    def probe(shape_):
        n = fixed_batch or shape_[0]
        return _probe_classes(module, (n, *shape_[1:]))

    spec = _spec_from_card_or_shape(card, spec, shape, probe, path)
    reason = "" if bn_names else "this program has no batch-norm nodes; BN-statistics priors are switched off"
    arch = (card or {}).get("arch", "")
    return Teacher(module, spec, "pt2", arch, card, bn_names=bn_names, no_bn_reason=reason, batch_size=fixed_batch)


BN_OPS = ("batch_norm", "_native_batch_norm_legit")


LINEAR_OPS = ("aten.linear", "aten.addmm")


def _insert_graph_taps(gm: torch.fx.GraphModule, recorder: TapRecorder) -> list[str]:
    """Put a recording module in front of every batch-norm node and the last linear node, and one
    after the last node whose value is spatial (4-D, at least 2 x 2)."""
    graph, names = gm.graph, []
    bn_nodes = [n for n in graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in BN_OPS)]
    for i, node in enumerate(bn_nodes):
        name = _source_name(node, i)
        names.append(name)
        gm.add_submodule(f"_datafree_bn_tap_{i}", GraphTap(recorder, name, "bn"))
        with graph.inserting_before(node):
            tapped = graph.call_module(f"_datafree_bn_tap_{i}", (node.args[0], node.args[3], node.args[4]))
        node.update_arg(0, tapped)
    linears = [n for n in graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in LINEAR_OPS)]
    if linears:
        last = linears[-1]
        index = 1 if "addmm" in str(last.target) else 0
        gm.add_submodule("_datafree_feature_tap", GraphTap(recorder, "features", "features"))
        with graph.inserting_before(last):
            tapped = graph.call_module("_datafree_feature_tap", (last.args[index],))
        last.update_arg(index, tapped)
    spatial = [n for n in graph.nodes if n.op == "call_function" and _is_spatial(n.meta.get("val"))]
    if spatial:
        gm.add_submodule("_datafree_spatial_tap", GraphTap(recorder, "spatial", "spatial"))
        with graph.inserting_after(spatial[-1]):
            graph.call_module("_datafree_spatial_tap", (spatial[-1],))
    graph.lint()
    gm.recompile()
    return names


def _is_spatial(value) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4 and all(isinstance(s, int) and s >= 2 for s in shape[2:])


def _source_name(node, i: int) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return f"batch_norm_{i}"


def _load_torchscript(path: Path, spec: InputSpec | None) -> Teacher:
    extra = {"datafree_card.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{str(path)!r} is not a readable TorchScript file ({type(e).__name__})") from None
    card = json.loads(extra["datafree_card.json"]) if extra["datafree_card.json"] else None
    spec = _spec_from_card_or_shape(card, spec, None, lambda s: _probe_classes(module, s), path)
    reason = "TorchScript hides the layers from hooks: BN-statistics priors are unavailable; send safetensors + card or a .pt2"
    return Teacher(module, spec, "torchscript", (card or {}).get("arch", ""), card, no_bn_reason=reason)

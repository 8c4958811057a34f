"""Load a handed-over teacher, freeze it, and tap its BatchNorm layers.

A model owner can hand over a teacher in three forms, none of which needs their training code:

1. ``NAME.safetensors`` + ``NAME.json`` card (or an arch name from the zoo): full access;
2. a ``torch.export`` program (``.pt2``): the graph's batch-norm nodes are tapped, so BN-based
   synthesis works; the input of the last linear layer serves as the penultimate features, the last
   node with a spatial (4-D, at least 2 x 2) value as the map attention transfer reads;
3. TorchScript: logits only (hooks cannot be attached); BN-based methods refuse it.

Pickle files (``torch.save`` checkpoints) are refused: they are never unpickled.

The teacher is frozen here and nowhere else (eval mode, no gradients to its parameters).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from datafree.data import InputSpec, dataset_spec
from datafree.errors import UserError
from datafree.io import load_tensors, save_tensors, sha256_file, write_json
from datafree.knowledge import SpatialTap
from datafree.models import Classifier, count_parameters, create_model

CARD_FORMAT = "datafree-model/1"


@dataclass
class BNTap:
    """One BatchNorm layer seen in the last forward: batch mean/var of its input and its running stats."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    member: int = 0  # which teacher of an ensemble (each member's BN prior counts once)


class _TapRecorder:
    """Collects per-channel mean/var of BN inputs during one forward pass."""

    def __init__(self):
        self.taps: list[BNTap] = []
        self.features: torch.Tensor | None = None
        self.spatial: torch.Tensor | None = None

    def reset(self):
        self.taps, self.features, self.spatial = [], None, None

    def record(self, name, x, running_mean, running_var):
        dims = [0] + list(range(2, x.dim()))
        self.taps.append(BNTap(name, x.mean(dims), x.var(dims, unbiased=False), running_mean.detach(), running_var.detach()))


class _GraphTap(nn.Module):
    """Inserted into a ``torch.export`` graph before a batch-norm node; records and passes through."""

    def __init__(self, recorder: _TapRecorder, name: str, kind: str):
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


class Teacher(nn.Module):
    """A frozen classifier with its input spec, BN taps and (when reachable) penultimate features.

    ``teacher(x)`` takes images in the teacher's input space (see :class:`InputSpec`) and returns
    logits; ``teacher.bn_taps()`` gives the BN layers' statistics of the last call.
    """

    def __init__(self, module: nn.Module, spec: InputSpec, fmt: str, arch: str = "", card: dict | None = None,
                 bn_names: list[str] | None = None, no_bn_reason: str = "", batch_size: int | None = None):
        super().__init__()
        self.module, self.spec, self.format, self.arch, self.card = module, spec, fmt, arch, card or {}
        self.recorder = getattr(module, "_datafree_recorder", None) or _TapRecorder()
        self.bn_names = bn_names or []
        self.no_bn_reason = no_bn_reason
        self.fixed_batch = batch_size
        self._spatial = None  # a zoo model's SpatialTap (a .pt2 program records its map in the recorder)
        if isinstance(module, Classifier):
            self._hook_zoo_model(module)
            self._spatial = SpatialTap(module)
        self.train(False)
        for p in self.module.parameters():
            p.requires_grad_(False)

    # --- the one place where the teacher is frozen -------------------------------------------
    def train(self, mode: bool = True):
        """Always eval. (An exported program fixed its mode when it was exported and refuses eval().)"""
        self.training = False
        try:
            self.module.eval()
        except NotImplementedError:
            pass
        return self

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.size, self.spec.size)

    @property
    def has_bn(self) -> bool:
        return bool(self.bn_names)

    @property
    def has_features(self) -> bool:
        return self.format != "torchscript"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits and penultimate features (None for TorchScript) of one batch; refreshes the BN taps."""
        self._check_input(x)
        self.recorder.reset()
        if isinstance(self.module, Classifier):
            self._spatial.value = None
            feats = self.module.forward_features(x)
            return feats, self.module.head(feats)
        if self.fixed_batch and x.shape[0] != self.fixed_batch:
            return self._forward_in_chunks(x)
        logits = self.module(x)
        return self.recorder.features, logits

    def bn_taps(self) -> list[BNTap]:
        """The BN statistics recorded by the last forward (empty when the teacher has no BN)."""
        return list(self.recorder.taps)

    def spatial_map(self) -> torch.Tensor | None:
        """The last spatial activation of the last forward (None for TorchScript, or a net without one)."""
        return self._spatial.value if self._spatial is not None else self.recorder.spatial

    def class_similarity(self) -> torch.Tensor | None:
        """K x K cosine similarity of the final layer's class weight vectors, rescaled to [0, 1] per
        row (as ZSKD, Nayak et al. 2019); None when no ``classes x features`` weight can be found.

        The final layer is the last 2-D weight whose first dimension is the number of classes: a
        zoo model's ``head``, the last linear node of a ``.pt2`` program, a TorchScript file's last
        such parameter.
        """
        k = self.num_classes
        weights = [v for v in self.module.state_dict().values() if v.dim() == 2 and v.shape[0] == k and v.is_floating_point()]
        if not weights:
            return None
        w = torch.nn.functional.normalize(weights[-1].detach().float(), dim=1)
        sim = w @ w.T
        low, high = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
        return (sim - low) / (high - low).clamp(min=1e-8)

    def require_bn(self, method: str) -> None:
        """Raise a :class:`UserError` when ``method`` needs BN statistics this teacher cannot give."""
        if self.format == "torchscript":
            raise UserError(f"{method} needs the teacher's BatchNorm statistics, which a TorchScript file hides; "
                            "send the teacher as safetensors + card or as a torch.export .pt2 program instead")

    def describe(self) -> dict:
        params = sum(p.numel() for p in self.module.parameters())
        return {"format": self.format, "arch": self.arch or "(unknown)", "parameters": params,
                "input_spec": self.spec.to_dict(), "num_classes": self.num_classes,
                "bn_layers": self.bn_names, "bn_note": self.no_bn_reason,
                "dataset": self.card.get("dataset"), "test_accuracy": self.card.get("test_accuracy"),
                "sha256": self.card.get("sha256")}

    # --- internals ----------------------------------------------------------------------------
    def _hook_zoo_model(self, model: Classifier) -> None:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.bn_names.append(name)
                m.register_forward_pre_hook(self._make_hook(name))
        if not self.bn_names:
            self.no_bn_reason = "this teacher has no BatchNorm layers; BN-statistics priors are switched off"

    def _make_hook(self, name):
        def hook(module, args):
            self.recorder.record(name, args[0], module.running_mean, module.running_var)
        return hook

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"the teacher takes N x {'x'.join(map(str, self.input_shape))} images, got {tuple(x.shape)}")

    def _forward_in_chunks(self, x):
        """For programs exported with a fixed batch size: run in chunks and pool the BN statistics."""
        b, n = self.fixed_batch, x.shape[0]
        pad = (-n) % b
        xp = torch.cat([x, x[:pad]]) if pad else x
        outs, feats, maps, per_chunk = [], [], [], []
        for chunk in xp.split(b):
            self.recorder.reset()
            outs.append(self.module(chunk))
            feats.append(self.recorder.features)
            maps.append(self.recorder.spatial)
            per_chunk.append(self.recorder.taps)
        pooled = []
        for layer in zip(*per_chunk):
            mean = torch.stack([t.mean for t in layer]).mean(0)
            second = torch.stack([t.var + t.mean ** 2 for t in layer]).mean(0)
            pooled.append(BNTap(layer[0].name, mean, second - mean ** 2, layer[0].running_mean, layer[0].running_var))
        self.recorder.taps = pooled
        self.recorder.spatial = torch.cat(maps)[:n] if maps and maps[0] is not None else None
        logits = torch.cat(outs)[:n]
        return (torch.cat(feats)[:n] if feats and feats[0] is not None else None), logits


# --- writing and reading model files -------------------------------------------------------------


def save_model(model: Classifier, path, arch: str, spec: InputSpec, arch_kwargs: dict | None = None, **card_fields) -> dict:
    """Write ``path`` (.safetensors) and its card (.json beside it); return the card.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> save_model(create_model("lenet5"), path, "lenet5", dataset_spec("mnist"), dataset="mnist")["arch"]
        'lenet5'
    """
    path = Path(path)
    save_tensors(path, model.state_dict(), metadata={"format": CARD_FORMAT, "arch": arch})
    card = {"format": CARD_FORMAT, "arch": arch, "arch_kwargs": arch_kwargs or {}, "num_classes": spec.num_classes,
            "input_spec": spec.to_dict(), "parameters": count_parameters(model), **card_fields,
            "sha256": sha256_file(path)}
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


def load_teacher(path, arch: str | None = None, dataset: str | None = None, input_spec: str | InputSpec | None = None) -> Teacher:
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
    recorder = _TapRecorder()
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


def _insert_graph_taps(gm: torch.fx.GraphModule, recorder: _TapRecorder) -> list[str]:
    """Put a recording module in front of every batch-norm node and the last linear node, and one
    after the last node whose value is spatial (4-D, at least 2 x 2)."""
    graph, names = gm.graph, []
    bn_nodes = [n for n in graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in BN_OPS)]
    for i, node in enumerate(bn_nodes):
        name = _source_name(node, i)
        names.append(name)
        gm.add_submodule(f"_datafree_bn_tap_{i}", _GraphTap(recorder, name, "bn"))
        with graph.inserting_before(node):
            tapped = graph.call_module(f"_datafree_bn_tap_{i}", (node.args[0], node.args[3], node.args[4]))
        node.update_arg(0, tapped)
    linears = [n for n in graph.nodes if n.op == "call_function" and any(op in str(n.target) for op in LINEAR_OPS)]
    if linears:
        last = linears[-1]
        index = 1 if "addmm" in str(last.target) else 0
        gm.add_submodule("_datafree_feature_tap", _GraphTap(recorder, "features", "features"))
        with graph.inserting_before(last):
            tapped = graph.call_module("_datafree_feature_tap", (last.args[index],))
        last.update_arg(index, tapped)
    spatial = [n for n in graph.nodes if n.op == "call_function" and _is_spatial(n.meta.get("val"))]
    if spatial:
        gm.add_submodule("_datafree_spatial_tap", _GraphTap(recorder, "spatial", "spatial"))
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

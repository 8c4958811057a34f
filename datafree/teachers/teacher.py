"""The :class:`Teacher`: a handed-over classifier, frozen, with its input spec and its taps.

The teacher is frozen here and nowhere else (eval mode, no gradients to its parameters). It
exposes logits, penultimate features (where reachable), the BatchNorm taps of its last forward,
the spatial map attention transfer reads, its input spec and its number of classes. Files are read by
:func:`~datafree.teachers.formats.load_teacher`.

Example:
    >>> from datafree.teachers.formats import load_teacher
    >>> teacher = load_teacher("assets/teachers/mnist_lenet5.safetensors")
    >>> logits = teacher(torch.zeros(4, *teacher.input_shape))
    >>> [tap.name for tap in teacher.bn_taps()][:2]
    ['body.1', 'body.5']
"""
from __future__ import annotations

import torch
from torch import nn

from datafree.base.errors import UserError
from datafree.data.datasets import InputSpec
from datafree.models.zoo import Classifier
from datafree.teachers.taps import BNTap, SpatialTap, TapRecorder


class Teacher(nn.Module):
    """A frozen classifier with its input spec, BN taps and (when reachable) penultimate features.

    ``teacher(x)`` takes images in the teacher's input space (see :class:`InputSpec`) and returns
    logits; ``teacher.bn_taps()`` gives the BN layers' statistics of the last call.
    """

    def __init__(self, module: nn.Module, spec: InputSpec, fmt: str, arch: str = "", card: dict | None = None,
                 bn_names: list[str] | None = None, no_bn_reason: str = "", batch_size: int | None = None):
        super().__init__()
        self.module, self.spec, self.format, self.arch, self.card = module, spec, fmt, arch, card or {}
        self.recorder = getattr(module, "_datafree_recorder", None) or TapRecorder()
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



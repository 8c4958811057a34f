"""Several teachers of one task as one: the student learns their combined soft targets.

Owners often hold several models of a task (different architectures, checkpoints, or owners who
cannot pool their data). :class:`TeacherEnsemble` behaves as one :class:`~datafree.teachers.teacher.Teacher`
for synthesis and distillation:

- its logits combine the members' by a rule (``ENSEMBLE_RULES``): ``logits``, the default, is the
  members' mean logits (their softmax is the normalised geometric mean of the members' softmaxes, a
  product of experts); ``probs`` is ``log(mean_i softmax(z_i))``, the arithmetic mean of their soft
  targets (Hinton et al., 2015). Measured in BENCHMARKS.md: on synthetic images, where the members
  disagree far more than on real ones, ``logits`` gave the better student;
- its BN taps are those of every member that has BN statistics, each marked with its member: the
  BN prior is the mean of the members' priors;
- its penultimate features (and spatial map) are the first member's that has them (TorchScript
  members have none);
- members may normalise differently: images are given in the first member's input space and
  converted into each member's own.

Members must share the number of classes, the class names and the image shape; otherwise one
sentence says what differs.

Example:
    >>> teacher = load_teachers(["assets/teachers/mnist_lenet5.safetensors",
    ...                          "assets/teachers/mnist_lenet5_nobn.safetensors"])
    >>> teacher.arch, teacher.num_classes
    ('ensemble(lenet5 + lenet5_nobn)', 10)
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from datafree.base.errors import UserError
from datafree.teachers.formats import load_teacher
from datafree.teachers.taps import BNTap
from datafree.teachers.teacher import Teacher

ENSEMBLE_RULES = ("logits", "probs")  # how an ensemble's members combine


class TeacherEnsemble(nn.Module):
    """Frozen teachers that answer as one (see the module docstring)."""

    def __init__(self, members: list[Teacher], paths: list[str] | None = None, rule: str = "logits"):
        super().__init__()
        check_compatible(members, paths or [str(i) for i in range(len(members))])
        if rule not in ENSEMBLE_RULES:
            raise UserError(f"unknown ensemble rule {rule!r}; choose one of {', '.join(ENSEMBLE_RULES)}")
        self.rule = rule
        self.members = nn.ModuleList(members)
        self.spec = members[0].spec
        self.paths = list(paths or [])
        self.format = "ensemble"
        self.arch = "ensemble(" + " + ".join(m.arch or m.format for m in members) + ")"
        self.card = {"members": [m.describe() for m in members]}
        self.bn_names = [f"{i}.{name}" for i, m in enumerate(members) for name in m.bn_names]
        without = [i for i, m in enumerate(members) if not m.has_bn]
        self.no_bn_reason = "" if self.bn_names else "none of the teachers has readable BN statistics"
        self.bn_note = (f"teachers {', '.join(map(str, without))} have no readable BN statistics; the BN prior uses the others"
                        if without and self.bn_names else "")
        self._taps: list[BNTap] = []
        self._spatial: torch.Tensor | None = None

    def train(self, mode: bool = True):
        """Always eval, as each member."""
        self.training = False
        for m in self.members:
            m.train(False)
        return self

    num_classes = property(lambda self: self.spec.num_classes)
    input_shape = property(lambda self: (self.spec.channels, self.spec.size, self.spec.size))
    has_bn = property(lambda self: bool(self.bn_names))
    has_features = property(lambda self: any(m.has_features for m in self.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The members' answers combined by the ensemble's rule, and the first member's features that exist."""
        answers, features, taps, self._spatial = [], None, [], None
        for i, m in enumerate(self.members):
            mine = x if m.spec == self.spec else m.spec.normalize(self.spec.denormalize(x))
            feats, logits = m.forward_with_features(mine)
            answers.append(logits if self.rule == "logits" else torch.log_softmax(logits, dim=1))
            if features is None and feats is not None:
                features, self._spatial = feats, m.spatial_map()
            taps += [dataclasses.replace(t, member=i) for t in m.bn_taps()]
        self._taps = taps
        if self.rule == "logits":
            return features, torch.stack(answers).mean(0)
        return features, torch.logsumexp(torch.stack(answers), dim=0) - math.log(len(self.members))

    def bn_taps(self) -> list[BNTap]:
        """The BN statistics every member recorded in the last forward."""
        return list(self._taps)

    def spatial_map(self) -> torch.Tensor | None:
        """The spatial map of the member whose features the last forward gave."""
        return self._spatial

    def class_similarity(self) -> torch.Tensor | None:
        """The mean of the members' class similarities (those that have one)."""
        found = [s for s in (m.class_similarity() for m in self.members) if s is not None]
        return torch.stack(found).mean(0) if found else None

    def describe(self) -> dict:
        return {"format": self.format, "arch": self.arch, "parameters": sum(p.numel() for p in self.parameters()),
                "input_spec": self.spec.to_dict(), "num_classes": self.num_classes, "bn_layers": self.bn_names,
                "bn_note": self.no_bn_reason or self.bn_note, "rule": self.rule, "dataset": None, "test_accuracy": None, "sha256": None,
                "members": self.card["members"]}


def check_compatible(members: list[Teacher], paths: list[str]) -> None:
    """Refuse teachers that do not answer the same question, in one sentence naming the difference.

    Example:
        >>> check_compatible([], [])
        Traceback (most recent call last):
        datafree.base.errors.UserError: an ensemble needs at least one teacher
    """
    if not members:
        raise UserError("an ensemble needs at least one teacher")
    first, where = members[0], paths[0]
    for m, path in zip(members[1:], paths[1:]):
        if m.num_classes != first.num_classes:
            raise UserError(f"the teachers disagree on classes: {where!r} has {first.num_classes}, {path!r} has {m.num_classes}")
        if m.spec.class_names != first.spec.class_names:
            raise UserError(f"the teachers name their classes differently: {where!r} {first.spec.class_names[:3]}..., "
                            f"{path!r} {m.spec.class_names[:3]}...")
        if m.input_shape != first.input_shape:
            raise UserError(f"the teachers take different images: {where!r} {first.spec.describe()}, {path!r} {m.spec.describe()}")


def load_teachers(paths: str | list[str], input_spec: str | None = None, rule: str = "logits"):
    """One teacher file as a :class:`Teacher`, several as a :class:`TeacherEnsemble` combining them by ``rule``.

    ``input_spec`` (when given) applies to every file, overriding what the file says.
    """
    if isinstance(paths, str):
        return load_teacher(paths, input_spec=input_spec)
    if len(paths) == 1:
        return load_teacher(paths[0], input_spec=input_spec)
    return TeacherEnsemble([load_teacher(p, input_spec=input_spec) for p in paths], [str(p) for p in paths], rule)


def teacher_list(teacher: str | list[str]) -> list[str]:
    """The teacher file(s) of a config as a list.

    Example:
        >>> teacher_list("a.pt2"), teacher_list(["a.pt2", "b.ts"])
        (['a.pt2'], ['a.pt2', 'b.ts'])
    """
    return [teacher] if isinstance(teacher, str) else list(teacher)

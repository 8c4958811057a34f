"""Choosing between distillation methods without real data: cross-agreement with the teacher.

Each run keeps a held-out set of its own synthetic samples (``holdout.safetensors``) that its
student never trained on. Agreement on a run's *own* held-out set cannot compare methods: a
method that makes easy, uniform samples scores high on them and low on real images. So each
candidate's student is scored on the held-out samples of the *other* candidates (samples from
generators it never saw), class-balanced by the teacher's labels, and the candidate whose student
agrees with the teacher most often there is chosen. No real image is read.

Example:
    >>> scores = cross_agreement({"dfq": student_a, "fast": student_b},
    ...                          {"dfq": (images_a, logits_a), "fast": (images_b, logits_b)})   # doctest: +SKIP
    >>> max(scores, key=scores.get)                                                          # doctest: +SKIP
    'dfq'
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from datafree.models.inference import predict


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample weights that give every class present the same total weight.

    Example:
        >>> [round(w, 3) for w in balanced_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()]   # mean 1, class totals equal
        [0.667, 0.667, 0.667, 2.0]
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = int((counts > 0).sum())
    per_class = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return per_class[labels]


def agreement_on(student: nn.Module, images: torch.Tensor, t_logits: torch.Tensor) -> float | None:
    """Class-balanced percent of samples on which the student's argmax is the teacher's (None for no samples)."""
    if not len(images):
        return None
    labels = t_logits.argmax(1)
    hits = (predict(student, images).argmax(1) == labels).float()
    w = balanced_weights(labels, t_logits.shape[1])
    return float((hits * w).sum() / w.sum() * 100)


def cross_agreement(students: dict[str, nn.Module], holdouts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """For each candidate: the mean, over the *other* candidates, of its class-balanced agreement
    with the teacher on their held-out synthetic samples.

    With a single candidate there is nothing else to score on: its own held-out set is used. A
    candidate with no samples to score on gets None.
    """
    scores = {}
    for name, student in students.items():
        others = [h for other, h in holdouts.items() if other != name and len(h[0])] or [holdouts[name]]
        values = [v for v in (agreement_on(student, *h) for h in others) if v is not None]
        scores[name] = round(sum(values) / len(values), 3) if values else None
    return scores


def load_run_candidate(run: str | Path) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The kept student and the held-out synthetic samples of a finished ``datafree distill`` run."""
    from datafree.base.io import load_tensors
    from datafree.teachers.formats import load_model

    run = Path(run)
    student, _ = load_model(run / "student.safetensors")
    held = load_tensors(run / "holdout.safetensors")
    return student.eval(), (held["images"], held["teacher_logits"])


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 45])
        1.0
    """
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return round(cov / (sx * sy), 4) if sx and sy else None

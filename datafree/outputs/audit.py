"""Privacy audit of a synthetic set: did any real sample leak into it?

For every synthetic image, the exact nearest real neighbours (faiss, L2) in pixel space and, when a
teacher is given, in the teacher's penultimate feature space:

- ``nn1``: distance to the nearest real image; ``ratio``: nn1 / nn2 (near 0 for a copy of one image);
- near-copies: synthetic images whose ``nn1`` is below a threshold calibrated on real-to-real
  distances (the ``quantile`` of each sampled real image's distance to its nearest *other* real
  image), so "as close to a real image as real images are to each other, at the 1% tail";
- diversity, with or without real data: within-set nearest-neighbour distances, duplicates inside
  the set, class coverage and the balance of the class histogram;
- traceability, for a set whose images started from real images (``init_source``) audited against
  that same source: how many images are still nearest to the very image they started from, and
  how far they moved from it.

Example:
    >>> report = audit_set(synthetic, real=load_dataset("mnist"), teacher=None)   # doctest: +SKIP
    >>> report["pixel"]["near_copies"], report["verdict"]                        # doctest: +SKIP
    (0, 'pass')
"""
from __future__ import annotations

import math

import numpy as np
import torch

from datafree.base.errors import UserError
from datafree.base.progress import Stages
from datafree.data.datasets import ImageSet
from datafree.models.inference import predict

SCHEMA = "datafree-audit/1"


def _pixels(images: ImageSet) -> np.ndarray:
    """Images as flat float32 rows of [0, 1] pixels (comparable across normalisations)."""
    return images.spec.denormalize(images.images).clamp(0, 1).reshape(len(images.images), -1).numpy().astype(np.float32)


def _in_teacher_space(teacher, images: ImageSet) -> torch.Tensor:
    return teacher.spec.normalize(images.spec.denormalize(images.images))


def _features(teacher, images: ImageSet) -> np.ndarray:
    """The teacher's penultimate features (images converted into the teacher's input space first)."""
    with torch.no_grad():
        rows = [teacher.forward_with_features(x)[0] for x in _in_teacher_space(teacher, images).split(512)]
    if rows[0] is None:
        raise UserError("the teacher exposes no penultimate features, so only the pixel audit can run")
    return torch.cat(rows).flatten(1).numpy().astype(np.float32)


def _index(rows: np.ndarray):
    import faiss

    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(np.ascontiguousarray(rows))
    return index


def _stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    return {"min": float(values.min()), "p01": float(np.quantile(values, 0.01)), "median": float(np.median(values)),
            "mean": float(values.mean()), "max": float(values.max())}


def search(index, base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours: faiss finds them, the distances are recomputed directly
    (faiss's ``|x|^2 + |y|^2 - 2xy`` leaves an error of ~1e-3 that would hide exact copies)."""
    _, ids = index.search(np.ascontiguousarray(queries), k)
    dist = np.linalg.norm(base[ids] - queries[:, None, :], axis=2)
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def nearest_other(rows: np.ndarray, positions: np.ndarray, index, base: np.ndarray) -> np.ndarray:
    """Distance from each row (at ``positions`` in ``base``) to its nearest neighbour other than itself."""
    dist, ids = search(index, base, rows, 2)
    return np.where(ids[:, 0] == positions, dist[:, 1], dist[:, 0])


def _leakage(syn: np.ndarray, real: np.ndarray, quantile: float, calibration: int, rng: np.random.Generator) -> dict:
    index = _index(real)
    d, i = search(index, real, syn, 2)
    nn1, nn2 = d[:, 0], d[:, 1]
    ratio = nn1 / np.maximum(nn2, 1e-12)
    sample = rng.choice(len(real), size=min(calibration, len(real)), replace=False)
    real_to_real = nearest_other(real[sample], sample, index, real)
    # the nearest *distinct* real image: exact duplicates inside the real set would make the threshold 0
    distinct = real_to_real[real_to_real > 0]
    threshold = float(np.quantile(distinct, quantile)) if len(distinct) else 0.0
    flagged = np.flatnonzero(nn1 < threshold)
    return {"threshold": threshold, "threshold_rule": f"{quantile:g} quantile of real-to-real nearest-neighbour distances "
            f"({len(sample)} real images)", "near_copies": int(len(flagged)),
            "near_copy_indices": flagged[:100].tolist(), "nearest_real_index": i[flagged[:100], 0].tolist(),
            "nn1": _stats(nn1), "ratio": _stats(ratio), "real_to_real": _stats(real_to_real), "nearest_all": i[:, 0]}


def _diversity(syn: np.ndarray, labels: torch.Tensor, num_classes: int) -> dict:
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    within = nearest_other(syn, np.arange(len(syn)), _index(syn), syn) if len(syn) > 1 else np.zeros(0)
    duplicates = int((within == 0).sum())
    return {"count": len(syn), "class_counts": counts.long().tolist(), "class_coverage": float((counts > 0).double().mean()),
            "class_balance": entropy / math.log(num_classes) if num_classes > 1 else 1.0,
            "within_set_nn": _stats(within), "exact_duplicates": duplicates}


def traceability(syn: np.ndarray, real: np.ndarray, init_source: np.ndarray, nearest: np.ndarray) -> dict:
    """For images that started from a real image (``init_source >= 0``, an index into ``real``): how many
    are still nearest to that image, and their distance to it beside the distance to the nearest real image.

    Example:
        >>> real = np.eye(3, dtype=np.float32)
        >>> traceability(real[[0, 2]] * 0.9, real, np.array([0, 1]), np.array([0, 2]))["nearest_is_own_source"]
        1
    """
    started = np.flatnonzero(init_source >= 0)
    if len(started) == 0:
        return {"images_from_source": 0}
    own = init_source[started]
    if own.max() >= len(real):
        raise UserError(f"the set's init_source points past the {len(real)} real images: audit it against the set it was condensed from")
    still = nearest[started] == own
    moved = np.linalg.norm(syn[started] - real[own], axis=1)
    return {"images_from_source": int(len(started)), "nearest_is_own_source": int(still.sum()),
            "fraction_nearest_is_own_source": float(still.mean()), "distance_to_own_source": _stats(moved),
            "rule": "an image is traceable when its nearest real image (pixel space) is the real image it was initialised from"}


def audit_set(synthetic: ImageSet, real: ImageSet | None = None, teacher=None, quantile: float = 0.01,
              calibration: int = 2000, seed: int = 0, init_source: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Audit ``synthetic`` against ``real`` (optional) in pixel space and, with ``teacher``, in its feature space.

    ``synthetic`` and ``real`` may use different normalisations (both are compared as [0, 1] pixels)
    but must have the same channels and size. The verdict is ``fail`` when any near-copy is found.
    ``init_source`` (per synthetic image, the index in ``real`` of the image it started from, or -1)
    adds the traceability figures; pass it only when ``real`` is the set the images started from.
    With ``progress``, a bar counts the audit's stages; the service's progress file follows them either way.

    Example:
        >>> audit_set(condensed, real=load_dataset("mnist"))["pixel"]["near_copies"]   # doctest: +SKIP
        0
    """
    stages = ["diversity"] + (["pixel space"] if real is not None else []) + (["feature space"] if real is not None and teacher else [])
    bar = Stages(stages, "audit", progress)
    rng = np.random.default_rng(seed)
    syn_px = _pixels(synthetic)
    report = {"schema": SCHEMA, "synthetic": {"name": synthetic.name, "count": len(synthetic.images)},
              "diversity": {"pixel": _diversity(syn_px, synthetic.labels, synthetic.spec.num_classes)}}
    if teacher is not None:
        report["diversity"]["teacher_class_counts"] = torch.bincount(
            predict(teacher, _in_teacher_space(teacher, synthetic)).argmax(1), minlength=synthetic.spec.num_classes).tolist()
    bar.next()
    if real is None:
        report.update(real=None, verdict="diversity only (no real data given)")
        bar.close()
        return report
    if (real.spec.channels, real.spec.size) != (synthetic.spec.channels, synthetic.spec.size):
        raise UserError(f"the synthetic images are {synthetic.spec.describe()} but the real ones {real.spec.describe()}")
    report["real"] = {"name": real.name, "count": len(real.images)}
    real_px = _pixels(real)
    report["pixel"] = _leakage(syn_px, real_px, quantile, calibration, rng)
    if init_source is not None:
        nearest = report["pixel"].pop("nearest_all")
        report["traceability"] = traceability(syn_px, real_px, init_source.numpy(), nearest)
    else:
        report["pixel"].pop("nearest_all")
    copies = report["pixel"]["near_copies"]
    bar.next()
    if teacher is not None:
        report["feature"] = _leakage(_features(teacher, synthetic), _features(teacher, real), quantile, calibration, rng)
        report["feature"].pop("nearest_all")
        copies = max(copies, report["feature"]["near_copies"])
        bar.next()
    report["verdict"] = "pass" if copies == 0 else "fail"
    bar.close()
    return report


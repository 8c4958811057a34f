"""Coreset baselines that select real images instead of optimising new ones: ``random``, ``herding`` and
``kcenter`` (faiss), and the k-means centres the matching methods can start from.

Example:
    >>> kmeans_centres(torch.rand(200, 1, 8, 8), 3, seed=0).shape
    torch.Size([3, 1, 8, 8])
"""
from __future__ import annotations

import numpy as np
import torch

from datafree.condense.settings import Condensed, CondenseSettings, class_index, matching_net_kwargs, register_condenser
from datafree.data.datasets import ImageSet
from datafree.models.zoo import create_model


def _select(source: ImageSet, s: CondenseSettings, pick) -> Condensed:
    chosen = []
    for c, idx in enumerate(class_index(source.labels, source.spec.num_classes)):
        chosen.append(idx[pick(source.images[idx], c)])
    order = torch.cat(chosen)
    return Condensed(source.images[order].clone(), source.labels[order].clone(), init_source=order)


@register_condenser("random")
def random_real(source: ImageSet, s: CondenseSettings, progress, **_) -> Condensed:
    rng = torch.Generator().manual_seed(s.seed)
    return _select(source, s, lambda x, c: torch.randperm(len(x), generator=rng)[: s.ipc])


def _embed(images: torch.Tensor, s: CondenseSettings) -> np.ndarray:
    """Features for selection: a randomly initialised ConvNet's penultimate layer (as in the DC paper)."""
    torch.manual_seed(s.seed)
    net = create_model("convnet", 10, images.shape[1], images.shape[-1], **matching_net_kwargs(s)).eval()
    with torch.no_grad():
        return torch.cat([net.forward_features(x) for x in images.split(1024)]).numpy().astype(np.float32)


def herding_indices(images: torch.Tensor, k: int, s: CondenseSettings) -> torch.Tensor:
    """Greedy herding (Welling 2009) of ``k`` of ``images`` (one class): each pick keeps the running
    mean of the picked features nearest the class mean (features: :func:`_embed`).

    Example:
        >>> herding_indices(torch.rand(50, 1, 28, 28), 3, CondenseSettings(net_width=8)).shape
        torch.Size([3])
    """
    feats = torch.from_numpy(_embed(images, s))
    mu, chosen, total = feats.mean(0), [], torch.zeros_like(feats[0])
    available = torch.ones(len(feats), dtype=torch.bool)
    for i in range(min(k, len(feats))):
        gap = ((mu * (i + 1) - total - feats) ** 2).sum(1)
        gap[~available] = float("inf")
        j = int(gap.argmin())
        chosen.append(j)
        available[j] = False
        total += feats[j]
    return torch.tensor(chosen)


@register_condenser("herding")
def herding(source: ImageSet, s: CondenseSettings, progress, **_) -> Condensed:
    """Greedy herding (Welling 2009): pick samples whose running mean tracks the class mean."""
    return _select(source, s, lambda x, c: herding_indices(x, s.ipc, s))


@register_condenser("kcenter")
def kcenter(source: ImageSet, s: CondenseSettings, progress, **_) -> Condensed:
    """Greedy k-center (Sener & Savarese 2018) with faiss for the distance updates."""
    import faiss

    def pick(x, c):
        feats = _embed(x, s)
        chosen = [int(((feats - feats.mean(0)) ** 2).sum(1).argmin())]
        index = faiss.IndexFlatL2(feats.shape[1])
        index.add(feats[chosen])
        nearest, _ = index.search(feats, 1)
        nearest = nearest[:, 0]
        for _ in range(s.ipc - 1):
            j = int(nearest.argmax())
            chosen.append(j)
            d = ((feats - feats[j]) ** 2).sum(1)
            nearest = np.minimum(nearest, d)
        return torch.tensor(chosen)

    return _select(source, s, pick)


def kmeans_centres(images: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means centres in pixel space (faiss), as initial synthetic images."""
    import faiss

    flat = images.reshape(len(images), -1).numpy().astype(np.float32)
    km = faiss.Kmeans(flat.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(flat)
    return torch.from_numpy(km.centroids).reshape(k, *images.shape[1:])

"""Condense a labelled source with a method by name. Condensers turn a labelled source (real data, or a transfer set) into a few images per class.

Registry by name:

- ``dc``: gradient matching (Zhao, Mopuri & Bilen 2021): per layer and output unit, ``1 - cos``
  between the gradients of a real batch and of the synthetic images of the same class (biases
  ignored); the network is re-initialised every outer iteration and trained on the synthetic set
  in between;
- ``dsa``: ``dc`` with differentiable siamese augmentation (:mod:`datafree.data.augment`);
- ``dm``: distribution matching (mean embeddings of randomly initialised networks, with DSA);
- ``gm_pool``: gradient matching with DSA over a *pool* of networks whose real side is cached: random
  networks and early snapshots of networks trained on the real data (as IDM, Zhao et al. 2023, keeps
  a queue of partly trained networks); for each network, class and augmentation draw the real
  gradient is computed once, so a matching step is a forward/backward of the synthetic images only;
  the oldest network is replaced every ``refresh_every`` steps;
- ``dm_pool``: ``dm`` over the same kind of pool, with each network's real mean embeddings cached;
- baselines ``random``, ``herding`` and ``kcenter`` (faiss), which select real images.

In data-free mode (a transfer set as the source) the matching methods can add *teacher terms* on
the augmented synthetic images (:func:`teacher_terms`): the teacher's cross-entropy to each image's
class and its BatchNorm-statistics prior (as DeepInversion, Yin et al. 2020), so that the matched
images stay what the teacher calls their class and look, to its BN layers, like its training data.

Example:
    >>> from datafree.data.datasets import load_dataset
    >>> source = load_dataset("mnist", train=True)                # $DATAFREE_DATA, or --data-dir
    >>> result = condense(source, "random", ipc=10, seed=0)
    >>> result.images.shape
    torch.Size([100, 1, 28, 28])
"""
from __future__ import annotations

import torch

from datafree.base.errors import UserError
from datafree.base.runtime import tune_allocator
from datafree.condense import coreset, matching, pool  # noqa: F401  (importing them registers their methods)
from datafree.condense.config import MATCHING_METHODS, with_method_defaults
from datafree.condense.run import Shards
from datafree.condense.settings import CONDENSERS, DM_LAYERS, Condensed, CondenseSettings
from datafree.data.datasets import ImageSet, InputSpec  # noqa: F401  (InputSpec: docstring example)


def condense(source: ImageSet, method: str, ipc: int, seed: int = 0, progress=None, checkpoint=None, resume: bool = False,
             shards: "Shards | None" = None, teacher=None, **kwargs) -> Condensed:
    """Condense ``source`` to ``ipc`` images per class with a registered method.

    ``progress(done, total, record)`` is called after each iteration. With ``checkpoint`` (a file
    path), the matching methods save their state there; ``resume=True`` continues from it.
    ``shards`` splits the classes of the matching methods across processes (:class:`Shards`).
    ``teacher`` (a :class:`~datafree.teachers.teacher.Teacher` taking the source's images) is needed by the
    teacher terms (``teacher_ce``, ``teacher_bn``). Keyword arguments are :class:`CondenseSettings` fields.
    The matching methods run on ``shards.device``; the result is on the CPU.

    Example:
        >>> spec = InputSpec(1, 28, (0.5,), (0.5,), [str(c) for c in range(10)])
        >>> tiny = ImageSet(torch.randn(40, 1, 28, 28), torch.arange(10).repeat(4), spec)
        >>> condense(tiny, "dm", ipc=1, iterations=2, net_width=8, real_per_class=4).images.shape
        torch.Size([10, 1, 28, 28])
    """
    run = CONDENSERS.get_or_fail(method)
    tune_allocator()
    unknown = sorted(set(kwargs) - set(CondenseSettings.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown condensation setting {unknown[0]!r}")
    settings = CondenseSettings(ipc=ipc, seed=seed, **with_method_defaults(method, kwargs))
    check_source(source, method, settings)
    if (settings.teacher_ce or settings.teacher_bn) and teacher is None:
        raise UserError("the teacher terms (teacher_ce, teacher_bn) need the teacher: condense a distill run's transfer set")
    shards = shards or Shards()
    if method in MATCHING_METHODS and shards.device.type != "cpu":  # the selection methods pick images on the CPU (faiss)
        source = ImageSet(source.images.to(shards.device), source.labels.to(shards.device), source.spec, name=source.name)
        teacher = teacher.to(shards.device) if teacher is not None else None
    result = run(source, settings, progress or (lambda *a, **k: None), checkpoint=checkpoint, resume=resume,
                 shards=shards, teacher=teacher)
    return result.cpu() if isinstance(result, Condensed) else result


def check_source(source: ImageSet, method: str, s: CondenseSettings) -> None:
    """Refuse, in one sentence, settings this source cannot take (checked before any file is written)."""
    if s.iterations is None and not s.time_budget:
        raise UserError("condensation needs a number of iterations or a time budget to end")
    if s.pool_size < 1 or s.aug_draws < 1 or s.refresh_every < 1:
        raise UserError(f"the network pool needs at least one network, draw and step between refreshes "
                        f"(pool_size {s.pool_size}, aug_draws {s.aug_draws}, refresh_every {s.refresh_every})")
    if s.dm_layers not in DM_LAYERS:
        raise UserError(f"unknown dm_layers {s.dm_layers!r}; use {' or '.join(DM_LAYERS)}")
    if s.dm_layers != "last" and method != "dm":
        raise UserError(f"dm_layers applies to method 'dm', not to {method!r}")
    if s.factor < 1 or source.spec.size % s.factor:
        raise UserError(f"factor {s.factor} does not divide the image size {source.spec.size}")
    if s.factor > 1 and method not in MATCHING_METHODS:
        raise UserError(f"factor applies to the matching methods ({', '.join(MATCHING_METHODS)}), not to {method!r}")
    if (s.teacher_ce or s.teacher_bn) and method not in MATCHING_METHODS:
        raise UserError(f"the teacher terms apply to the matching methods ({', '.join(MATCHING_METHODS)}), not to {method!r}")
    if s.teacher_ce < 0 or s.teacher_bn < 0:
        raise UserError(f"the teacher terms' weights must be 0 or more (teacher_ce {s.teacher_ce}, teacher_bn {s.teacher_bn})")
    if "dp" in s.extra:  # a DP run starts from noise: the class counts are private and need checking against nothing
        return
    counts = torch.bincount(source.labels, minlength=source.spec.num_classes)
    needed = s.ipc * s.factor ** 2
    if int(counts.min()) < needed:
        worst = int(counts.argmin())
        raise UserError(f"ipc {s.ipc}{f' x factor^2 = {needed}' if s.factor > 1 else ''} is more than class "
                        f"{source.spec.class_names[worst]!r} has images ({int(counts[worst])})")

"""Condensers: turn a labelled source (real data, or a transfer set) into a few images per class.

Registry by name:

- ``dc``: gradient matching (Zhao, Mopuri & Bilen 2021): per layer and output unit, ``1 - cos``
  between the gradients of a real batch and of the synthetic images of the same class (biases
  ignored); the network is re-initialised every outer iteration and trained on the synthetic set
  in between;
- ``dsa``: ``dc`` with differentiable siamese augmentation (:mod:`datafree.augment`);
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
    >>> from datafree.data import load_dataset
    >>> source = load_dataset("mnist", train=True)                # $DATAFREE_DATA, or --data-dir
    >>> result = condense(source, "random", ipc=10, seed=0)
    >>> result.images.shape
    torch.Size([100, 1, 28, 28])
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datafree.augment import SiameseAugment, families_for
from datafree.config import DEFAULT_CONDENSE_METHOD, MATCHING_METHODS
from datafree.data import ImageSet, InputSpec  # noqa: F401  (InputSpec: docstring example)
from datafree.errors import UserError
from datafree.io import atomic_path
from datafree.models import create_model
from datafree.registry import Registry
from datafree.runtime import tune_allocator

CONDENSERS = Registry("condensation method")
DEFAULT_METHOD = DEFAULT_CONDENSE_METHOD
register_condenser = CONDENSERS.register  # decorator for fn(source, settings, progress) -> Condensed


@dataclass
class CondenseSettings:
    """Settings of the matching condensers. The defaults are a CPU schedule: a width-32 matching
    ConvNet (chosen over 64 on a validation split of the training data at 4 minutes, BENCHMARKS.md), 128 real
    images per class per step (256 for ``gm_pool``, :data:`METHOD_DEFAULTS`) and 10 inner network updates; the published one is
    ``net_width=128, real_per_class=256, inner_loop=50``."""

    ipc: int = 10
    iterations: int | None = 1000        # None: no cap, the time budget ends the run
    outer_loop: int | None = None         # matching steps per fresh network; default 1 (ipc 1), 10 (ipc <= 10), 50
    inner_loop: int | None = None         # network updates between matching steps; default 1 (ipc 1), else 10
    real_per_class: int = 128
    lr_images: float = 0.1
    lr_net: float = 0.01
    net_width: int = 32
    net_depth: int = 3
    first_padding: int = 1                # matching ConvNet's first-layer padding: 1 chosen on the validation split over the
                                          # reference code's 3 for MNIST (models.reference_padding; BENCHMARKS.md)
    init: str = "real"                    # real | herding | noise | kmeans
    dm_layers: str = "last"               # dm: match the mean of the last embedding ("last", DM) or of every block ("all", as CAFE)
    factor: int = 1                       # multi-formation: each stored image holds factor x factor smaller images
    pool_size: int = 6                    # gm_pool, dm_pool: networks in the pool
    refresh_every: int = 100              # gm_pool, dm_pool: matching steps between replacing the oldest network
    aug_draws: int = 4                    # gm_pool, dm_pool: cached augmentation draws per network and class
    pool_train_steps: int = 200           # gm_pool, dm_pool: a pool network is trained on the real data for 0..this many steps
                                          # (100 and 200: +0.7 over 30 and 50 for gm_pool on an MNIST ipc 10 validation split only; BENCHMARKS.md)
    teacher_ce: float = 0.0               # data-free: weight of the teacher's cross-entropy on the synthetic images
    teacher_bn: float = 0.0               # data-free: weight of the teacher's BN-statistics prior on them
    time_budget: float | None = None      # seconds, counted across resumes
    checkpoint_every: float = 60.0        # seconds between checkpoints (when a checkpoint path is given)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def loops(self) -> tuple[int, int]:
        outer = 1 if self.ipc == 1 else 10 if self.ipc <= 10 else 50
        inner = 1 if self.ipc == 1 else 10
        return self.outer_loop or outer, self.inner_loop or inner


@dataclass
class Condensed:
    images: torch.Tensor                  # what a model trains on (decoded, with --factor)
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    stored: torch.Tensor | None = None    # with factor > 1: the stored images (the storage budget), ipc per class
    history: list[dict] = field(default_factory=list)
    init_source: torch.Tensor | None = None   # per image: the source index it started from (-1: not a source image)


# Settings a method runs with unless told otherwise, each chosen on validation splits (BENCHMARKS.md).
METHOD_DEFAULTS: dict[str, dict] = {
    # the published 256 real images per class over 128: +0.26 on both MNIST and Fashion-MNIST ipc 10
    # validation splits at 4 minutes (a rule set before the MNIST run), though it makes ~7% fewer steps
    "gm_pool": {"real_per_class": 256},
}


def with_method_defaults(method: str, settings: dict) -> dict:
    """``settings`` with ``method``'s own defaults (:data:`METHOD_DEFAULTS`) where they say nothing.

    Example:
        >>> with_method_defaults("gm_pool", {}), with_method_defaults("gm_pool", {"real_per_class": 64})
        ({'real_per_class': 256}, {'real_per_class': 64})
    """
    return METHOD_DEFAULTS.get(method, {}) | settings


def condense(source: ImageSet, method: str, ipc: int, seed: int = 0, progress=None, checkpoint=None, resume: bool = False,
             shards: "Shards | None" = None, teacher=None, **kwargs) -> Condensed:
    """Condense ``source`` to ``ipc`` images per class with a registered method.

    ``progress(done, total, record)`` is called after each iteration. With ``checkpoint`` (a file
    path), the matching methods save their state there; ``resume=True`` continues from it.
    ``shards`` splits the classes of the matching methods across processes (:class:`Shards`).
    ``teacher`` (a :class:`~datafree.teacher.Teacher` taking the source's images) is needed by the
    teacher terms (``teacher_ce``, ``teacher_bn``). Keyword arguments are :class:`CondenseSettings` fields.

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
    return run(source, settings, progress or (lambda *a, **k: None), checkpoint=checkpoint, resume=resume,
               shards=shards or Shards(), teacher=teacher)


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
    counts = torch.bincount(source.labels, minlength=source.spec.num_classes)
    needed = s.ipc * s.factor ** 2
    if int(counts.min()) < needed:
        worst = int(counts.argmin())
        raise UserError(f"ipc {s.ipc}{f' x factor^2 = {needed}' if s.factor > 1 else ''} is more than class "
                        f"{source.spec.class_names[worst]!r} has images ({int(counts[worst])})")


# --- gradient matching ----------------------------------------------------------------------------


def match_distance(grads_syn: list[torch.Tensor], grads_real: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers and output units of ``1 - cos(g_syn, g_real)``; 1-D tensors (biases, norms) ignored.

    Example:
        >>> g = [torch.randn(4, 3, 3, 3), torch.randn(4)]
        >>> round(match_distance(g, g).item(), 4)
        0.0
    """
    total = grads_syn[0].new_zeros(())
    for gs, gr in zip(grads_syn, grads_real):
        if gs.dim() == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def _class_index(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


class Shards:
    """Which classes this process matches, and the collectives that join the processes.

    The matching losses are sums over classes, and each class's term moves only that class's
    images, so the classes can be split across processes: each computes its share, the image
    gradients are summed across processes, and every process takes the same optimiser step on a
    full copy of the set. Every random draw of a class comes from :func:`class_generator`, so the
    result does not depend on the number of processes. Without ``fabric`` (one process) the
    collectives are no-ops.

    Example:
        >>> Shards().mine(10)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(self, fabric=None):
        self.fabric = fabric
        self.rank = fabric.global_rank if fabric is not None else 0
        self.world = fabric.world_size if fabric is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, num_classes: int) -> list[int]:
        return list(range(self.rank, num_classes, self.world))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes."""
        if self.world == 1:
            return tensor
        return self.fabric.all_reduce(tensor.detach().clone(), reduce_op="sum")

    def main_says(self, value):
        """The main process's ``value`` on every process (for decisions that read the clock)."""
        return value if self.world == 1 else self.fabric.broadcast(value, src=0)


def class_generator(seed: int, iteration: int, step: int, c: int) -> torch.Generator:
    """The random draws of class ``c`` at one matching step: the same in any process.

    Example:
        >>> a, b = class_generator(0, 3, 1, 7), class_generator(0, 3, 1, 7)
        >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
        True
    """
    key = hashlib.blake2b(f"{seed}:{iteration}:{step}:{c}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def decode(stored: torch.Tensor, factor: int) -> torch.Tensor:
    """Multi-formation (IDC, Kim et al. 2022): each stored image holds ``factor x factor`` tiles, each
    upsampled (bilinear) to the full size: N stored images give N * factor^2 training images.

    Example:
        >>> decode(torch.zeros(3, 1, 28, 28), 2).shape
        torch.Size([12, 1, 28, 28])
    """
    if factor == 1:
        return stored
    n, c, h, w = stored.shape
    tiles = stored.reshape(n, c, factor, h // factor, factor, w // factor).permute(0, 2, 4, 1, 3, 5)
    return F.interpolate(tiles.reshape(n * factor * factor, c, h // factor, w // factor), size=(h, w), mode="bilinear",
                         align_corners=False)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse layout of :func:`decode`: ``factor^2`` consecutive images, downsampled, tiled into one."""
    if factor == 1:
        return images
    m, c, h, w = images.shape
    small = F.interpolate(images, size=(h // factor, w // factor), mode="area")
    tiles = small.reshape(m // factor ** 2, factor, factor, c, h // factor, w // factor).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(m // factor ** 2, c, h, w)


def _init_images(source: ImageSet, s: CondenseSettings, rng: torch.Generator, by_class) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (stored) images, and for each decoded image the index of the source image it copies
    (-1 for noise and k-means centres). With ``factor`` f, f^2 source images are tiled into each stored one."""
    per_class = s.ipc * s.factor ** 2  # decoded images per class
    shape = (source.spec.num_classes * s.ipc, *source.images.shape[1:])
    none = torch.full((source.spec.num_classes * per_class,), -1, dtype=torch.long)
    if s.init == "noise":
        return torch.randn(shape, generator=rng), none
    if s.init == "kmeans":
        centres = torch.cat([_kmeans_centres(source.images[idx], per_class, s.seed) for idx in by_class])
        return encode(centres, s.factor), none
    if s.init == "herding":  # real images again, but the class's representative ones instead of random draws
        chosen = torch.cat([idx[herding_indices(source.images[idx], per_class, s)] for idx in by_class])
    elif s.init == "real":
        chosen = torch.cat([idx[torch.randperm(len(idx), generator=rng)[:per_class]] for idx in by_class])
    else:
        raise UserError(f"unknown initialisation {s.init!r}; use real, herding, noise or kmeans")
    return encode(source.images[chosen].clone(), s.factor), chosen


def matching_net_kwargs(s: CondenseSettings) -> dict:
    """The ConvNet the matching methods (and the selection features) use, as ``create_model`` kwargs.

    Example:
        >>> matching_net_kwargs(CondenseSettings())
        {'width': 32, 'depth': 3, 'norm': 'instance', 'first_padding': 1}
    """
    return {"width": s.net_width, "depth": s.net_depth, "norm": "instance", "first_padding": s.first_padding}


def _matching_net(source: ImageSet, s: CondenseSettings) -> nn.Module:
    spec = source.spec
    return create_model("convnet", spec.num_classes, spec.channels, spec.size, **matching_net_kwargs(s))


def gradient_matching_loss(net: nn.Module, real_images: torch.Tensor, by_class: list[torch.Tensor], syn: torch.Tensor,
                           ipc: int, real_per_class: int, rng, dsa: SiameseAugment | None = None,
                           classes: list[int] | None = None) -> torch.Tensor:
    """Sum over ``classes`` (default all) of the matching distance between a real batch's and the synthetic images' gradients.

    The real gradients are constants; the synthetic ones keep their graph, so the result can be
    back-propagated into ``syn``. With ``dsa``, one augmentation is drawn per class and applied to
    both. ``rng`` is a generator, or a function of the class giving one (:func:`class_generator`).
    """
    params = list(net.parameters())
    loss = syn.new_zeros(())
    for c in range(len(by_class)) if classes is None else classes:
        idx, g = by_class[c], rng(c) if callable(rng) else rng
        real = real_images[idx[torch.randint(len(idx), (real_per_class,), generator=g)]]
        mine = syn[c * ipc:(c + 1) * ipc]
        if dsa is not None:
            p = dsa.sample(g)
            real, mine = dsa.apply(real, p), dsa.apply(mine, p)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real), torch.full((len(real),), c)), params)]
        loss = loss + synthetic_distance(net, params, mine, c, g_real)
    return loss


def synthetic_distance(net: nn.Module, params: list, images: torch.Tensor, c: int, g_real: list[torch.Tensor]) -> torch.Tensor:
    """The matching distance between ``g_real`` and the gradient of class ``c``'s synthetic images,
    whose graph is kept so the distance can be back-propagated into the images."""
    g_syn = torch.autograd.grad(F.cross_entropy(net(images), torch.full((len(images),), c)), params, create_graph=True)
    return match_distance(g_syn, g_real)


def teacher_terms(teacher, images: torch.Tensor, classes: list[int], per_class: int, augment: SiameseAugment,
                  g: torch.Generator, s: CondenseSettings) -> torch.Tensor:
    """Data-free condensation's teacher terms on the synthetic images of ``classes`` (0 without a teacher).

    One augmentation draw (``augment``, from ``g``) for the batch, then ``s.teacher_ce`` x the
    teacher's cross-entropy to each image's class plus ``s.teacher_bn`` x its BN-statistics prior
    (DeepInversion, Yin et al. 2020; 0 for a teacher without BatchNorm). ``images`` holds
    ``per_class`` images per class, classes in order.

    Example:
        >>> teacher_terms(None, torch.zeros(10, 1, 28, 28), [0], 10, SiameseAugment(), torch.Generator(), CondenseSettings())
        tensor(0.)
    """
    if teacher is None or not (s.teacher_ce or s.teacher_bn):
        return images.new_zeros(())
    from datafree.priors import BNStatistics

    mine = torch.cat([images[c * per_class:(c + 1) * per_class] for c in classes])
    labels = torch.tensor(classes).repeat_interleave(per_class)
    logits = teacher(augment(mine, g))
    loss = s.teacher_ce * F.cross_entropy(logits, labels)
    if s.teacher_bn and teacher.bn_taps():
        loss = loss + s.teacher_bn * BNStatistics()(teacher.bn_taps())[0]
    return loss


class MatchingRun:
    """Bookkeeping shared by the matching condensers: iteration count, history, time budget,
    progress, and checkpoints taken at iteration boundaries so that a resumed run equals an
    uninterrupted one (the images, their optimiser and both random generators are saved).
    With several processes (``shards``), the main one reads the clock, reports and saves.

    Example:
        >>> run = MatchingRun(settings, progress, rng, syn, opt, checkpoint="out/checkpoints/condense.pt")  # doctest: +SKIP
        >>> while run.next_iteration():                                                      # doctest: +SKIP
        ...     run.end_iteration({"match_loss": 0.5})
    """

    def __init__(self, s: CondenseSettings, progress, rng: torch.Generator, syn: torch.Tensor, opt, checkpoint=None,
                 resume: bool = False, method: str = "", shards: Shards | None = None):
        self.s, self.progress, self.rng, self.syn, self.opt = s, progress, rng, syn, opt
        self.shards = shards or Shards()
        self.path = Path(checkpoint) if checkpoint else None
        self.key = {"method": method, **{k: v for k, v in asdict(s).items() if k not in ("time_budget", "iterations", "checkpoint_every")}}
        self.iteration, self.history, self.elapsed_before = 0, [], 0.0
        self.started = self.last_saved = time.monotonic()
        self.snapshot = None
        if resume:
            self._restore()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return bool(self.shards.main_says(bool(self.s.time_budget) and self.elapsed() > self.s.time_budget))

    def next_iteration(self) -> bool:
        capped = self.s.iterations is not None and self.iteration >= self.s.iterations
        return not capped and not self.out_of_time()

    def end_iteration(self, record: dict) -> None:
        self.iteration += 1
        self.history.append({"iteration": self.iteration, **record, "seconds": round(self.elapsed(), 2)})
        self.snapshot = self._state()
        last = not self.next_iteration()
        if self.path and self.shards.is_main and (time.monotonic() - self.last_saved > self.s.checkpoint_every or last):
            self.save()
        if self.shards.is_main:
            self.progress(self.iteration, self.s.iterations, self.history[-1])

    def save(self) -> None:
        """Write the state of the last finished iteration (called on Ctrl-C too)."""
        if self.path is None or self.snapshot is None or not self.shards.is_main:
            return
        with atomic_path(self.path) as tmp:
            torch.save(self.snapshot, tmp)
        self.last_saved = time.monotonic()

    @contextlib.contextmanager
    def saving_on_interrupt(self):
        """On Ctrl-C, keep the last finished iteration on disk before the interrupt goes on."""
        try:
            yield
        except KeyboardInterrupt:
            self.save()
            raise

    def step(self, loss: torch.Tensor) -> float:
        """Back-propagate this process's share of the loss, sum the image gradients over the
        processes, take the optimiser step; returns the loss summed over the processes."""
        self.opt.zero_grad()
        loss.backward()
        if self.shards.world > 1:
            grad = self.syn.grad if self.syn.grad is not None else torch.zeros_like(self.syn)
            self.syn.grad = self.shards.sum(grad)
        self.opt.step()
        return float(self.shards.sum(loss.detach()))

    def _state(self) -> dict:
        return {"key": json.dumps(self.key, sort_keys=True, default=str), "iteration": self.iteration,
                "history": json.dumps(self.history), "elapsed": self.elapsed(), "syn": self.syn.detach().clone(),
                "opt": copy.deepcopy(self.opt.state_dict()), "rng": self.rng.get_state(), "torch_rng": torch.get_rng_state()}

    def _restore(self) -> None:
        if self.path is None or not self.path.is_file():
            raise UserError(f"nothing to resume: no checkpoint at {str(self.path)!r}")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"the checkpoint {str(self.path)!r} is unreadable or not a condensation checkpoint") from None
        if state.get("key") != json.dumps(self.key, sort_keys=True, default=str):
            saved = json.loads(state.get("key") or "{}")
            changed = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
            raise UserError(f"cannot resume with different settings ({', '.join(changed)} changed); use the original ones")
        with torch.no_grad():
            self.syn.copy_(state["syn"])
        self.opt.load_state_dict(state["opt"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.history, self.elapsed_before = state["iteration"], json.loads(state["history"]), state["elapsed"]
        self.snapshot = state


def _gradient_matching(source: ImageSet, s: CondenseSettings, progress, dsa: SiameseAugment | None, shards: Shards,
                       teacher=None, **run_kwargs) -> Condensed:
    rng = torch.Generator().manual_seed(s.seed)  # draws every process makes alike (start, inner training)
    torch.manual_seed(s.seed)                     # the fresh networks' weights
    k = source.spec.num_classes
    by_class, mine = _class_index(source.labels, k), shards.mine(k)
    syn, init_source = _init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    per_class = s.ipc * s.factor ** 2
    syn_labels = torch.arange(k).repeat_interleave(per_class)
    opt_img = torch.optim.SGD([syn], lr=s.lr_images, momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt_img, shards=shards, **run_kwargs)
    teacher_augment = dsa or SiameseAugment(families_for(source.name))
    outer, inner = s.loops()
    with run.saving_on_interrupt():
        while run.next_iteration():
            net = _matching_net(source, s)
            opt_net = torch.optim.SGD(net.parameters(), lr=s.lr_net)
            losses = []
            for ol in range(outer):
                draws = lambda c: class_generator(s.seed, run.iteration, ol, c)  # noqa: E731
                decoded = decode(syn, s.factor)
                loss = gradient_matching_loss(net, source.images, by_class, decoded, per_class, s.real_per_class,
                                              draws, dsa, mine)
                loss = loss + teacher_terms(teacher, decoded, mine, per_class, teacher_augment, draws(-1), s)
                losses.append(run.step(loss))
                if ol == outer - 1 or run.out_of_time():
                    break
                images = decode(syn.detach(), s.factor)
                for _ in range(inner):  # train the network on the synthetic set
                    batch = torch.randperm(len(images), generator=rng)[:256]
                    x = images[batch]
                    if dsa is not None:
                        x = dsa(x, rng)
                    net_loss = F.cross_entropy(net(x), syn_labels[batch])
                    opt_net.zero_grad()
                    net_loss.backward()
                    opt_net.step()
            run.end_iteration({"match_loss": sum(losses) / len(losses) / k})
    return Condensed(decode(syn.detach(), s.factor), syn_labels, history=run.history, init_source=init_source,
                     stored=syn.detach() if s.factor > 1 else None)


@register_condenser("dc")
def dc(source: ImageSet, s: CondenseSettings, progress, **run_kwargs) -> Condensed:
    return _gradient_matching(source, s, progress, None, method="dc", **run_kwargs)


@register_condenser("dsa")
def dsa(source: ImageSet, s: CondenseSettings, progress, **run_kwargs) -> Condensed:
    return _gradient_matching(source, s, progress, SiameseAugment(families_for(source.name)), method="dsa", **run_kwargs)


class NetworkPool:
    """The networks of ``gm_pool`` and ``dm_pool`` and their cached real side.

    Network number ``i`` is a function of ``(seed, i)`` alone: a fresh matching ConvNet, trained on
    the real data for a number of SGD steps drawn in ``0..pool_train_steps`` (0: a random network).
    For each of its classes (this process's share) and each of ``aug_draws`` augmentation draws,
    the pool keeps the draw's parameters and the real batch's gradient (``kind="gradients"``) or
    its mean embedding (``kind="means"``, the real side of distribution matching). Slot ``j`` holds network
    ``j`` at first; the k-th refresh puts network ``pool_size + k - 1`` into slot ``(k - 1) % pool_size``,
    so the pool at any step can be rebuilt from the step number (a resume does exactly that).

    Example:
        >>> pool = NetworkPool(source, settings, SiameseAugment(), classes=[0, 1])   # doctest: +SKIP
        >>> net, cache = pool.at(step=0)                                              # doctest: +SKIP
    """

    def __init__(self, source: ImageSet, s: CondenseSettings, augment: SiameseAugment, classes: list[int],
                 kind: str = "gradients"):
        self.source, self.s, self.augment, self.classes, self.kind = source, s, augment, classes, kind
        self.by_class = _class_index(source.labels, source.spec.num_classes)
        self.slots: dict[int, tuple[int, nn.Module, dict]] = {}  # slot -> (network number, network, cache)

    def number_in_slot(self, slot: int, step: int) -> int:
        """Which network slot ``slot`` holds at matching step ``step``."""
        refreshes = step // self.s.refresh_every
        if slot >= refreshes:
            return slot
        last = slot + ((refreshes - 1 - slot) // self.s.pool_size) * self.s.pool_size  # the last refresh of this slot
        return self.s.pool_size + last

    def at(self, step: int) -> tuple[nn.Module, dict]:
        """The network matched at ``step`` (slots in turn) and its cache: class -> [(draw params, real gradient)]."""
        slot = step % self.s.pool_size
        number = self.number_in_slot(slot, step)
        if slot not in self.slots or self.slots[slot][0] != number:
            net = self._network(number)
            self.slots[slot] = (number, net, self._cache(net, number))
        return self.slots[slot][1], self.slots[slot][2]

    def _network(self, number: int) -> nn.Module:
        g = class_generator(self.s.seed, -1, number, -1)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
            net = _matching_net(self.source, self.s)
        steps = int(torch.randint(0, self.s.pool_train_steps + 1, (1,), generator=g))
        opt = torch.optim.SGD(net.parameters(), lr=self.s.lr_net, momentum=0.9)
        for _ in range(steps):  # an early snapshot of a network trained on the real data
            batch = torch.randint(len(self.source.labels), (256,), generator=g)
            loss = F.cross_entropy(net(self.augment(self.source.images[batch], g)), self.source.labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    def _cache(self, net: nn.Module, number: int) -> dict:
        params, cache = list(net.parameters()), {}
        for c in self.classes:
            cache[c] = []
            for d in range(self.s.aug_draws):
                g = class_generator(self.s.seed, -2 - number, d, c)
                idx = self.by_class[c][torch.randint(len(self.by_class[c]), (self.s.real_per_class,), generator=g)]
                p = self.augment.sample(g)
                real = self.augment.apply(self.source.images[idx], p)
                if self.kind == "means":
                    with torch.no_grad():
                        cache[c].append((p, net.forward_features(real).mean(0)))
                    continue
                grads = torch.autograd.grad(F.cross_entropy(net(real), torch.full((len(real),), c)), params)
                cache[c].append((p, [t.detach() for t in grads]))
        if self.kind == "means":
            net.requires_grad_(False)  # only the synthetic images take gradients
        return cache


def _pool_matching(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher, method: str, kind: str,
                   lr: float, class_distance, **run_kwargs) -> Condensed:
    """The loop of ``gm_pool`` and ``dm_pool``: one matching step per iteration, every class's synthetic
    images under one of the cached augmentation draws against the cached real side (``kind``) of the
    pool network whose turn it is; ``class_distance(net, images, c, real_side)`` scores one class."""
    rng = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    k = source.spec.num_classes
    by_class, mine = _class_index(source.labels, k), shards.mine(k)
    syn, init_source = _init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    per_class = s.ipc * s.factor ** 2
    augment = SiameseAugment(families_for(source.name))
    pool = NetworkPool(source, s, augment, mine, kind=kind)
    opt = torch.optim.SGD([syn], lr=lr, momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt, method=method, shards=shards, **run_kwargs)
    with run.saving_on_interrupt():
        while run.next_iteration():
            net, cache = pool.at(run.iteration)
            decoded, loss = decode(syn, s.factor), syn.new_zeros(())
            for c in mine:
                g = class_generator(s.seed, run.iteration, 0, c)
                p, real_side = cache[c][int(torch.randint(s.aug_draws, (1,), generator=g))]
                loss = loss + class_distance(net, augment.apply(decoded[c * per_class:(c + 1) * per_class], p), c, real_side)
            loss = loss + teacher_terms(teacher, decoded, mine, per_class, augment, class_generator(s.seed, run.iteration, 1, -1), s)
            run.end_iteration({"match_loss": run.step(loss) / k})
    return Condensed(decode(syn.detach(), s.factor), torch.arange(k).repeat_interleave(per_class),
                     history=run.history, init_source=init_source, stored=syn.detach() if s.factor > 1 else None)


@register_condenser("gm_pool")
def gm_pool(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Gradient matching with DSA over a network pool whose real gradients are cached (:class:`NetworkPool`).

    One iteration is one matching step: every class's synthetic images, under one of the cached
    augmentation draws, against the cached real gradient of the pool network whose turn it is.
    """
    return _pool_matching(source, s, progress, shards, teacher, "gm_pool", "gradients", s.lr_images,
                          lambda net, x, c, g_real: synthetic_distance(net, list(net.parameters()), x, c, g_real), **run_kwargs)


DM_LAYERS = ("last", "all")


def mean_embedding_distance(net: nn.Module, real: torch.Tensor, mine: torch.Tensor, layers: str = "last") -> torch.Tensor:
    """Squared distance between the mean embeddings of ``real`` and ``mine`` under ``net``.

    ``layers="last"`` compares the final features (DM, Zhao & Bilen 2023); ``"all"`` sums the
    distances of every block's output (layer-wise feature alignment, as CAFE, Wang et al. 2022),
    each scaled to the last block's width so that the large early maps do not drown it.

    Example:
        >>> net = create_model("convnet", 10, 1, 28, width=8)
        >>> float(mean_embedding_distance(net, torch.zeros(4, 1, 28, 28), torch.zeros(2, 1, 28, 28), "all"))
        0.0
    """
    if layers == "last":
        return ((net.forward_features(real).mean(0) - net.forward_features(mine).mean(0)) ** 2).sum()
    real_blocks, my_blocks = net.block_features(real), net.block_features(mine)
    width = real_blocks[-1].shape[1]
    return sum(((r.mean(0) - m.mean(0)) ** 2).sum() * (width / r.shape[1]) for r, m in zip(real_blocks, my_blocks))


@register_condenser("dm")
def dm(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Distribution matching (Zhao & Bilen 2023): match mean embeddings under random networks, with DSA."""
    rng = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    k = source.spec.num_classes
    by_class = _class_index(source.labels, k)
    syn, init_source = _init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    augment = SiameseAugment(families_for(source.name))
    opt = torch.optim.SGD([syn], lr=s.extra.get("lr_dm", 1.0), momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt, method="dm", shards=shards, **run_kwargs)
    with run.saving_on_interrupt():
        while run.next_iteration():
            net = _matching_net(source, s)
            for p in net.parameters():
                p.requires_grad_(False)
            loss, decoded, per_class = syn.new_zeros(()), decode(syn, s.factor), s.ipc * s.factor ** 2
            for c in shards.mine(k):
                g = class_generator(s.seed, run.iteration, 0, c)
                idx = by_class[c][torch.randint(len(by_class[c]), (s.real_per_class,), generator=g)]
                p = augment.sample(g)
                loss = loss + mean_embedding_distance(net, augment.apply(source.images[idx], p),
                                                      augment.apply(decoded[c * per_class:(c + 1) * per_class], p), s.dm_layers)
            loss = loss + teacher_terms(teacher, decoded, shards.mine(k), per_class, augment,
                                        class_generator(s.seed, run.iteration, 1, -1), s)
            run.end_iteration({"match_loss": run.step(loss) / k})
    return Condensed(decode(syn.detach(), s.factor), torch.arange(k).repeat_interleave(s.ipc * s.factor ** 2),
                     history=run.history, init_source=init_source, stored=syn.detach() if s.factor > 1 else None)


@register_condenser("dm_pool")
def dm_pool(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Distribution matching over a network pool whose real mean embeddings are cached (:class:`NetworkPool`).

    As ``dm``, but the networks are the pool's (random ones and early snapshots of networks trained
    on the real data, IDM's "enriched model sampling", Zhao et al. 2023), and the real side of a
    step is looked up: one matching step is a forward and backward pass of the synthetic images.
    """
    return _pool_matching(source, s, progress, shards, teacher, "dm_pool", "means", s.extra.get("lr_dm", 1.0),
                          lambda net, x, c, real_mean: ((real_mean - net.forward_features(x).mean(0)) ** 2).sum(), **run_kwargs)


# --- selection baselines ----------------------------------------------------------------------------


def _select(source: ImageSet, s: CondenseSettings, pick) -> Condensed:
    chosen = []
    for c, idx in enumerate(_class_index(source.labels, source.spec.num_classes)):
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


def _kmeans_centres(images: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means centres in pixel space (faiss), as initial synthetic images."""
    import faiss

    flat = images.reshape(len(images), -1).numpy().astype(np.float32)
    km = faiss.Kmeans(flat.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(flat)
    return torch.from_numpy(km.centroids).reshape(k, *images.shape[1:])

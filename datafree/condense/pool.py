"""Matching over a cached pool of networks: ``gm_pool`` (gradient matching) and ``dm_pool`` (distribution matching).

The pool holds random networks and early snapshots of networks trained on the real data (as IDM,
Zhao et al. 2023, keeps a queue of partly trained networks). For each network, class and
augmentation draw the real side (gradient, or mean embedding) is computed once, so a matching step is a
forward/backward of the synthetic images only; the oldest network is replaced every ``refresh_every`` steps.

Example:
    >>> result = condense(source, "gm_pool", ipc=10, iterations=100)   # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datafree.condense.matching import synthetic_distance, teacher_terms
from datafree.condense.run import MatchingRun, Shards, class_generator, decode, init_images
from datafree.condense.settings import Condensed, CondenseSettings, class_index, matching_net, register_condenser
from datafree.data.augment import SiameseAugment, families_for
from datafree.data.datasets import ImageSet
from datafree.base.precision import FP32, Precision
from datafree.condense.settings import matching_precision


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
                 kind: str = "gradients", precision: Precision = FP32):
        self.source, self.s, self.augment, self.classes, self.kind = source, s, augment, classes, kind
        self.precision = precision  # of the networks' passes (their gradients and means are fp32)
        self.by_class = class_index(source.labels, source.spec.num_classes)
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
            net = matching_net(self.source, self.s, self.precision)
        steps = int(torch.randint(0, self.s.pool_train_steps + 1, (1,), generator=g))
        opt = torch.optim.SGD(net.parameters(), lr=self.s.lr_net, momentum=0.9)
        for _ in range(steps):  # an early snapshot of a network trained on the real data
            batch = torch.randint(len(self.source.labels), (256,), generator=g)
            with self.precision.autocast(self.source.images.device.type):
                logits = net(self.augment(self.source.images[batch], g))
            loss = F.cross_entropy(logits.float(), self.source.labels[batch])
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
                with self.precision.autocast(real.device.type), torch.set_grad_enabled(self.kind != "means"):
                    out = net.forward_features(real) if self.kind == "means" else net(real)
                if self.kind == "means":
                    cache[c].append((p, out.float().mean(0)))
                    continue
                target = torch.full((len(real),), c, device=real.device)
                grads = torch.autograd.grad(F.cross_entropy(out.float(), target), params)
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
    by_class, mine = class_index(source.labels, k), shards.mine(k)
    syn, init_source = init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    per_class = s.ipc * s.factor ** 2
    augment = SiameseAugment(families_for(source.name))
    opt = torch.optim.SGD([syn], lr=lr, momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt, method=method, shards=shards, **run_kwargs)
    precision, ran = run.precision(lambda: matching_precision(source, s))
    pool = NetworkPool(source, s, augment, mine, kind=kind, precision=precision)
    with run.saving_on_interrupt():
        while run.next_iteration():
            net, cache = pool.at(run.iteration)
            decoded, loss = decode(syn, s.factor), syn.new_zeros(())
            for c in mine:
                g = class_generator(s.seed, run.iteration, 0, c)
                p, real_side = cache[c][int(torch.randint(s.aug_draws, (1,), generator=g))]
                with precision.autocast(syn.device.type):
                    loss = loss + class_distance(net, augment.apply(decoded[c * per_class:(c + 1) * per_class], p), c, real_side)
            loss = loss + teacher_terms(teacher, decoded, mine, per_class, augment, class_generator(s.seed, run.iteration, 1, -1), s)
            run.end_iteration({"match_loss": run.step(loss) / k})
    return Condensed(decode(syn.detach(), s.factor), torch.arange(k).repeat_interleave(per_class),
                     history=run.history, init_source=init_source, stored=syn.detach() if s.factor > 1 else None,
                     precision=ran)


@register_condenser("gm_pool")
def gm_pool(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Gradient matching with DSA over a network pool whose real gradients are cached (:class:`NetworkPool`).

    One iteration is one matching step: every class's synthetic images, under one of the cached
    augmentation draws, against the cached real gradient of the pool network whose turn it is.
    """
    return _pool_matching(source, s, progress, shards, teacher, "gm_pool", "gradients", s.lr_images,
                          lambda net, x, c, g_real: synthetic_distance(net, list(net.parameters()), x, c, g_real), **run_kwargs)


@register_condenser("dm_pool")
def dm_pool(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Distribution matching over a network pool whose real mean embeddings are cached (:class:`NetworkPool`).

    As ``dm``, but the networks are the pool's (random ones and early snapshots of networks trained
    on the real data, IDM's "enriched model sampling", Zhao et al. 2023), and the real side of a
    step is looked up: one matching step is a forward and backward pass of the synthetic images.
    """
    return _pool_matching(source, s, progress, shards, teacher, "dm_pool", "means", s.extra.get("lr_dm", 1.0),
                          lambda net, x, c, real_mean: ((real_mean - net.forward_features(x).float().mean(0)) ** 2).sum(), **run_kwargs)

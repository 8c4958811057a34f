"""The matching condensers: gradient matching (``dc``, ``dsa``) and distribution matching (``dm``).

- ``dc``: gradient matching (Zhao, Mopuri & Bilen 2021): per layer and output unit, ``1 - cos``
  between the gradients of a real batch and of the synthetic images of the same class (biases
  ignored); the network is re-initialised every outer iteration and trained on the synthetic set
  in between;
- ``dsa``: ``dc`` with differentiable siamese augmentation (:mod:`datafree.data.augment`);
- ``dm``: distribution matching (mean embeddings of randomly initialised networks, with DSA).

In data-free mode each can add the teacher's terms on the augmented synthetic images (:func:`teacher_terms`).

Example:
    >>> g = [torch.randn(4, 3, 3, 3), torch.randn(4)]
    >>> round(match_distance(g, g).item(), 4)
    0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datafree.condense.run import MatchingRun, Shards, class_generator, decode, init_images
from datafree.condense.settings import Condensed, CondenseSettings, class_index, matching_net, register_condenser
from datafree.data.augment import SiameseAugment, families_for
from datafree.data.datasets import ImageSet
from datafree.base.precision import FP32, Precision
from datafree.condense.settings import matching_precision


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


def gradient_matching_loss(net: nn.Module, real_images: torch.Tensor, by_class: list[torch.Tensor], syn: torch.Tensor,
                           ipc: int, real_per_class: int, rng, dsa: SiameseAugment | None = None,
                           classes: list[int] | None = None, precision: Precision = FP32) -> torch.Tensor:
    """Sum over ``classes`` (default all) of the matching distance between a real batch's and the synthetic images' gradients.

    The real gradients are constants; the synthetic ones keep their graph, so the result can be
    back-propagated into ``syn``. With ``dsa``, one augmentation is drawn per class and applied to
    both. ``rng`` is a generator, or a function of the class giving one (:func:`class_generator`).
    The network's passes run in ``precision``; the gradients and distances are fp32.
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
        with precision.autocast(real.device.type):
            logits = net(real)
        target = torch.full((len(real),), c, device=real.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(logits.float(), target), params)]
        loss = loss + synthetic_distance(net, params, mine, c, g_real, precision)
    return loss


def synthetic_distance(net: nn.Module, params: list, images: torch.Tensor, c: int, g_real: list[torch.Tensor],
                       precision: Precision = FP32) -> torch.Tensor:
    """The matching distance between ``g_real`` and the gradient of class ``c``'s synthetic images,
    whose graph is kept so the distance can be back-propagated into the images."""
    with precision.autocast(images.device.type):
        logits = net(images)
    target = torch.full((len(images),), c, device=images.device)
    g_syn = torch.autograd.grad(F.cross_entropy(logits.float(), target), params, create_graph=True)
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
    from datafree.teachers.taps import BNStatistics

    mine = torch.cat([images[c * per_class:(c + 1) * per_class] for c in classes])
    labels = torch.tensor(classes, device=images.device).repeat_interleave(per_class)
    logits = teacher(augment(mine, g))
    loss = s.teacher_ce * F.cross_entropy(logits, labels)
    if s.teacher_bn and teacher.bn_taps():
        loss = loss + s.teacher_bn * BNStatistics()(teacher.bn_taps())[0]
    return loss


def _gradient_matching(source: ImageSet, s: CondenseSettings, progress, dsa: SiameseAugment | None, shards: Shards,
                       teacher=None, **run_kwargs) -> Condensed:
    rng = torch.Generator().manual_seed(s.seed)  # draws every process makes alike (start, inner training)
    torch.manual_seed(s.seed)                     # the fresh networks' weights
    k = source.spec.num_classes
    by_class, mine = class_index(source.labels, k), shards.mine(k)
    syn, init_source = init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    per_class = s.ipc * s.factor ** 2
    syn_labels = torch.arange(k, device=syn.device).repeat_interleave(per_class)
    opt_img = torch.optim.SGD([syn], lr=s.lr_images, momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt_img, shards=shards, **run_kwargs)
    precision, ran = run.precision(lambda: matching_precision(source, s))
    teacher_augment = dsa or SiameseAugment(families_for(source.name))
    outer, inner = s.loops()
    with run.saving_on_interrupt():
        while run.next_iteration():
            net = matching_net(source, s, precision)
            opt_net = torch.optim.SGD(net.parameters(), lr=s.lr_net)
            losses = []
            for ol in range(outer):
                draws = lambda c: class_generator(s.seed, run.iteration, ol, c)  # noqa: E731
                decoded = decode(syn, s.factor)
                loss = gradient_matching_loss(net, source.images, by_class, decoded, per_class, s.real_per_class,
                                              draws, dsa, mine, precision)
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
                    with precision.autocast(x.device.type):
                        logits = net(x)
                    net_loss = F.cross_entropy(logits.float(), syn_labels[batch])
                    opt_net.zero_grad()
                    net_loss.backward()
                    opt_net.step()
            run.end_iteration({"match_loss": sum(losses) / len(losses) / k})
    return Condensed(decode(syn.detach(), s.factor), syn_labels, history=run.history, init_source=init_source,
                     stored=syn.detach() if s.factor > 1 else None, precision=ran)


@register_condenser("dc")
def dc(source: ImageSet, s: CondenseSettings, progress, **run_kwargs) -> Condensed:
    return _gradient_matching(source, s, progress, None, method="dc", **run_kwargs)


@register_condenser("dsa")
def dsa(source: ImageSet, s: CondenseSettings, progress, **run_kwargs) -> Condensed:
    return _gradient_matching(source, s, progress, SiameseAugment(families_for(source.name)), method="dsa", **run_kwargs)


def mean_embedding_distance(net: nn.Module, real: torch.Tensor, mine: torch.Tensor, layers: str = "last") -> torch.Tensor:
    """Squared distance between the mean embeddings of ``real`` and ``mine`` under ``net``.

    ``layers="last"`` compares the final features (DM, Zhao & Bilen 2023); ``"all"`` sums the
    distances of every block's output (layer-wise feature alignment, as CAFE, Wang et al. 2022),
    each scaled to the last block's width so that the large early maps do not drown it.

    Example:
        >>> from datafree.models.zoo import create_model
        >>> net = create_model("convnet", 10, 1, 28, width=8)
        >>> float(mean_embedding_distance(net, torch.zeros(4, 1, 28, 28), torch.zeros(2, 1, 28, 28), "all"))
        0.0
    """
    if layers == "last":  # means and distances in fp32, also when the network ran in 16 bits
        return ((net.forward_features(real).float().mean(0) - net.forward_features(mine).float().mean(0)) ** 2).sum()
    real_blocks = [b.float() for b in net.block_features(real)]
    my_blocks = [b.float() for b in net.block_features(mine)]
    width = real_blocks[-1].shape[1]
    return sum(((r.mean(0) - m.mean(0)) ** 2).sum() * (width / r.shape[1]) for r, m in zip(real_blocks, my_blocks))


@register_condenser("dm")
def dm(source: ImageSet, s: CondenseSettings, progress, shards: Shards, teacher=None, **run_kwargs) -> Condensed:
    """Distribution matching (Zhao & Bilen 2023): match mean embeddings under random networks, with DSA;
    under differential privacy (``s.extra['dp']``) through the Gaussian mechanism (:mod:`datafree.condense.private`)."""
    if "dp" in s.extra:
        from datafree.condense.private import private_dm

        return private_dm(source, s, progress, shards, **run_kwargs)
    rng = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    k = source.spec.num_classes
    by_class = class_index(source.labels, k)
    syn, init_source = init_images(source, s, rng, by_class)
    syn.requires_grad_(True)
    augment = SiameseAugment(families_for(source.name))
    opt = torch.optim.SGD([syn], lr=s.extra.get("lr_dm", 1.0), momentum=0.5)
    run = MatchingRun(s, progress, rng, syn, opt, method="dm", shards=shards, **run_kwargs)
    precision, ran = run.precision(lambda: matching_precision(source, s))
    with run.saving_on_interrupt():
        while run.next_iteration():
            net = matching_net(source, s, precision)
            for p in net.parameters():
                p.requires_grad_(False)
            loss, decoded, per_class = syn.new_zeros(()), decode(syn, s.factor), s.ipc * s.factor ** 2
            for c in shards.mine(k):
                g = class_generator(s.seed, run.iteration, 0, c)
                idx = by_class[c][torch.randint(len(by_class[c]), (s.real_per_class,), generator=g)]
                p = augment.sample(g)
                with precision.autocast(syn.device.type):
                    loss = loss + mean_embedding_distance(net, augment.apply(source.images[idx], p),
                                                          augment.apply(decoded[c * per_class:(c + 1) * per_class], p), s.dm_layers)
            loss = loss + teacher_terms(teacher, decoded, shards.mine(k), per_class, augment,
                                        class_generator(s.seed, run.iteration, 1, -1), s)
            run.end_iteration({"match_loss": run.step(loss) / k})
    return Condensed(decode(syn.detach(), s.factor), torch.arange(k).repeat_interleave(s.ipc * s.factor ** 2),
                     history=run.history, init_source=init_source, stored=syn.detach() if s.factor > 1 else None,
                     precision=ran)

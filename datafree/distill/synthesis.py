"""The synthesizer (a generator trained against the frozen teacher) and the sample pool.

One ``Synthesizer.step`` draws a batch from the generator, scores it with the weighted priors of
the preset, updates the generator, and returns the batch (in the teacher's input space) with the
teacher's logits for the pool. Generator training (DAFL, DFAD, ZSKT, DFQ, fast) and pixel
optimisation (DeepInversion) run through this same step; they differ only in weights.

Example:
    >>> synth = Synthesizer(teacher, create_generator("conditional", 1, 28, 10), cfg)   # doctest: +SKIP
    >>> images, t_logits, stats = synth.step(student)                                     # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from datafree.base.precision import FP32
from datafree.distill.config import DistillConfig
from datafree.distill.priors import PRIORS, SynthesisBatch, dirichlet_targets, disagreement
from datafree.teachers.taps import BNStatistics
from datafree.teachers.teacher import Teacher


class Synthesizer:
    """Generator + priors. ``weights`` name the active terms; BN terms switch off without BN layers.

    A plain object: the teacher and the generator are registered (and checkpointed) once, by the
    LightningModule that owns them.
    """

    def __init__(self, teacher: Teacher, generator: nn.Module, cfg: DistillConfig, notify=print):
        self.teacher, self.generator, self.cfg = teacher, generator, cfg
        self.weights = {k: float(v) for k, v in cfg.weights.items() if v}
        if "bn" in self.weights and not teacher.has_bn:  # no BN layers, or hidden (TorchScript): fall back and say so
            notify(f"note: {teacher.no_bn_reason}; the {cfg.preset!r} preset goes on with "
                   f"{', '.join(k for k in self.weights if k != 'bn') or 'no other priors'}")
            self.weights.pop("bn")
        if "activation" in self.weights and not teacher.has_features:
            notify("note: the teacher's features are unreachable (TorchScript); the activation prior is off")
            self.weights.pop("activation")
        if "input" in self.weights and not teacher.spec.has_statistics:
            notify(f"note: the teacher's input spec ({teacher.spec.describe()}) carries no data statistics (mean 0, std 1); "
                   "the input-statistics prior is off (it reads the data's mean and std from a card, or from "
                   "--input-spec CxHxW:mean:std for a teacher that takes normalised images)")
            self.weights.pop("input")
        self.bn_prior = BNStatistics(cfg.bn_first_layer, cfg.bn_momentum)
        # how the teacher's and the student's passes run (base.precision); the module sets them once measured
        self.teacher_precision, self.student_precision = FP32, FP32
        self.is_pixels = hasattr(generator, "reset")
        self.similarity, self.soft_targets = None, None
        if "soft" in self.weights:
            self.similarity = teacher.class_similarity()
            if self.similarity is None:
                notify("note: the teacher's final-layer weights are unreachable; soft targets use uniform class similarity")
                self.similarity = torch.ones(teacher.num_classes, teacher.num_classes)

    def on_reset(self) -> None:
        """A pixel batch was redrawn: draw its soft targets (ZSKD) when the preset uses them."""
        if self.similarity is not None:
            self.soft_targets = dirichlet_targets(self.generator.targets, self.similarity)

    def sample(self, n: int, rng: torch.Generator, classes: torch.Tensor | None = None):
        """Draw ``n`` images (input space) and the classes asked for (None if unconditional)."""
        if self.is_pixels:
            pixels, targets = self.generator(), self.generator.targets
        else:
            device = next(self.generator.parameters()).device
            z = torch.randn(n, self.generator.latent_dim, generator=rng).to(device)  # drawn on the CPU: the seed fixes it anywhere
            targets = None
            if getattr(self.generator, "conditional", False):
                targets = classes if classes is not None else balanced_classes(n, self.teacher.num_classes, rng)
                targets = targets.to(device)
            pixels = self.generator(z, targets)
        return self.teacher.spec.normalize(pixels), targets

    def losses(self, images, targets, student: nn.Module | None) -> tuple[torch.Tensor, dict]:
        """The weighted sum of the active priors on one batch, and each term's value."""
        if self.cfg.jitter:  # DeepInversion's jitter: the image must work at any small shift
            j = self.cfg.jitter
            dy, dx = (int(v) for v in torch.randint(-j, j + 1, (2,)))
            images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        if self.similarity is not None and self.soft_targets is None:  # a batch drawn before any reset
            self.on_reset()
        features, t_logits = self.teacher_pass(images)
        batch = SynthesisBatch(images, t_logits, features, self.teacher.bn_taps(), None, targets,
                               self.soft_targets, self.cfg.soft_temperature)
        terms, stats = {}, {}
        if "bn" in self.weights:
            terms["bn"], stats["bn_per_layer"] = self.bn_prior(batch.taps)
        if "adv" in self.weights and student is not None:
            with self.student_precision.autocast(images.device.type):
                s_logits = student(self.student_precision.images(images)).float()
            terms["adv"] = -disagreement(s_logits, t_logits, self.cfg.adv_kind, self.cfg.adv_temperature)
        for name in self.weights:
            if name in PRIORS:
                terms[name] = PRIORS[name](batch)
        total = sum(self.weights[k] * v for k, v in terms.items())
        # detached tensors: they become Python floats only on the rounds that are logged (no wait for the device)
        stats.update({f"loss_{k}": v.detach() for k, v in terms.items()})
        stats["loss_synthesis"] = total.detach() if torch.is_tensor(total) else float(total)
        return total, stats | {"_t_logits": t_logits}

    def teacher_pass(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher's penultimate features and logits on ``images`` at the chosen precision (both
        returned in fp32, so every loss is computed in fp32); its BN taps record in fp32 too."""
        p = self.teacher_precision
        with p.autocast(images.device.type):
            features, logits = self.teacher.forward_with_features(p.images(images))
        return (features.float() if features is not None else None), logits.float()


def balanced_classes(n: int, num_classes: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` labels, each class equally often (up to one), in random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=rng)]


class SamplePool:
    """A bounded store of synthetic images with their teacher logits, sampled with replacement.

    ``keep="newest"`` is a ring buffer (the last ``capacity`` samples added). ``keep="uniform"`` is a
    reservoir (Vitter's algorithm R, batched): at any time it holds a uniform sample of *every*
    sample ever added, so a long run's early and late generator stages are both in it; ``add``
    then needs ``rng``.

    Example:
        >>> pool = SamplePool(capacity=1000)
        >>> pool.add(torch.randn(256, 1, 28, 28), torch.randn(256, 10))
        >>> x, t = pool.sample(64, torch.Generator().manual_seed(0))
        >>> spread = SamplePool(capacity=100, keep="uniform")
        >>> for i in range(50):
        ...     spread.add(torch.full((10, 1, 2, 2), float(i)), torch.zeros(10, 3), torch.Generator().manual_seed(i))
        >>> len(spread), spread.seen, bool(spread.contents()[0].min() < 10)   # early batches are still there
        (100, 500, True)
    """

    KEEPS = ("newest", "uniform")

    def __init__(self, capacity: int, keep: str = "newest"):
        if keep not in self.KEEPS:
            raise ValueError(f"unknown pool keep rule {keep!r}; known: {', '.join(self.KEEPS)}")
        self.capacity, self.keep = capacity, keep
        self.images: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.size, self.cursor, self.seen = 0, 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, images: torch.Tensor, logits: torch.Tensor, rng: torch.Generator | None = None) -> None:
        images, logits = images.detach(), logits.detach()
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.logits = logits.new_empty((self.capacity, logits.shape[1]))
        if self.keep == "uniform":
            self._add_uniform(images, logits, rng)
            return
        images, logits = images[-self.capacity:], logits[-self.capacity:]
        n = len(images)
        idx = (torch.arange(n) + self.cursor) % self.capacity
        self.images[idx], self.logits[idx] = images, logits
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.seen += n

    def _add_uniform(self, images: torch.Tensor, logits: torch.Tensor, rng: torch.Generator | None) -> None:
        """Algorithm R: fill the free slots, then the i-th sample ever seen replaces a random slot
        with probability capacity / i (a later sample of the batch wins a shared slot, as in order)."""
        if rng is None:
            raise ValueError("a pool that keeps a uniform sample needs rng in add()")
        free = min(self.capacity - self.size, len(images))
        if free:
            self.images[self.size:self.size + free], self.logits[self.size:self.size + free] = images[:free], logits[:free]
            self.size += free
        rest = torch.arange(free, len(images))
        if len(rest):
            seen_before = (self.seen + rest + 1).double()  # samples seen once this one arrives
            slot = (torch.rand(len(rest), generator=rng, dtype=torch.float64) * seen_before).long()
            kept = slot < self.capacity
            into, new = slot[kept].to(self.images.device), rest[kept].to(self.images.device)
            self.images[into], self.logits[into] = images[new], logits[new]
        self.seen += len(images)

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=rng)
        return self.images[idx], self.logits[idx]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is None:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return self.images[: self.size], self.logits[: self.size]

    def state_dict(self) -> dict:
        images, logits = self.contents()
        return {"images": images.clone(), "logits": logits.clone(), "cursor": self.cursor, "capacity": self.capacity,
                "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.images = self.logits = None
        self.size, self.cursor, self.seen = 0, 0, 0
        keep, self.keep = self.keep, "newest"  # restoring is a plain copy, whatever the rule
        if len(state["images"]):
            self.add(state["images"], state["logits"])
        self.keep = keep
        self.cursor = int(state["cursor"])
        self.seen = int(state.get("seen", self.size))

"""Differentially private condensation: distribution matching through the sampled Gaussian mechanism.

Under ``--dp-epsilon`` the ``dm`` condenser reads the private images only through one mechanism,
repeated for a number of steps fixed before the first one (as NDPDC, Zheng & Li 2023, does for DM):

1. each private image joins the step's batch independently with probability ``q`` (Poisson sampling);
2. under a fresh random ConvNet (its weights from the public seed), each sampled image's embedding is
   bounded: clipped to L2 norm ``C`` (``dp_clip``), or by default scaled to norm 1;
3. per class, the bounded embeddings are summed beside a count (each image adds ``C`` to its class's
   count), and Gaussian noise of standard deviation ``sigma * sqrt(2) * C`` (the L2 sensitivity of
   adding or removing one image) is added to every sum and count;
4. the synthetic images of each class, bounded the same way, move towards the noisy mean (sum / count).

Everything after step 3 is post-processing. ``sigma`` is calibrated to the target (epsilon, delta)
for ``q`` and the step count with opacus's PRV accountant (Gopi et al. 2021), tight enough that
Google's ``dp-accounting`` PLD accountant recomputes the same epsilon within 1% (a test checks). A
time budget becomes a step count by timing steps on noise images before any private image is
read (the median of a few, after a warm-up); if the machine slows down later, the run still stops at
the budget, having spent less epsilon than planned (recorded). The sampling and the noise draw from the operating
system's entropy, not from the seed: a seed anyone can read would let them subtract the noise. So a
DP run is not repeatable from its seed (a resumed run continues from the generators its checkpoint
saved).

What is guaranteed: the condensed images and labels are (epsilon, delta)-DP with respect to adding
or removing one private image. What is not: the choice of settings made on the private data,
soft labels from a model trained without DP, and any evaluation on a real test set.

Example:
    >>> sigma = noise_multiplier(1.0, 1e-5, sample_rate=0.02, steps=100)
    >>> abs(epsilon_spent(sigma, 0.02, 100, 1e-5) - 1.0) < 0.02
    True
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass

import torch

from datafree.base.errors import UserError

ACCOUNTANT = "prv"      # opacus's privacy random variable accountant (numerically tight, unlike RDP)
EPS_ERROR = 1e-3        # its error bound on epsilon, as a share of epsilon: within 0.1% of a PLD accountant
BUDGET_SHARE = 0.95     # of a time budget turned into steps: the rest absorbs the timing's noise
TIMED_STEPS = 3         # steps timed (after one to warm up) to turn a time budget into steps: their median counts
# The images' optimiser under DP: Adam, whose steps do not depend on the loss's scale. Plain DM's SGD at rate 1
# barely moved them once every embedding is scaled to norm 1 (2026-12-05: a 6-minute MNIST set ended with the
# noise it started from, std 1.0003). The rate was chosen on a validation split (BENCHMARKS.md, "Privacy").
DP_IMAGE_LR = 0.03  # 92.30% on the validation split against 89.69 (0.01) and 82.29 (0.003): the edge of the grid


@dataclass
class PrivacyPlan:
    """A DP condensation's mechanism and its accounting, fixed before the first private read."""

    epsilon: float
    delta: float
    sigma: float             # noise multiplier: the noise's std over the L2 sensitivity
    sample_rate: float       # Poisson sampling probability of each private image per step
    steps: int
    clip: float | None       # None: every embedding scaled to norm 1
    private_images: int
    step_seconds: float | None = None   # the timed start-up step that turned a time budget into steps
    accountant: str = ACCOUNTANT

    def record(self) -> dict:
        """The plan for a manifest, with the accountant's package version."""
        import opacus

        return asdict(self) | {"accountant": f"opacus {self.accountant.upper()} accountant", "accountant_version": opacus.__version__,
                               "sensitivity": "sqrt(2) x clip (1 with clip none: sqrt(2)), per step, add/remove one image"}


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.5% of epsilon) that keeps ``steps`` Poisson-sampled
    Gaussian steps at rate ``sample_rate`` within (epsilon, delta), by opacus's PRV accountant.

    Example:
        >>> round(noise_multiplier(1.0, 1e-5, 0.02, 1000), 1)
        2.5
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                          accountant=ACCOUNTANT, epsilon_tolerance=0.005 * epsilon, eps_error=EPS_ERROR * epsilon))
    except ValueError as e:
        raise UserError(f"no noise level reaches epsilon {epsilon:g} at delta {delta:g} over {steps} steps ({e})") from None


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after ``steps`` steps of the mechanism, by opacus's PRV accountant (0 for no step).

    Example:
        >>> epsilon_spent(2.5, 0.02, 0, 1e-5)
        0.0
    """
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    rough = accountant.get_epsilon(delta=delta, eps_error=0.01)  # its error bound is absolute: refine to a share of epsilon
    return float(accountant.get_epsilon(delta=delta, eps_error=max(EPS_ERROR * rough, 1e-4)))


def check_private_job(job, data_free: bool, private_images: int) -> None:
    """Refuse, in one sentence, what a DP condensation cannot do (before anything is read or written)."""
    if data_free:
        raise UserError("dp_epsilon protects a real data set; a distill run's transfer set holds no private image (its "
                        "teacher's leakage is measured by `datafree audit --membership`)")
    if job.method != "dm":
        raise UserError(f"dp_epsilon runs distribution matching (method dm); method {job.method!r} has no private variant here")
    if job.init not in (None, "noise"):
        raise UserError(f"under dp_epsilon the set starts from noise: init {job.init!r} would read private images outside "
                        "the accounted mechanism")
    if job.dp_delta >= 1 / private_images:
        raise UserError(f"dp_delta {job.dp_delta:g} is not below 1 / {private_images:,} private images "
                        f"({1 / private_images:.2g}); a delta that large allows publishing an image outright")


def sample_rate_for(real_per_class: int, num_classes: int, private_images: int) -> float:
    """Poisson rate that samples ``real_per_class`` images of an average class per step.

    Example:
        >>> sample_rate_for(128, 10, 60000)
        0.021333333333333333
    """
    return min(1.0, real_per_class * num_classes / private_images)


def plan_privacy(epsilon: float, delta: float, clip: float | None, private_images: int, sample_rate: float,
                 steps: int | None, budget_seconds: float | None, time_step) -> PrivacyPlan:
    """The step count (given, or what is left of the time budget after the timing, over one timed step:
    ``time_step()`` returns seconds) and the noise multiplier calibrated to it."""
    step_seconds = None
    if steps is None:
        started = time.monotonic()
        step_seconds = time_step()
        left = budget_seconds - (time.monotonic() - started)
        steps = max(1, int(left * BUDGET_SHARE / step_seconds))
    sigma = noise_multiplier(epsilon, delta, sample_rate, steps)
    return PrivacyPlan(epsilon, delta, sigma, sample_rate, steps, clip, private_images,
                       None if step_seconds is None else round(step_seconds, 4))


def bounded(embeddings: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Each row clipped to L2 norm ``clip``, or scaled to norm 1 when ``clip`` is None.

    Example:
        >>> bounded(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).norm(dim=1)
        tensor([1.0000, 0.5000])
    """
    norms = embeddings.norm(dim=1, keepdim=True).clamp(min=1e-12)
    if clip is None:
        return embeddings / norms
    return embeddings * (clip / norms).clamp(max=1.0)


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's entropy (never recorded)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def noisy_class_means(net, images: torch.Tensor, labels: torch.Tensor, classes: list[int], draws, augment, clip: float | None,
                      sigma: float, noise: torch.Generator, precision) -> dict[int, torch.Tensor]:
    """The mechanism's release: per class in ``classes``, the noisy sum of the bounded embeddings of
    ``images`` (this step's Poisson sample) over its noisy count; ``draws(c)`` gives class c's
    augmentation generator (public randomness), ``noise`` the Gaussian noise's (secret)."""
    scale = clip if clip is not None else 1.0
    std = sigma * math.sqrt(2) * scale
    means = {}
    for c in classes:
        mine = images[labels == c]
        p = augment.sample(draws(c))
        with torch.no_grad(), precision.autocast(images.device.type):
            total = bounded(net.forward_features(augment.apply(mine, p)).float(), clip).sum(0) if len(mine) else None
        if total is None:
            with torch.no_grad(), precision.autocast(images.device.type):
                width = net.forward_features(images[:1] * 0).float().shape[1]
            total = torch.zeros(width, device=images.device)
        count = len(mine) * scale
        total = total + torch.randn(total.shape, generator=noise).to(total.device) * std
        count = count + float(torch.randn((), generator=noise)) * std
        means[c] = (total / max(count / scale, 1.0), p)
    return means


def private_dm(source, s, progress, shards, checkpoint=None, resume: bool = False, **_) -> "Condensed":
    """Distribution matching under (epsilon, delta)-DP (``s.extra['dp']``: epsilon, delta, clip)."""
    from datafree.condense.run import MatchingRun, class_generator, decode, init_images
    from datafree.condense.settings import Condensed, class_index, matching_net, matching_precision
    from datafree.data.augment import SiameseAugment, families_for
    from datafree.data.datasets import ImageSet

    dp = s.extra["dp"]
    rng = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    k, n = source.spec.num_classes, len(source)
    syn, _ = init_images(source, s, rng, class_index(source.labels, k))  # noise: reads nothing private
    syn.requires_grad_(True)
    augment = SiameseAugment(families_for(source.name))
    opt = torch.optim.Adam([syn], lr=s.extra.get("lr_dp_images", DP_IMAGE_LR))
    sampling, noise = secret_generator(), secret_generator()
    run = MatchingRun(s, progress, rng, syn, opt, method="dm", shards=shards, checkpoint=checkpoint, resume=resume,
                      secret={"sampling": sampling, "noise": noise})
    public = ImageSet(torch.randn(s.real_per_class, *source.images.shape[1:], generator=rng).to(source.images.device),
                      torch.arange(s.real_per_class) % k, source.spec, name=source.name)  # noise: timing reads no private image
    precision, ran = run.precision(lambda: matching_precision(public, s))
    rate = sample_rate_for(s.real_per_class, k, n)
    per_class, mine = s.ipc * s.factor ** 2, shards.mine(k)

    def step(images, labels, iteration) -> torch.Tensor:
        net = matching_net(source, s, precision)
        for p in net.parameters():
            p.requires_grad_(False)
        targets = noisy_class_means(net, images, labels, mine, lambda c: class_generator(s.seed, iteration, 0, c), augment,
                                    dp["clip"], run.aux["plan"]["sigma"] if "plan" in run.aux else 1.0, noise, precision)
        decoded, loss = decode(syn, s.factor), syn.new_zeros(())
        for c, (target, p) in targets.items():
            with precision.autocast(syn.device.type):
                embedded = net.forward_features(augment.apply(decoded[c * per_class:(c + 1) * per_class], p)).float()
            loss = loss + ((bounded(embedded, dp["clip"]).mean(0) - target) ** 2).sum()
        return loss

    if "plan" not in run.aux:  # a fresh run: time a few steps on noise, then fix the steps and the noise
        def time_step() -> float:
            fake = torch.randn(max(1, round(rate * n)), *source.images.shape[1:], generator=rng).to(source.images.device)
            labels = torch.randint(k, (len(fake),), generator=rng).to(fake.device)
            times = []
            for _ in range(1 + TIMED_STEPS):  # the first warms up (allocations, kernels) and is not counted
                started = time.monotonic()
                loss = step(fake, labels, -1)
                opt.zero_grad()
                loss.backward()
                times.append(time.monotonic() - started)
            opt.zero_grad()  # (no optimiser step: the images are as they started)
            return sorted(times[1:])[len(times[1:]) // 2]

        plan = plan_privacy(dp["epsilon"], dp["delta"], dp["clip"], n, rate, s.iterations if not s.time_budget else None,
                            s.time_budget and s.time_budget - run.elapsed(), time_step)  # the budget left after the set-up
        run.aux["plan"] = shards.main_says(asdict(plan))
    # the count ends the run; so does the time budget if the machine slows down after the timing (fewer steps spend less epsilon)
    run.s = type(s)(**{**asdict(s), "iterations": run.aux["plan"]["steps"]})
    with run.saving_on_interrupt():
        while run.next_iteration():
            chosen = torch.rand(n, generator=sampling) < rate  # Poisson sampling (each process uses its own classes' images)
            loss = step(source.images[chosen.to(source.images.device)], source.labels[chosen.to(source.labels.device)], run.iteration)
            run.end_iteration({"match_loss": run.step(loss) / k})  # (the sample's size is private: not logged)
    plan = dict(run.aux["plan"])
    return Condensed(decode(syn.detach(), s.factor), torch.arange(k).repeat_interleave(per_class), history=run.history,
                     init_source=torch.full((k * per_class,), -1), stored=syn.detach() if s.factor > 1 else None,
                     precision=ran, privacy=plan | {"steps_done": run.iteration})

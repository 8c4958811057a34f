"""A matching run: the bookkeeping every matching method shares, and how its work is split and started.

- :class:`Shards`: which classes this process matches, and the collectives that join processes;
- :func:`class_generator`: the random draws of one class at one step, the same in any process;
- :func:`encode` / :func:`decode`: multi-formation (several small images stored in one);
- :func:`init_images`: the starting images (real, herding, noise or k-means centres);
- :class:`MatchingRun`: iterations, history, time budget, progress and resumable checkpoints.

Example:
    >>> decode(torch.zeros(3, 1, 28, 28), 2).shape
    torch.Size([12, 1, 28, 28])
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from datafree.base.errors import UserError
from datafree.base.io import atomic_path
from datafree.base.precision import Precision
from datafree.condense.coreset import herding_indices, kmeans_centres
from datafree.condense.settings import CondenseSettings
from datafree.data.datasets import ImageSet

# --- gradient matching ----------------------------------------------------------------------------


class Shards:
    """Which classes this process matches, and the collectives that join the processes.

    The matching losses are sums over classes, and each class's term moves only that class's
    images, so the classes can be split across processes: each computes its share, the image
    gradients are summed across processes, and every process takes the same optimiser step on a
    full copy of the set. Every random draw of a class comes from :func:`class_generator`, so the
    result does not depend on the number of processes. Without ``fabric`` (one process) the
    collectives are no-ops. ``device`` is where this process matches (``fabric``'s when given).

    Example:
        >>> Shards().mine(10)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """

    def __init__(self, fabric=None, device: torch.device | str | None = None):
        self.fabric = fabric
        self.device = fabric.device if fabric is not None else torch.device(device or "cpu")
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


def init_images(source: ImageSet, s: CondenseSettings, rng: torch.Generator, by_class) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (stored) images, and for each decoded image the index of the source image it copies
    (-1 for noise and k-means centres). With ``factor`` f, f^2 source images are tiled into each stored one."""
    per_class = s.ipc * s.factor ** 2  # decoded images per class
    device, images, by_class = source.images.device, source.images.cpu(), [idx.cpu() for idx in by_class]
    shape = (source.spec.num_classes * s.ipc, *images.shape[1:])
    none = torch.full((source.spec.num_classes * per_class,), -1, dtype=torch.long)
    if s.init == "noise":
        return torch.randn(shape, generator=rng).to(device), none
    if s.init == "kmeans":
        centres = torch.cat([kmeans_centres(images[idx], per_class, s.seed) for idx in by_class])
        return encode(centres, s.factor).to(device), none
    if s.init == "herding":  # real images again, but the class's representative ones instead of random draws
        chosen = torch.cat([idx[herding_indices(images[idx], per_class, s)] for idx in by_class])
    elif s.init == "real":
        chosen = torch.cat([idx[torch.randperm(len(idx), generator=rng)[:per_class]] for idx in by_class])
    else:
        raise UserError(f"unknown initialisation {s.init!r}; use real, herding, noise or kmeans")
    return encode(images[chosen].clone(), s.factor).to(device), chosen


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
                 resume: bool = False, method: str = "", shards: Shards | None = None, secret: dict | None = None):
        self.s, self.progress, self.rng, self.syn, self.opt = s, progress, rng, syn, opt
        self.secret = secret or {}  # generators whose seeds are never recorded (a DP run's sampling and noise): saved as states
        self.aux: dict = {}         # what a method fixes once and a resume must keep (a DP run's plan)
        self.shards = shards or Shards()
        self.path = Path(checkpoint) if checkpoint else None
        self.key = {"method": method, **{k: v for k, v in asdict(s).items() if k not in ("time_budget", "iterations", "checkpoint_every", "precision")}}
        self.iteration, self.history, self.elapsed_before = 0, [], 0.0
        self.started = self.last_saved = time.monotonic()
        self.snapshot = None
        self.precision_record: dict | None = None  # the matching network's precision, once chosen (kept by a resume)
        if resume:
            self._restore()

    def precision(self, measure) -> tuple[Precision, dict]:
        """The matching network's precision and its record: the one a resumed run began with (so that
        it goes on exactly as it would have), else ``measure()``'s choice, the main process's for every
        process; checkpoints carry it."""
        if self.precision_record is None:
            self.precision_record = self.shards.main_says(measure()[1])
        return Precision(**self.precision_record["chosen"]), self.precision_record

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
                "opt": copy.deepcopy(self.opt.state_dict()), "rng": self.rng.get_state(), "torch_rng": torch.get_rng_state(),
                "precision": json.dumps(self.precision_record), "aux": json.dumps(self.aux),
                "secret": {name: g.get_state() for name, g in self.secret.items()}}

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
        self.precision_record = json.loads(state.get("precision") or "null")  # none in an older checkpoint: measured again
        self.aux = json.loads(state.get("aux") or "{}")
        for name, g in self.secret.items():
            g.set_state(state["secret"][name])
        self.snapshot = state


# --- selection baselines ----------------------------------------------------------------------------



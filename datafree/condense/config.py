"""The condense job's typed config (:class:`CondenseJob`) and the names of the condensation methods.

Example:
    >>> job_from_dict({"source": "mnist", "ipc": 10}).method
    'dm'
"""
from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic.dataclasses import dataclass

from datafree.base.config import STRICT, build_config, describe, parse_duration, step_cap
from datafree.base.errors import UserError
from datafree.base.precision import PRECISIONS

CONDENSE_METHODS = ("dc", "dsa", "dm", "gm_pool", "dm_pool", "random", "herding", "kcenter")  # the condenser registry's names (a test checks)


MATCHING_METHODS = ("dc", "dsa", "dm", "gm_pool", "dm_pool")  # those that optimise images (the others select real ones)


DEFAULT_CONDENSE_METHOD = "dm"  # chosen on a validation split of the training data (scripts/choose_condense_defaults.py)


INITS = ("real", "herding", "noise", "kmeans")


SCHEDULES = ("cpu", "published")


# the published DC/DSA schedule (Zhao et al. 2021, their code's defaults): width-128 ConvNet, 256 real
# images per class per step, outer x inner loops of 1 x 1 (ipc 1), 10 x 50 (ipc 10), 50 x 10 (ipc 50)
PUBLISHED = {"net_width": 128, "real_per_class": 256}


# Data-free condensation's teacher terms (see condense.teacher_terms), chosen on a validation split
# of the training data (BENCHMARKS.md, "Data-free condensation with teacher terms").
TEACHER_TERMS = {"teacher_ce": 1.0, "teacher_bn": 10.0}


PUBLISHED_METHODS = ("dc", "dsa")


DEFAULT_ITERATIONS = 1000  # a job's iterations when neither steps nor a time budget is given


@dataclass(config=STRICT)
class CondenseJob:
    """Everything a condensation job needs; :meth:`validate` checks what spans fields before any work.

    Example:
        >>> job_from_dict({"ipc": 0})
        Traceback (most recent call last):
        datafree.base.errors.UserError: config field 'ipc' must be at least 1, got 0
    """

    source: str = describe("a data set name (mnist, fashion-mnist), a folder, an .npz, or a distill run folder (data-free)", "mnist")
    out: str = describe("the output folder", "runs/condense")
    ipc: int = describe("images per class", 10, ge=1)
    method: Literal[CONDENSE_METHODS] = describe(  # type: ignore[valid-type]
        "matching (dc, dsa, dm, gm_pool and dm_pool: dsa and dm over a cached network pool) or selection (random, herding, kcenter); dm was "
        "chosen on a validation split (BENCHMARKS.md)",
        DEFAULT_CONDENSE_METHOD)
    steps: int | None = describe(f"outer iterations (each with a fresh network; default {DEFAULT_ITERATIONS:,}, no cap "
                                 "when a time budget is given: the budget ends the run)", ge=1)
    time_budget: str | float | None = describe("stop after this long, e.g. 15m (or seconds); the progress counts the budget")
    init: Literal[INITS] | None = describe(  # type: ignore[valid-type]
        "start from random source images of each class (real), the class's herding picks (representative images), "
        "noise, or k-means centres of each class (the default, for a real data set and in data-free mode: chosen on "
        "validation splits, BENCHMARKS.md)")
    factor: int = describe("multi-formation: each stored image holds factor x factor smaller images, decoded to full "
                           "size for training (a different storage budget: report it apart)", 1, ge=1)
    schedule: Literal[SCHEDULES] = describe(  # type: ignore[valid-type]
        "cpu: this project's schedule for a CPU; published: the DC/DSA papers' (width 128, 256 real images per class, "
        "inner loop 50 at ipc 10); fields given explicitly override either", "cpu")
    pool_size: int | None = describe("gm_pool, dm_pool: networks in the pool (default 6)", ge=1)
    refresh_every: int | None = describe("gm_pool, dm_pool: matching steps between replacing the pool's oldest network (default 100)", ge=1)
    real_per_class: int | None = describe("real images per class per matching step (default 128; 256 for gm_pool)", ge=1)
    net_width: int | None = describe("width of the matching ConvNet (default 32, chosen on a validation split)", ge=1)
    outer_loop: int | None = describe("matching steps per fresh network (default by ipc)", ge=1)
    inner_loop: int | None = describe("network updates between matching steps (default by ipc)", ge=1)
    seed: int = describe("seed of every random draw", 0)
    evaluate: int = describe("after condensing, train N fresh models with the fixed protocol (report only)", 0, ge=0)
    epochs: int = describe("epochs of the evaluation protocol", 300, ge=1)
    test: str | None = describe("real test set for evaluate (default: the source's)")
    soft_labels: bool = describe("keep a labeller's softmax with each image: the run's teacher in data-free mode, "
                                 "soft_label_model for a real data set", False)
    soft_label_model: str | None = describe("real data set, with soft_labels: a model trained on the real data "
                                            "(.safetensors with its card, or a .pt2 taking [0, 1] pixels) whose softmax "
                                            "labels each image")
    teacher_ce: float | None = describe(
        "data-free mode, matching methods: weight of the teacher's cross-entropy to each synthetic image's class "
        f"(default {TEACHER_TERMS['teacher_ce']:g}, chosen on a validation split; a real source has no teacher)", ge=0)
    teacher_bn: float | None = describe(
        "data-free mode, matching methods: weight of the teacher's BatchNorm-statistics prior on the synthetic images "
        f"(default {TEACHER_TERMS['teacher_bn']:g}, chosen on a validation split; nothing for a teacher without BN)", ge=0)
    dp_epsilon: float | None = describe(
        "differential privacy: condense a real data set with (epsilon, dp_delta)-DP distribution matching (method dm, "
        "noise start); the set is guaranteed, the choice of settings and any evaluation are not", gt=0)
    dp_delta: float = describe("differential privacy: delta (must be below 1 / the number of private images)", 1e-5, gt=0, lt=1)
    dp_clip: float | None = describe("differential privacy: clip each image's embedding to this L2 norm (default: scale "
                                     "every embedding to norm 1, which has nothing to tune and no clipping bias)", gt=0)
    data_dir: str | None = describe("root of the real data sets (default $DATAFREE_DATA)")
    download: bool = describe("let torchvision download a missing data set (needs the network)", False)
    accelerator: str = describe("where the matching methods run: auto (a GPU when there is one), cpu, gpu (Lightning Fabric)", "auto")
    precision: Literal[PRECISIONS] = describe(  # type: ignore[valid-type]
        "numeric precision of the matching network's passes: auto times fp32 and bf16 (fp16 too on CUDA), with and without "
        "channels_last, and keeps the fastest (fp32 unless another is 1.05x as fast); gradients and distances stay fp32", "auto")
    devices: int = describe("processes per machine; the classes are split across them (Lightning Fabric)", 1, ge=1)
    num_nodes: int = describe("machines (Lightning Fabric)", 1, ge=1)
    strategy: str | None = describe("Lightning strategy for devices/num_nodes (default ddp; gloo on CPUs)")
    resume: bool = describe("continue the run in out from its checkpoint (same settings)", False)
    overwrite: bool = describe("allow a non-empty out", False)
    progress: bool = describe("show a progress bar", True)

    def validate(self) -> "CondenseJob":
        """Raise :class:`UserError` (one sentence naming the field) for a bad value; return self."""
        self.budget_seconds()
        if self.schedule == "published" and self.method not in PUBLISHED_METHODS:
            raise UserError(f"config field 'schedule': the published schedule is the DC/DSA papers' (methods "
                            f"{', '.join(PUBLISHED_METHODS)}); method {self.method!r} has none here")
        return self

    def budget_seconds(self) -> float | None:
        """The time budget in seconds (None: none); a number reads as seconds, and one that is not a
        positive finite number is refused as a text would be."""
        return parse_duration(self.time_budget) or None

    def teacher_weights(self, data_free: bool) -> dict:
        """The teacher terms' weights this job runs with: the defaults in data-free mode (matching
        methods), none otherwise; a weight given for a real source is refused in one sentence."""
        given = {name: getattr(self, name) for name in TEACHER_TERMS if getattr(self, name) is not None}
        if not data_free:
            if any(given.values()):
                raise UserError(f"config field {next(n for n, v in given.items() if v)!r}: the teacher terms need a distill "
                                "run folder as the source (its teacher); a real data set has none")
            return {}
        if self.method not in MATCHING_METHODS:
            return given
        return TEACHER_TERMS | given

    def init_for(self, resumed: str | None = None) -> str:
        """The initialisation this job runs with: the one given; else the one a resumed run started with
        (``resumed``, from its checkpoint); else k-means centres of each class: chosen on a validation split
        of the training data for a real source, and on four teachers' transfer sets in data-free mode
        (``BENCHMARKS.md``; random transfer images were the data-free start until 2026-12-01)."""
        return self.init or resumed or "kmeans"

    def iteration_cap(self) -> int | None:
        """The most iterations this job makes: ``steps`` when given, none when only a time budget is
        (the budget ends the run), else ``DEFAULT_ITERATIONS``.

        Example:
            >>> CondenseJob(time_budget="15m").iteration_cap() is None, CondenseJob().iteration_cap()
            (True, 1000)
        """
        return step_cap(self.steps, self.time_budget, DEFAULT_ITERATIONS)

    def scaled_out(self) -> bool:
        return self.devices > 1 or self.num_nodes > 1 or bool(self.strategy)

    def settings(self) -> dict:
        """The :class:`~datafree.condense.settings.CondenseSettings` fields this job sets (with the method's own defaults)."""
        chosen = {"iterations": self.iteration_cap(), "time_budget": self.budget_seconds(), "factor": self.factor,
                  "precision": self.precision}
        if self.schedule == "published":
            outer, inner = (1, 1) if self.ipc == 1 else (10, 50) if self.ipc <= 10 else (50, 10)
            chosen |= PUBLISHED | {"outer_loop": outer, "inner_loop": inner}
        for name in ("real_per_class", "net_width", "outer_loop", "inner_loop", "pool_size", "refresh_every"):
            if getattr(self, name):
                chosen[name] = getattr(self, name)
        return with_method_defaults(self.method, chosen)


JOB_FIELDS = tuple(f.name for f in fields(CondenseJob))


def job_from_dict(values: dict) -> CondenseJob:
    """A :class:`CondenseJob` from a mapping (a request, parsed flags); unknown keys are refused.

    Example:
        >>> job_from_dict({"ipc": 1, "colour": "red"})
        Traceback (most recent call last):
        datafree.base.errors.UserError: unknown config field 'colour'
    """
    return build_config(CondenseJob, {k: v for k, v in values.items() if v is not None}).validate()


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

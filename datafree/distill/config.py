"""The distill job's typed config: every field with its default, range and one-sentence description.

Presets and the resolution order (defaults < preset < YAML < flags) are in :mod:`datafree.distill.presets`.

Example:
    >>> DistillConfig(steps=100).round_cap()
    100
"""
from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from datafree.base.config import STRICT, describe, parse_duration, step_cap
from datafree.base.errors import UserError
from datafree.base.precision import PRECISIONS
from datafree.teachers.ensemble import ENSEMBLE_RULES

ADV_KINDS = ("l1", "kl", "js")
KNOWN_WEIGHTS = ("bn", "onehot", "entropy", "activation", "adv", "tv", "l2", "soft", "input")
STUDENT_LOSSES = ("kl", "l1")
SCHEDULES = ("auto", "fixed")
PRESET_NAMES = ("dafl", "dfad", "zskt", "dfq", "deepinversion", "fast", "zskd", "dfq_input")  # PRESETS' keys (a test checks)
GENERATOR_NAMES = ("dcgan", "conditional", "pixels")  # the generator registry's names (a test checks)


DEFAULT_ROUNDS = 1000  # a run's rounds when neither steps nor a time budget is given


@dataclass(config=STRICT)
class DistillConfig:
    """Everything a ``datafree distill`` run needs; written to the run folder as ``config.yaml``.

    Example:
        >>> DistillConfig(steps=0)
        Traceback (most recent call last):
        pydantic_core._pydantic_core.ValidationError: 1 validation error for DistillConfig...
    """

    teacher: str | list[str] = describe("the teacher file: .safetensors with its .json card, .pt2, or TorchScript; "
                                        "several files make an ensemble whose combined soft targets (ensemble_rule) the student learns", "")
    ensemble_rule: Literal[ENSEMBLE_RULES] = describe(  # type: ignore[valid-type]
        "how several teachers' answers combine: logits (their mean logits) or probs (their mean softmax)", "logits")
    teacher_input_spec: str | None = describe("CxHxW[:mean:std] of a teacher file that does not say, e.g. 1x28x28:0.1307:0.3081")
    student: str = describe("student architecture from the zoo, or a .safetensors file to start from", "lenet5_half")
    student_kwargs: dict = describe("keyword arguments of the student architecture, e.g. {width: 32}", default_factory=dict)
    preset: Literal[PRESET_NAMES] = describe(  # type: ignore[valid-type]
        "the method's settings, each preset citing its paper (config.PRESETS); chosen per kind of teacher in BENCHMARKS.md", "dfq")
    preset_note: str = describe("why the preset was chosen automatically (printed at the start of a run)", "")
    out: str = describe("the run folder", "runs/distill")
    seed: int = describe("seed of every random draw (same seed, same run)", 0)
    steps: int | None = describe(f"synthesis rounds: one generator update and the student steps each (default {DEFAULT_ROUNDS:,}; "
                                 "no cap when a time budget is given: the budget ends the run)", ge=1)
    time_budget: str | float | None = describe("stop after this long, e.g. 10m or 1h30m (or seconds), keeping the best student so far")
    # synthesis
    generator: Literal[GENERATOR_NAMES] = describe("generator architecture (generators/)", "conditional")  # type: ignore[valid-type]
    generator_kwargs: dict = describe("keyword arguments of the generator",
                                      default_factory=lambda: {"latent_dim": 64, "width": 32})
    batch_size: int = describe("synthetic images per generator step", 256, ge=1)
    synth_steps: int = describe("generator updates per round", 1, ge=1)
    meta_rate: float = describe(
        "a meta generator as in Fast-DFKD (Fang et al., AAAI 2022), by Reptile interpolation: each round starts from "
        "the meta generator, makes synth_steps updates for its batch (one Adam, its state kept across rounds), then the "
        "meta generator moves this share of the way to the adapted one (1: keep all of it, the plain loop; generators "
        "only, needs synth_steps > 1)", 1.0, gt=0, le=1)
    reset_every: int = describe("pixels: a fresh batch every N rounds (0: never); a finished batch joins the pool", 0, ge=0)
    jitter: int = describe("random shift in pixels of each synthetic batch before the teacher sees it", 0, ge=0)
    lr_generator: float = describe("generator (or pixel) learning rate", 1e-3, gt=0)
    weights: dict = describe("loss weights of the synthesis priors, e.g. {bn: 1.0, adv: 1.0}", default_factory=dict)
    bn_first_layer: float = describe("extra weight of the first BN layer's statistics", 1.0, ge=0)
    bn_momentum: float = describe("momentum of the batch statistics matched to the BN running statistics (0: none)", 0.0, ge=0, lt=1)
    adv_kind: Literal[ADV_KINDS] = describe("teacher-student disagreement the generator maximises", "js")  # type: ignore[valid-type]
    soft_temperature: float = describe("the soft-target prior's temperature (ZSKD)", 20.0, gt=0)
    adv_temperature: float = describe("temperature of the disagreement term", 1.0, gt=0)
    # student
    lr_student: float = describe("student learning rate", 0.05, gt=0)
    student_optimizer: Literal["sgd", "adam"] = describe("student optimiser", "sgd")
    student_steps: int = describe("student updates per round on pool samples (the least, under schedule auto)", 5, ge=0)
    schedule: Literal[SCHEDULES] = describe(  # type: ignore[valid-type]
        "fixed: student steps as the preset says; auto: fitted to the measured cost of the teacher", "fixed")
    student_share: float = describe("schedule auto: the fraction of each round's time for student steps", 0.5, gt=0, lt=1)
    max_student_steps: int = describe("schedule auto: the most student steps per round", 40, ge=1)
    student_batch: int = describe("pool samples per student step", 256, ge=1)
    kd_temperature: float = describe("temperature of the student's KD loss", 4.0, gt=0)
    kd_alpha: float = describe("weight of cross-entropy on the teacher's argmax beside KD", 0.0, ge=0)
    knowledge: dict = describe("weights of knowledge beyond logits on the student's batches: hint (FitNets), attention "
                               "(attention transfer) and rkd (relational KD), e.g. {rkd: 1.0}; needs the teacher's features",
                               default_factory=dict)
    student_loss: Literal[STUDENT_LOSSES] = describe("the student's loss on teacher logits: kl, or l1 as DFAD", "kl")  # type: ignore[valid-type]
    student_ema: float = describe("decay of an exponential moving average of the student's weights, which is then the "
                                  "student evaluated and kept (0: off, the raw weights)", 0.0, ge=0, lt=1)
    augment: bool = describe("random affine on pool samples, re-labelled by the teacher", True)
    final_augment: bool = describe("random affine on archive samples in the student-only last share only, re-labelled "
                                   "by the teacher (the rounds before keep their cost; no effect without final_share)", False)
    mixup: float = describe("probability of mixing two pool samples in a student batch", 0.0, ge=0, le=1)
    pool_size: int = describe("synthetic samples kept for the student's steps", 20000, ge=1)
    final_share: float = describe("the last share of the run (time or rounds) trains the student only, on the archive of "
                                  "every synthesised batch (as DeepInversion and ZSKD distil from a synthesised set), "
                                  "each of those rounds 4x the student steps (0: off; dfq and dfq_input set 0.5, measured "
                                  "with dfq)", 0.0, ge=0, lt=1)
    final_pool: int = describe("synthesised images archived for the last share of the run", 20000, ge=1)
    archive_keeps: Literal["newest", "uniform"] = describe(
        "which synthesised images the archive keeps: the newest (a ring buffer: a long run's last rounds only) or a "
        "uniform sample of every batch of the run (a reservoir: early and late generator stages alike; measured as "
        "no better, BENCHMARKS.md)", "newest")
    # selection and bookkeeping (no real data)
    holdout_every: int = describe("every Nth synthetic batch goes to the held-out set that selects the student (0: none)", 10, ge=0)
    holdout_size: int = describe("held-out synthetic samples", 2048, ge=1)
    eval_every: int = describe("rounds between held-out agreement checks", 100, ge=1)
    checkpoint_every: int = describe("rounds between checkpoints", 100, ge=1)
    grid_every: int = describe("rounds between image grids (0: none)", 250, ge=0)
    # optional report-only evaluation on real data, after training
    eval_data: str | None = describe("real test set for the report only, measured once after training (default: the card's)")
    data_dir: str | None = describe("root of the real data sets (default $DATAFREE_DATA)")
    # where and how it runs
    precision: Literal[PRECISIONS] = describe(  # type: ignore[valid-type]
        "numeric precision of the teacher's and the student's passes: auto times fp32 and bf16 (fp16 too on CUDA), each with "
        "and without channels_last, at start-up and keeps the fastest, fp32 unless another is 1.05x as fast (losses and BN "
        "statistics stay fp32); fp32, bf16 or fp16 run as named, untimed, so a seeded run repeats exactly", "auto")
    # scale-out, passed to Lightning
    accelerator: str = describe("passed to Lightning: auto (a GPU when there is one), cpu, gpu", "auto")
    devices: int = describe("passed to Lightning", 1, ge=1)
    num_nodes: int = describe("passed to Lightning", 1, ge=1)
    strategy: str = describe("passed to Lightning, e.g. ddp", "auto")

    def round_cap(self) -> int | None:
        """The most rounds this run makes: ``steps`` when given, none when only a time budget is
        (the budget ends the run), else ``DEFAULT_ROUNDS``.

        Example:
            >>> DistillConfig(time_budget="10m").round_cap() is None, DistillConfig().round_cap()
            (True, 1000)
        """
        return step_cap(self.steps, self.time_budget, DEFAULT_ROUNDS)

    def check(self) -> None:
        """The checks that span fields (:func:`validate`)."""
        validate(self)


def validate(cfg: DistillConfig) -> None:
    """The checks that span fields (each field's own type and range is checked by the typed config);
    :func:`~datafree.base.config.build_config` runs them."""
    for key in cfg.weights:
        if key not in KNOWN_WEIGHTS:
            raise UserError(f"unknown loss weight {key!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    from datafree.distill.knowledge import KNOWLEDGE_TERMS  # torch: loaded only when a config is checked

    for key, weight in cfg.knowledge.items():
        if key not in KNOWLEDGE_TERMS:
            raise UserError(f"unknown knowledge term {key!r}; known: {', '.join(KNOWLEDGE_TERMS)}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise UserError(f"the weight of knowledge term {key!r} must be a number >= 0, got {weight!r}")
    if cfg.max_student_steps < max(1, cfg.student_steps):
        raise UserError("config field 'max_student_steps' must be at least student_steps")
    if cfg.meta_rate < 1 and (cfg.generator == "pixels" or cfg.synth_steps < 2):
        raise UserError("config field 'meta_rate' needs a generator (not pixels) and synth_steps of 2 or more: "
                        "the meta generator keeps a share of each round's several updates")
    if cfg.weights.get("soft") and cfg.generator != "pixels":
        raise UserError("the soft-target prior (weights.soft) needs the pixels generator: each image has its own target")
    parse_duration(cfg.time_budget)



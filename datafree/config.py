"""Typed configs: defaults, presets, YAML in (``yaml.safe_load``) and the resolved config out.

A preset is a set of loss weights and a schedule over the one synthesis loop, not a class of its
own. Resolution order: dataclass defaults < preset < YAML file < command-line flags.

Example:
    >>> cfg = resolve_distill_config(preset="dfad", overrides={"steps": 100})
    >>> cfg.weights["adv"], cfg.steps
    (1.0, 100)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal
from pathlib import Path

import yaml

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from datafree.errors import UserError

ADV_KINDS = ("l1", "kl", "js")
KNOWN_WEIGHTS = ("bn", "onehot", "entropy", "activation", "adv", "tv", "l2", "soft", "input")
STUDENT_LOSSES = ("kl", "l1")
SCHEDULES = ("auto", "fixed")
PRESET_NAMES = ("dafl", "dfad", "zskt", "dfq", "deepinversion", "fast", "zskd", "dfq_input")  # PRESETS' keys (a test checks)
GENERATOR_NAMES = ("dcgan", "conditional", "pixels")  # the generator registry's names (a test checks)
ENSEMBLE_RULES = ("logits", "probs")  # how an ensemble's members combine (datafree.ensemble)


STRICT = ConfigDict(strict=True, extra="forbid")  # YAML, JSON and flags are checked alike: no silent "5" -> 5


def describe(text: str, default=None, **kwargs):
    """A config field with its one-sentence description (shown by ``--help`` and ``/openapi.json``)."""
    if "default_factory" in kwargs:
        return Field(description=text, **kwargs)
    return Field(default, description=text, **kwargs)


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
    # scale-out, passed to Lightning
    accelerator: str = describe("passed to Lightning: cpu, gpu, auto", "cpu")
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


PRESETS: dict[str, dict] = {
    # Chen et al., "Data-Free Learning of Student Networks" (DAFL), ICCV 2019: one-hot, activation and
    # information-entropy losses on a generator; the student learns by KD on its outputs.
    "dafl": {"generator": "dcgan", "generator_kwargs": {"latent_dim": 100, "width": 32},
             "weights": {"onehot": 1.0, "activation": 0.1, "entropy": 5.0}, "lr_generator": 0.2,
             "student_steps": 1, "augment": False, "student_loss": "kl", "kd_temperature": 1.0,
             "student_optimizer": "adam", "lr_student": 2e-3, "pool_size": 256},
    # Fang et al., "Data-Free Adversarial Distillation" (DFAD), 2019: the generator maximises the L1
    # disagreement, the student minimises it (5 student steps per generator step).
    "dfad": {"generator": "dcgan", "generator_kwargs": {"latent_dim": 100, "width": 32},
             "weights": {"adv": 1.0}, "adv_kind": "l1", "student_loss": "l1", "student_steps": 5,
             "lr_generator": 1e-3, "augment": False, "pool_size": 256 * 5},
    # Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching" (ZSKT),
    # NeurIPS 2019: adversarial KL at T=1, several student steps per generator step.
    "zskt": {"generator": "dcgan", "generator_kwargs": {"latent_dim": 100, "width": 32},
             "weights": {"adv": 1.0}, "adv_kind": "kl", "student_loss": "kl", "kd_temperature": 1.0,
             "student_steps": 10, "augment": False, "pool_size": 256 * 10},
    # Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation" (DFQ),
    # CVPR-W 2020: BN statistics + one-hot + class balance + adversarial disagreement.
    "dfq": {"generator": "dcgan", "generator_kwargs": {"latent_dim": 100, "width": 32},
            "weights": {"bn": 1.0, "onehot": 1.0, "entropy": 1.0, "adv": 1.0}, "adv_kind": "kl",
            "student_steps": 5, "augment": False, "pool_size": 256 * 5,
            # ours: the last half trains the student only, on every synthesised batch (chosen on a
            # validation split over the seven suite teachers, BENCHMARKS.md)
            "final_share": 0.5},
    # Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020:
    # pixels optimised with BN statistics (first layer x10), CE, jitter, TV and L2, plus the adaptive
    # (ADI) competition term: JS disagreement with the student; 200 steps per batch (5 per round).
    # The published loss scales were set for 224x224 ImageNet; TV is rescaled for 28x28 images.
    "deepinversion": {"generator": "pixels", "generator_kwargs": {}, "synth_steps": 5, "reset_every": 40,
                      "lr_generator": 0.1, "jitter": 2, "bn_first_layer": 10.0,
                      "weights": {"bn": 1.0, "onehot": 1.0, "tv": 0.3, "l2": 1e-4, "adv": 1.0}, "adv_kind": "js",
                      "student_steps": 2, "augment": True, "mixup": 0.0, "pool_size": 20000},
    # Ours, for a CPU. Measured here: on a LeNet teacher a generator that is wide enough to be diverse
    # costs 30-100x the teacher per image, while a pixel step costs one teacher pass. So: DeepInversion's
    # priors (BN x5 on the first layer, CE to a balanced set of asked classes, jitter, TV) on pixel
    # batches optimised for only 100 steps on a 20x20 grid upsampled to the image size, the ADI
    # competition term at half weight, every finished batch kept in a 20k pool, and 3 cheap student
    # steps per round on augmented, mixed-up pool samples re-labelled by the teacher.
    "fast": {"generator": "pixels", "generator_kwargs": {"resolution": 20}, "synth_steps": 5, "reset_every": 20,
             "lr_generator": 0.1, "jitter": 2, "bn_first_layer": 5.0,
             "weights": {"bn": 1.0, "onehot": 1.0, "tv": 0.3, "adv": 0.5}, "adv_kind": "js", "student_steps": 3, "augment": True,
             "mixup": 0.5, "pool_size": 20000},
    # Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks" (ZSKD), ICML 2019: "data
    # impressions", pixels optimised so that the teacher's softmax at T=20 matches soft targets drawn
    # from a Dirichlet over the class-similarity of the final layer's weights (half at beta 1, half at
    # 0.1); needs no BN statistics. Published: 1,500 steps per batch; here 200 (40 rounds x 5), the
    # batch then joins the pool, and the student learns from it with augmentation at T=20.
    "zskd": {"generator": "pixels", "generator_kwargs": {}, "synth_steps": 5, "reset_every": 40,
             "lr_generator": 0.05, "weights": {"soft": 1.0}, "soft_temperature": 20.0,
             "student_steps": 2, "augment": True, "kd_temperature": 20.0, "pool_size": 20000},
}

# For teachers without BatchNorm: DFQ's generator and terms (Choi et al., above; its BN term has
# nothing to read here) plus ours, the input-statistics prior: the teacher's input normalisation
# read as a BN layer whose statistics are known (datafree/priors.py). On the no-BN LeNet-5 the
# archive's pixels had mean / std 0.40 / 0.42 without it and 0.18 / 0.31 with it (MNIST: 0.13 / 0.31). Chosen on a
# validation split over no-BN teachers and three seeds (BENCHMARKS.md, "A preset for teachers
# without BatchNorm").
PRESETS["dfq_input"] = PRESETS["dfq"] | {"weights": {"onehot": 1.0, "entropy": 1.0, "adv": 1.0, "input": 1.0}}

CONDENSE_METHODS = ("dc", "dsa", "dm", "gm_pool", "dm_pool", "random", "herding", "kcenter")  # the condenser registry's names (a test checks)
MATCHING_METHODS = ("dc", "dsa", "dm", "gm_pool", "dm_pool")  # those that optimise images (the others select real ones)
DEFAULT_CONDENSE_METHOD = "dm"  # chosen on a validation split of the training data (scripts/choose_condense_defaults.py)
NO_BN_PRESET = "dfq_input"  # the preset for teachers without readable BN statistics, chosen in BENCHMARKS.md


def step_cap(steps: int | None, time_budget, default: int) -> int | None:
    """How many steps a run may make: ``steps`` when given; none when only a time budget is (the
    budget ends the run); else ``default``. Distillation's rounds and condensation's iterations alike.

    Example:
        >>> step_cap(None, "10m", 1000), step_cap(None, None, 1000), step_cap(50, "10m", 1000)
        (None, 1000, 50)
    """
    if steps is not None:
        return steps
    return None if parse_duration(time_budget) else default


def parse_duration(text: str | None) -> float | None:
    """``'90s'``, ``'10m'``, ``'1.5h'``, ``'1h30m'`` or plain seconds -> seconds.

    Example:
        >>> parse_duration("1h30m")
        5400.0
    """
    if text is None or text == "":
        return None
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
            raise UserError(f"cannot read the time budget {text!r}: use e.g. 90s, 10m, 1.5h or 1h30m")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"the time budget {text!r} must be positive")
    return seconds


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no config file at {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold a mapping of config fields")
    return data


def resolve_distill_config(preset: str | None = None, yaml_path=None, overrides: dict | None = None) -> DistillConfig:
    """Defaults < preset < YAML < overrides (``None`` values in overrides are ignored)."""
    values: dict = {}
    file_values = load_yaml(yaml_path) if yaml_path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = overrides.get("preset") or file_values.get("preset") or preset
    if not name:
        name, values["preset_note"] = default_preset(overrides.get("teacher") or file_values.get("teacher"),
                                                     overrides.get("teacher_input_spec") or file_values.get("teacher_input_spec"))
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    values.update(PRESETS[name])
    values.update(file_values)
    values.update(overrides)
    values["preset"] = name
    return build_config(DistillConfig, values)


def default_preset(teacher_path: str | list[str] | None, input_spec: str | None = None) -> tuple[str, str]:
    """The preset for a teacher when none is named: ``dfq`` when its BN statistics can be read,
    ``NO_BN_PRESET`` otherwise (with the one-line note a run prints). A teacher file that cannot be
    loaded gets ``dfq`` here; the run itself then reports what is wrong with the file.

    Example:
        >>> default_preset("assets/teachers/mnist_lenet5.safetensors")
        ('dfq', '')
    """
    if not teacher_path:
        return DistillConfig.preset, ""
    from datafree.ensemble import load_teachers

    try:
        teacher = load_teachers(teacher_path, input_spec=input_spec)  # the rule does not change has_bn
    except (UserError, OSError, ValueError):
        return DistillConfig.preset, ""
    if teacher.has_bn:
        return DistillConfig.preset, ""
    return NO_BN_PRESET, (f"note: {teacher.no_bn_reason or 'the teacher has no BatchNorm statistics'}; using the "
                          f"{NO_BN_PRESET!r} preset, the default for such teachers (pass --preset to choose another)")


def build_config(cls, values: dict):
    """Construct the typed config ``cls`` from a dict; a mistake becomes one sentence naming the field.

    Example:
        >>> build_config(DistillConfig, {"steps": "ten"})
        Traceback (most recent call last):
        datafree.errors.UserError: config field 'steps' must be an integer, got 'ten'
    """
    try:
        cfg = cls(**values)
    except ValidationError as e:
        raise UserError(field_error(e)) from None
    except TypeError as e:  # a keyword the dataclass does not have
        raise UserError(f"unknown config field: {e}") from None
    if cls is DistillConfig:
        validate(cfg)
    return cfg


KIND_WORDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
              "dict_type": "a mapping", "int_from_float": "an integer"}
BOUND_WORDS = {"greater_than_equal": "at least {ge}", "greater_than": "more than {gt}", "less_than": "less than {lt}",
               "less_than_equal": "at most {le}"}


def field_error(error: ValidationError) -> str:
    """The first error of a pydantic validation as one sentence that names the field."""
    first = error.errors()[0]
    name, kind, value, ctx = ".".join(str(x) for x in first["loc"]), first["type"], first.get("input"), first.get("ctx", {})
    if kind == "unexpected_keyword_argument":
        return f"unknown config field {name!r}"
    if kind == "literal_error":
        return f"unknown {name.replace('_', ' ')} {value!r}; use {ctx.get('expected', '').replace(chr(39), '')}"
    if kind in BOUND_WORDS:
        return f"config field {name!r} must be {BOUND_WORDS[kind].format(**ctx)}, got {value!r}"
    if kind in KIND_WORDS:
        return f"config field {name!r} must be {KIND_WORDS[kind]}, got {value!r}"
    if first["loc"] == () or kind == "missing_argument":
        return f"config field {name!r} is required"
    return f"config field {name!r}: {first['msg']}, got {value!r}"


def validate(cfg: DistillConfig) -> None:
    """The checks that span fields (each field's own type and range is checked by the typed config)."""
    for key in cfg.weights:
        if key not in KNOWN_WEIGHTS:
            raise UserError(f"unknown loss weight {key!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    from datafree.knowledge import KNOWLEDGE_TERMS

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


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datafree.errors import UserError


@dataclass
class DistillConfig:
    """Everything a ``datafree distill`` run needs; written to the run folder as ``config.yaml``."""

    teacher: str = ""
    teacher_input_spec: str | None = None  # CxHxW[:mean:std], for a teacher file that does not say
    student: str = "lenet5_half"
    student_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 32} for convnet
    preset: str = "dfq"                    # default for BN teachers; NO_BN_PRESET for teachers without BN (BENCHMARKS.md)
    preset_note: str = ""                  # why the preset was chosen automatically (printed at the start of a run)
    out: str = "runs/distill"
    seed: int = 0
    steps: int = 1000                      # synthesis rounds (one generator update + student steps each)
    time_budget: str | None = None         # e.g. "10m"; stops early, keeps the best checkpoint
    # synthesis
    generator: str = "conditional"
    generator_kwargs: dict = field(default_factory=lambda: {"latent_dim": 64, "width": 32})
    batch_size: int = 256                  # synthetic images per generator step
    synth_steps: int = 1                   # generator updates per round
    reset_every: int = 0                   # pixels: fresh batch every N rounds (0: never); a batch enters the pool when done
    jitter: int = 0                        # random shift (pixels) of each synthetic batch before the teacher sees it
    lr_generator: float = 1e-3
    weights: dict = field(default_factory=dict)
    bn_first_layer: float = 1.0
    bn_momentum: float = 0.0
    adv_kind: str = "js"
    soft_temperature: float = 20.0         # the soft-target prior's temperature (ZSKD)
    adv_temperature: float = 1.0
    # student
    lr_student: float = 0.05
    student_optimizer: str = "sgd"
    student_steps: int = 5                 # student updates per round, on pool samples (the floor under schedule=auto)
    schedule: str = "fixed"                # fixed: as the preset says; auto: student steps fitted to the measured teacher cost
    student_share: float = 0.5             # auto: the fraction of each round's time that goes to student steps
    max_student_steps: int = 40            # auto: the most student steps per round
    student_batch: int = 256
    kd_temperature: float = 4.0
    kd_alpha: float = 0.0                  # weight of CE on the teacher's argmax
    student_loss: str = "kl"               # kl | l1 (DFAD)
    augment: bool = True                   # random affine on pool samples, teacher re-labels them
    mixup: float = 0.0                     # probability of mixing two pool samples per student batch
    pool_size: int = 20000
    # selection and bookkeeping (no real data)
    holdout_every: int = 10                # every Nth synthetic batch goes to the held-out set
    holdout_size: int = 2048
    eval_every: int = 100
    checkpoint_every: int = 100
    grid_every: int = 250
    # optional report-only evaluation on real data, after training
    eval_data: str | None = None
    data_dir: str | None = None
    # scale-out, passed to Lightning
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"


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
            "student_steps": 5, "augment": False, "pool_size": 256 * 5},
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

CONDENSE_METHODS = ("dc", "dsa", "dm", "random", "herding", "kcenter")  # the condenser registry's names (a test checks)
DEFAULT_CONDENSE_METHOD = "dm"  # chosen on a validation split of the training data (scripts/choose_condense_defaults.py)
NO_BN_PRESET = "dfq"  # the preset for teachers without readable BN statistics, chosen in BENCHMARKS.md
STUDENT_LOSSES = ("kl", "l1")
SCHEDULES = ("auto", "fixed")
ADV_KINDS = ("l1", "kl", "js")
KNOWN_WEIGHTS = ("bn", "onehot", "entropy", "activation", "adv", "tv", "l2", "soft")


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
        return float(s)
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


def default_preset(teacher_path: str | None, input_spec: str | None = None) -> tuple[str, str]:
    """The preset for a teacher when none is named: ``dfq`` when its BN statistics can be read,
    ``NO_BN_PRESET`` otherwise (with the one-line note a run prints). A teacher file that cannot be
    loaded gets ``dfq`` here; the run itself then reports what is wrong with the file.

    Example:
        >>> default_preset("assets/teachers/mnist_lenet5.safetensors")
        ('dfq', '')
    """
    if not teacher_path:
        return DistillConfig.preset, ""
    from datafree.teacher import load_teacher

    try:
        teacher = load_teacher(teacher_path, input_spec=input_spec)
    except (UserError, OSError, ValueError):
        return DistillConfig.preset, ""
    if teacher.has_bn:
        return DistillConfig.preset, ""
    return NO_BN_PRESET, (f"note: {teacher.no_bn_reason or 'the teacher has no BatchNorm statistics'}; using the "
                          f"{NO_BN_PRESET!r} preset, the default for such teachers (pass --preset to choose another)")


def build_config(cls, values: dict):
    """Construct ``cls`` from a dict, naming any unknown field or wrongly typed value."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown config field {key!r}")
    cfg = cls(**values)
    for name, f in known.items():
        _check_type(name, getattr(cfg, name), f.type)
    validate(cfg)
    return cfg


def _check_type(name, value, annotation) -> None:
    text = str(annotation)
    allowed = [t for t, key in ((int, "int"), (float, "float"), (str, "str"), (bool, "bool"), (dict, "dict")) if key in text]
    if value is None and "None" in text:
        return
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return
    if allowed and not any(isinstance(value, t) and not (t is int and isinstance(value, bool) and bool not in allowed) for t in allowed):
        raise UserError(f"config field {name!r} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")


def validate(cfg: DistillConfig) -> None:
    for key in cfg.weights:
        if key not in KNOWN_WEIGHTS:
            raise UserError(f"unknown loss weight {key!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    if cfg.student_loss not in STUDENT_LOSSES:
        raise UserError(f"unknown student loss {cfg.student_loss!r}; use {' or '.join(STUDENT_LOSSES)}")
    if cfg.student_optimizer not in ("sgd", "adam"):
        raise UserError(f"unknown student optimizer {cfg.student_optimizer!r}; use sgd or adam")
    if cfg.adv_kind not in ADV_KINDS:
        raise UserError(f"unknown disagreement {cfg.adv_kind!r}; use {', '.join(ADV_KINDS)}")
    for name in ("steps", "batch_size", "student_batch", "pool_size", "eval_every", "checkpoint_every", "devices", "num_nodes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"config field {name!r} must be at least 1")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}; use {' or '.join(SCHEDULES)}")
    if not 0 < cfg.student_share < 1:
        raise UserError("config field 'student_share' must be between 0 and 1 (exclusive)")
    if cfg.max_student_steps < max(1, cfg.student_steps):
        raise UserError("config field 'max_student_steps' must be at least student_steps")
    if cfg.student_steps < 0 or cfg.synth_steps < 1:
        raise UserError("student_steps must be >= 0 and synth_steps >= 1")
    if cfg.weights.get("soft") and cfg.generator != "pixels":
        raise UserError("the soft-target prior (weights.soft) needs the pixels generator: each image has its own target")
    parse_duration(cfg.time_budget)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

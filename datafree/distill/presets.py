"""Presets and the resolution of a distill config: defaults < preset < YAML file < command-line flags.

A preset is a set of loss weights and a schedule over the one synthesis loop, not a class of its
own. When none is named, the teacher decides (:func:`default_preset`): ``dfq`` when its BatchNorm
statistics can be read, :data:`NO_BN_PRESET` otherwise.

Example:
    >>> cfg = resolve_distill_config(preset="dfad", overrides={"steps": 100})
    >>> cfg.weights["adv"], cfg.steps
    (1.0, 100)
"""
from __future__ import annotations

from datafree.base.config import build_config, load_yaml
from datafree.base.errors import UserError
from datafree.distill.config import DistillConfig
from datafree.teachers.ensemble import load_teachers

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
            "final_share": 0.5,
            # ours: synthesis batches of 64, not 256: a round costs a quarter of the teacher pass, so an
            # expensive teacher gets more rounds (at 3 minutes, validation split: ResNet-20 +10.3, a
            # residual GAP .pt2 +13.9, ConvNet-IN +1.3, LeNet-5 +0.0; rule bench/rules/2026-12-05-deep-teacher-rounds.txt)
            "batch_size": 64},
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
# read as a BN layer whose statistics are known (datafree/distill/priors.py). On the no-BN LeNet-5 the
# archive's pixels had mean / std 0.40 / 0.42 without it and 0.18 / 0.31 with it (MNIST: 0.13 / 0.31). Chosen on a
# validation split over no-BN teachers and three seeds (BENCHMARKS.md, "A preset for teachers
# without BatchNorm").
PRESETS["dfq_input"] = PRESETS["dfq"] | {"weights": {"onehot": 1.0, "entropy": 1.0, "adv": 1.0, "input": 1.0}}


NO_BN_PRESET = "dfq_input"  # the preset for teachers without readable BN statistics, chosen in BENCHMARKS.md


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
    try:
        teacher = load_teachers(teacher_path, input_spec=input_spec)  # the rule does not change has_bn
    except (UserError, OSError, ValueError):
        return DistillConfig.preset, ""
    if teacher.has_bn:
        return DistillConfig.preset, ""
    return NO_BN_PRESET, (f"note: {teacher.no_bn_reason or 'the teacher has no BatchNorm statistics'}; using the "
                          f"{NO_BN_PRESET!r} preset, the default for such teachers (pass --preset to choose another)")

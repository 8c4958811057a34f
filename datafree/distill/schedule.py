"""A round's schedule fitted to the teacher's cost: how many student steps each synthesis step buys.

A round is one synthesis step (generator forward, teacher forward and backward, the student's
forward for the adversarial term) followed by ``student_steps`` KD steps on pool samples. The
preset's ``student_steps`` was set on a LeNet-5 teacher, where a synthesis step costs a few
student steps. With a teacher 100x as expensive a synthesis step costs dozens of student steps
(which reuse the pool's stored teacher logits when nothing changes the images), so the same
count leaves the student starved: most of the budget goes to synthesis.

:func:`fit_schedule` measures both steps on throw-away copies at start-up and sets the number of
student steps so that the student gets ``student_share`` of each round's time, never fewer steps
than the preset asks for and never more than ``max_student_steps``; the pool grows with it so
that more steps do not mean more repeats of the same samples. What was measured and chosen goes
to ``summary.json`` and the report.

Example:
    >>> choose_student_steps(synth_s=0.30, student_s=0.02, share=0.5, floor=5, cap=40)
    15
    >>> choose_student_steps(synth_s=0.05, student_s=0.02, share=0.5, floor=5, cap=40)
    5
"""
from __future__ import annotations

import copy
import time

import torch

from datafree.base.precision import synchronize

ROUNDED_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80)


def choose_student_steps(synth_s: float, student_s: float, share: float, floor: int, cap: int) -> int:
    """Student steps per round so that they take ``share`` of the round, rounded down to a coarse
    ladder (small timing noise then rarely changes the choice), clamped to ``[floor, cap]``."""
    wanted = synth_s * share / max(1e-9, (1 - share)) / max(student_s, 1e-9)
    ladder = [s for s in ROUNDED_STEPS if s <= wanted] or [ROUNDED_STEPS[0]]
    return int(min(cap, max(floor, ladder[-1])))


def _timed(fn, repeats: int, device="cpu") -> float:
    """The fastest of ``repeats`` calls of ``fn`` after a warm-up, each waiting for the device's
    queued work (a CUDA step returns before its kernels are done)."""
    fn()  # warm-up (allocations, kernel selection)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure_costs(module, repeats: int = 3) -> dict:
    """Seconds for one synthesis step, one teacher forward of a student batch, and one student
    step (with and without re-labelling), measured on copies of the generator and the student
    with a private random generator: the run itself is not changed by measuring it."""
    from datafree.distill.losses import kd_loss

    cfg, teacher = module.cfg, module.teacher
    student, generator = copy.deepcopy(module.student), copy.deepcopy(module.generator)
    synth = copy.copy(module.synth)
    synth.generator = generator
    synth.bn_prior = copy.deepcopy(module.synth.bn_prior)
    rng = torch.Generator().manual_seed(12345)
    device = next(student.parameters()).device
    x = torch.randn(cfg.student_batch, *teacher.input_shape, generator=rng).to(device)
    t = module.teacher_logits(x)

    def synth_step():
        images, targets = synth.sample(cfg.batch_size, rng)
        loss, _ = synth.losses(images, targets, student)
        if loss.requires_grad:
            loss.backward()
        generator.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)

    def student_step(relabel: bool):  # a re-labelled step pays for the augmentation and the teacher pass
        inputs = module.augment(x) if relabel and module.augment is not None else x
        logits = module.teacher_logits(inputs) if relabel else t
        p = module.student_precision
        with p.autocast(device.type):
            s_logits = student(p.images(inputs))
        kd_loss(s_logits.float(), logits.detach(), cfg.kd_temperature).backward()
        student.zero_grad(set_to_none=True)

    torch_state = torch.get_rng_state()
    try:
        synth.on_reset()  # soft targets for a pixel batch (ZSKD), when the preset uses them
        costs = {"synthesis_step_s": _timed(synth_step, repeats, device),
                 "student_step_s": _timed(lambda: student_step(False), repeats, device),
                 "student_step_relabel_s": _timed(lambda: student_step(True), repeats, device)}
    finally:
        torch.set_rng_state(torch_state)
    costs["teacher_forward_s"] = _timed(lambda: module.teacher_logits(x), repeats, device)
    return {k: round(v, 5) for k, v in costs.items()}


def fit_schedule(module) -> dict:
    """Measure, choose ``student_steps`` and the pool size, and return the record of the choice.

    The module's config is not changed; the caller applies ``student_steps`` and ``pool_size``.
    """
    cfg = module.cfg
    costs = measure_costs(module)
    relabels = cfg.augment or cfg.mixup > 0
    per_student_step = costs["student_step_relabel_s"] if relabels else costs["student_step_s"]
    synth_s = costs["synthesis_step_s"] * cfg.synth_steps
    steps = choose_student_steps(synth_s, per_student_step, cfg.student_share, cfg.student_steps, cfg.max_student_steps)
    pool = max(cfg.pool_size, steps * cfg.student_batch)
    return {"mode": "auto", "measured": costs, "student_share": cfg.student_share,
            "student_steps": steps, "preset_student_steps": cfg.student_steps,
            "pool_size": pool, "preset_pool_size": cfg.pool_size,
            "estimated_round_s": round(synth_s + steps * per_student_step, 4)}

"""The teacher-cost-aware schedule, and tensors that follow the module's device."""
import json

import pytest
import torch

from conftest import TEACHERS
from datafree.base.errors import UserError
from datafree.distill.job import run_distill
from datafree.distill.module import mixup
from datafree.distill.presets import PRESETS, resolve_distill_config
from datafree.distill.schedule import ROUNDED_STEPS, choose_student_steps
from datafree.distill.synthesis import Synthesizer
from datafree.teachers.formats import load_teacher
from generators import create_generator

BN_TEACHER = str(TEACHERS / "mnist_lenet5.safetensors")
TINY = {"steps": 4, "batch_size": 32, "student_batch": 32, "student_steps": 2, "pool_size": 64, "eval_every": 2,
        "checkpoint_every": 2, "grid_every": 0, "holdout_every": 3, "generator_kwargs": {"latent_dim": 16, "width": 8}}


@pytest.mark.parametrize("synth_s, student_s, share, expected", [
    (0.30, 0.02, 0.5, 15),   # an expensive synthesis step buys 15 student steps
    (0.05, 0.02, 0.5, 5),    # a cheap one: the preset's floor
    (3.00, 0.01, 0.5, 40),   # a very expensive one: the cap
    (0.30, 0.02, 0.75, 40),  # share 3/4: 45 wanted, capped
    (0.10, 0.01, 0.25, 5),   # share 1/4: 3.3 wanted, the floor wins
])
def test_student_steps_follow_the_measured_costs(synth_s, student_s, share, expected):
    assert choose_student_steps(synth_s, student_s, share, floor=5, cap=40) == expected


def test_the_choice_is_stable_under_timing_noise():
    """Costs 3% either side of 16.5 steps land on the same rung (15) of the ladder."""
    choices = {choose_student_steps(0.33 * f, 0.02, 0.5, floor=1, cap=80) for f in (0.97, 1.0, 1.03)}
    assert choices == {15}
    assert all(a < b for a, b in zip(ROUNDED_STEPS, ROUNDED_STEPS[1:]))


def test_auto_schedule_is_measured_recorded_and_kept_on_resume(tmp_path):
    cfg = resolve_distill_config("dfq", overrides={"teacher": BN_TEACHER, "out": str(tmp_path / "run"), **TINY, "schedule": "auto"})
    summary = run_distill(cfg, progress=False)
    schedule = summary["schedule"]
    assert schedule["mode"] == "auto" and schedule["preset_student_steps"] == 2
    assert set(schedule["measured"]) == {"synthesis_step_s", "student_step_s", "student_step_relabel_s", "teacher_forward_s"}
    assert all(v > 0 for v in schedule["measured"].values())
    assert 2 <= schedule["student_steps"] <= cfg.max_student_steps
    assert schedule["pool_size"] == max(64, schedule["student_steps"] * 32)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())["schedule"]
    assert on_disk == schedule
    assert "student steps per round" in (tmp_path / "run" / "report.html").read_text()
    # a resume with more steps keeps the first choice instead of measuring again
    resumed = run_distill(resolve_distill_config(yaml_path=tmp_path / "run" / "config.yaml", overrides={"steps": 6}),
                          resume=True, progress=False)
    assert resumed["schedule"] == schedule and resumed["steps"] == 6


def test_fixed_schedule_keeps_the_preset(tmp_path):
    cfg = resolve_distill_config("dfq", overrides={"teacher": BN_TEACHER, "out": str(tmp_path / "run"), **TINY, "schedule": "fixed"})
    assert run_distill(cfg, progress=False)["schedule"] == {"mode": "fixed", "student_steps": 2, "pool_size": 64}


@pytest.mark.parametrize("overrides, message", [
    ({"schedule": "fast"}, "unknown schedule"),
    ({"student_share": 1.0}, "student_share"),
    ({"max_student_steps": 1, "student_steps": 5}, "max_student_steps"),
])
def test_bad_schedule_settings(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_distill_config("dfq", overrides={"teacher": BN_TEACHER, **overrides})


# --- device: every tensor the loop makes follows the module's device ----------------------------
# The meta device stands in for a GPU: a CPU tensor combined with a meta tensor raises, as a CPU
# tensor combined with a CUDA tensor does.


def test_mixup_follows_the_images_device():
    x = torch.ones(8, 1, 4, 4, device="meta")
    assert mixup(x, torch.Generator().manual_seed(0)).device.type == "meta"


def test_mixup_is_a_convex_mix_of_two_images():
    x = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(6)])
    mixed = mixup(x, torch.Generator().manual_seed(0))
    assert mixed.min() >= 0 and mixed.max() <= 5
    assert not torch.equal(mixed, x)
    assert torch.allclose(mixed.mean((1, 2, 3)), mixed[:, 0, 0, 0])  # one weight per image


@pytest.mark.parametrize("generator", ["dcgan", "conditional"])
def test_synthesizer_samples_on_the_generators_device(generator):
    cfg = resolve_distill_config("dfq", overrides={"teacher": BN_TEACHER, "generator": generator})
    teacher = load_teacher(BN_TEACHER)
    gen = create_generator(generator, 1, 28, 10, latent_dim=8, width=4).to("meta")
    images, targets = Synthesizer(teacher, gen, cfg).sample(6, torch.Generator().manual_seed(0))
    assert images.device.type == "meta"
    assert targets is None or targets.device.type == "meta"


# --- the no-BN path: ZSKD soft targets and the automatic preset -----------------------------------

NOBN_TEACHER = str(TEACHERS / "mnist_lenet5_nobn.safetensors")


def test_class_similarity_comes_from_the_final_layer():
    teacher = load_teacher(NOBN_TEACHER)
    sim = teacher.class_similarity()
    w = torch.nn.functional.normalize(teacher.module.head.weight, dim=1)
    raw = w @ w.T
    expected = (raw - raw.min(1, keepdim=True).values) / (raw.max(1, keepdim=True).values - raw.min(1, keepdim=True).values)
    assert sim.shape == (10, 10) and torch.allclose(sim, expected, atol=1e-6)
    assert torch.allclose(sim.diagonal(), torch.ones(10))


def test_class_similarity_of_an_exported_teacher_equals_the_zoo_one(tmp_path):
    from datafree.outputs.export import export_program

    teacher = load_teacher(NOBN_TEACHER)
    export_program(teacher.module, teacher.spec, tmp_path / "t.pt2")
    export_program(teacher.module, teacher.spec, tmp_path / "t.ts")
    for name in ("t.pt2", "t.ts"):
        assert torch.allclose(load_teacher(tmp_path / name).class_similarity(), teacher.class_similarity(), atol=1e-6), name


def test_dirichlet_targets_are_distributions_at_two_scales():
    from datafree.distill.priors import dirichlet_targets

    torch.manual_seed(0)
    sim = load_teacher(NOBN_TEACHER).class_similarity()
    classes = torch.arange(400) % 10
    t = dirichlet_targets(classes, sim)
    assert t.shape == (400, 10) and torch.allclose(t.sum(1), torch.ones(400), atol=1e-5) and (t >= 0).all()
    # beta 0.1 (second half) gives spikier targets than beta 1.0 (first half)
    assert t[200:].max(1).values.mean() > t[:200].max(1).values.mean() + 0.1


def test_soft_prior_lowers_the_gap_to_its_targets():
    """The ZSKD prior is minimised when the teacher's tempered softmax equals the soft target."""
    from datafree.distill.priors import SynthesisBatch, soft_target

    target = torch.softmax(torch.randn(4, 10), 1)
    matched = SynthesisBatch(torch.zeros(4, 1, 2, 2), torch.log(target) * 20, soft_targets=target)
    other = SynthesisBatch(torch.zeros(4, 1, 2, 2), torch.randn(4, 10) * 20, soft_targets=target)
    assert soft_target(matched) < soft_target(other)


def test_soft_prior_needs_the_pixels_generator():
    with pytest.raises(UserError, match="pixels generator"):
        resolve_distill_config("dfq", overrides={"teacher": BN_TEACHER, "weights": {"soft": 1.0}})


def test_a_teacher_without_bn_gets_the_no_bn_preset_and_a_note(tmp_path):
    from datafree.distill.presets import NO_BN_PRESET

    bn = resolve_distill_config(overrides={"teacher": BN_TEACHER})
    assert bn.preset == "dfq" and bn.preset_note == ""
    nobn = resolve_distill_config(overrides={"teacher": NOBN_TEACHER})
    assert nobn.preset == NO_BN_PRESET and "no BatchNorm" in nobn.preset_note and "--preset" in nobn.preset_note
    named = resolve_distill_config("fast", overrides={"teacher": NOBN_TEACHER})
    assert named.preset == "fast" and named.preset_note == ""  # a preset the user names is kept
    notes = []
    pixels = PRESETS[NO_BN_PRESET]["generator"] == "pixels"
    cfg = resolve_distill_config(overrides={"teacher": NOBN_TEACHER, "out": str(tmp_path / "run"), **TINY, "schedule": "fixed"}
                                 | ({"reset_every": 2, "generator_kwargs": {}} if pixels else {}))
    run_distill(cfg, progress=False, notify=notes.append)
    assert notes[0] == nobn.preset_note
    # the no-BN preset's own terms all apply to this teacher: no further note that one was switched off
    assert not any(n.startswith("note:") for n in notes[1:]), notes
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["kind"] == "round")
    assert all(f"loss_{k}" in first for k, w in PRESETS[NO_BN_PRESET]["weights"].items() if w)


def test_zskd_run_resumes_with_the_same_soft_targets(tmp_path, monkeypatch):
    """A pixel batch's soft targets are part of the checkpoint: a zskd run stopped in the middle of a
    batch and resumed equals an uninterrupted one."""
    from safetensors.torch import load_file

    from datafree.distill.job import RunControl

    base = {"teacher": NOBN_TEACHER, **TINY, "schedule": "fixed", "generator_kwargs": {}, "reset_every": 2, "steps": 6,
            "checkpoint_every": 3, "eval_every": 3}
    run_distill(resolve_distill_config("zskd", overrides={**base, "out": str(tmp_path / "whole")}), progress=False)
    original = RunControl.on_train_batch_end

    def stop_after_round_3(self, trainer, pl_module, *args):
        original(self, trainer, pl_module, *args)
        if pl_module.rounds == 3:  # the second pixel batch is half optimised
            self.stop_requested = trainer.should_stop = True

    cfg = resolve_distill_config("zskd", overrides={**base, "out": str(tmp_path / "part")})
    monkeypatch.setattr(RunControl, "on_train_batch_end", stop_after_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, progress=False)
    monkeypatch.setattr(RunControl, "on_train_batch_end", original)
    run_distill(cfg, resume=True, progress=False)
    a, b = load_file(tmp_path / "whole" / "student.safetensors"), load_file(tmp_path / "part" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""The data-free engine on tiny settings: presets, fallbacks, resume, real-data guard, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TEACHERS
from datafree.base.errors import UserError
from datafree.data.datasets import dataset_spec
from datafree.distill.job import RunControl, run_distill
from datafree.distill.presets import PRESETS, resolve_distill_config
from datafree.distill.synthesis import SamplePool, Synthesizer
from datafree.models.zoo import create_model
from datafree.outputs.export import export_program
from datafree.teachers.formats import load_model, load_teacher, save_model
from generators import GENERATORS, create_generator

BN_TEACHER = str(TEACHERS / "mnist_lenet5.safetensors")
NOBN_TEACHER = str(TEACHERS / "mnist_lenet5_nobn.safetensors")
TINY = {"steps": 6, "batch_size": 32, "student_batch": 32, "student_steps": 2, "pool_size": 512, "eval_every": 3, "schedule": "fixed",
        "checkpoint_every": 3, "grid_every": 3, "holdout_every": 3, "generator_kwargs": {"latent_dim": 16, "width": 8},
        "final_share": 0, "final_pool": 96,  # the student-only last share has its own tests
        "precision": "fp32"}  # runs compared for equality: no measured layout choice (auto has its own tests)


def tiny_config(tmp_path, preset="fast", **overrides):
    values = {"teacher": BN_TEACHER, "out": str(tmp_path / "run"), **TINY, **overrides}
    if PRESETS.get(overrides.get("preset", preset), {}).get("generator") == "pixels":
        values["generator_kwargs"] = {}
        values.setdefault("reset_every", 2)  # finish a pixel batch every 2 rounds so the pool fills
    return resolve_distill_config(preset=preset, overrides=values)


def test_a_time_budget_alone_sets_no_round_cap(tmp_path, monkeypatch):
    """``--time-budget 10m`` without ``--steps`` runs for 10 minutes, not for the default rounds."""
    monkeypatch.setattr("datafree.distill.config.DEFAULT_ROUNDS", 3)
    budgeted = tiny_config(tmp_path / "budgeted", steps=None, time_budget="3s")  # None: not given
    assert budgeted.round_cap() is None
    assert run_distill(budgeted, progress=False)["steps"] > 3
    assert run_distill(tiny_config(tmp_path / "default", steps=None), progress=False)["steps"] == 3
    assert tiny_config(tmp_path / "both", steps=7, time_budget="1h").round_cap() == 7


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_make_images_in_0_1(name):
    g = create_generator(name, channels=3, size=32, num_classes=5, **({"batch_size": 4} if name == "pixels" else {"latent_dim": 8, "width": 4}))
    z = torch.randn(4, getattr(g, "latent_dim", 0) or 1)
    x = g(z, torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_lowers_its_synthesis_loss(preset, tmp_path):
    """With the student held fixed, a few generator steps lower the preset's weighted prior loss."""
    cfg = tiny_config(tmp_path, preset, batch_size=64)
    torch.manual_seed(0)
    teacher = load_teacher(cfg.teacher)
    kwargs = {"batch_size": 64} if cfg.generator == "pixels" else cfg.generator_kwargs
    generator = create_generator(cfg.generator, 1, 28, 10, **kwargs)
    synth = Synthesizer(teacher, generator, cfg)
    student = create_model("lenet5_half").eval()
    # the preset's own learning rate and the generator optimiser DistillModule.configure_optimizers uses
    opt = torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(64, getattr(generator, "latent_dim", 0) or 1, generator=rng)
    classes = torch.arange(64) % 10

    def loss_on_fixed_batch():
        if synth.is_pixels:
            images, targets = teacher.spec.normalize(generator()), generator.targets
        else:
            targets = classes if generator.conditional else None
            images = teacher.spec.normalize(generator(z, targets))
        synth.bn_prior.previous = {}
        return synth.losses(images, targets, student)[0]

    generator.train()
    before = loss_on_fixed_batch().item()
    for _ in range(15):
        loss = loss_on_fixed_batch()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_on_fixed_batch().item() < before


@pytest.mark.parametrize("preset", ["dfq", "fast"])  # stored pool logits; augmented + mixed-up samples re-labelled
def test_student_steps_lower_the_kd_loss_on_a_fixed_pool(preset, tmp_path):
    """DistillModule._student_step (outside a Trainer) with the module's own student optimiser lowers the KD loss on the pool."""
    from datafree.distill.losses import kd_loss
    from datafree.distill.module import DistillModule

    cfg = tiny_config(tmp_path, preset)
    teacher = load_teacher(BN_TEACHER)
    kwargs = {"batch_size": 32} if cfg.generator == "pixels" else cfg.generator_kwargs
    generator = create_generator(cfg.generator, 1, 28, 10, **kwargs)
    module = DistillModule(teacher, create_model("lenet5_half"), generator, cfg)
    assert module._trainer is None
    x = torch.randn(256, 1, 28, 28)
    with torch.no_grad():
        t = teacher(x)
    module.pool.add(x, t)
    opt_s = module.configure_optimizers()[1]

    def pool_loss():
        module.student.eval()
        with torch.no_grad():
            loss = kd_loss(module.student(x), t, cfg.kd_temperature, cfg.kd_alpha, cfg.student_loss).item()
        module.student.train()
        return loss

    first = pool_loss()
    before = [p.detach().clone() for p in module.student.parameters()]
    for _ in range(60):
        step_loss = module._student_step(opt_s)
    assert step_loss.requires_grad is False and torch.isfinite(step_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    assert pool_loss() < 0.5 * first


def test_pool_is_bounded_and_round_trips():
    pool = SamplePool(capacity=100)
    for i in range(5):
        pool.add(torch.full((40, 1, 2, 2), float(i)), torch.full((40, 3), float(i)))
    assert len(pool) == 100
    images, _ = pool.contents()
    assert set(images.flatten().tolist()) == {2.0, 3.0, 4.0}  # the oldest batches were dropped
    copy = SamplePool(100)
    copy.load_state_dict(pool.state_dict())
    assert torch.equal(copy.contents()[0], images) and copy.cursor == pool.cursor


def test_a_uniform_pool_keeps_every_stage_of_the_run_and_round_trips():
    newest, uniform = SamplePool(capacity=100), SamplePool(capacity=100, keep="uniform")
    rng = torch.Generator().manual_seed(0)
    for i in range(50):  # 500 samples, batch i holds the value i
        batch = torch.full((10, 1, 2, 2), float(i))
        newest.add(batch, torch.zeros(10, 3))
        uniform.add(batch, torch.zeros(10, 3), rng)
    assert len(uniform) == 100 and uniform.seen == 500
    assert newest.contents()[0].min() == 40  # the ring buffer holds the last 10 batches only
    values = uniform.contents()[0][:, 0, 0, 0]
    early = int((values < 25).sum())  # binomial(100, 0.5) under a uniform sample: 50 +- 5
    assert 30 <= early <= 70, early
    copy = SamplePool(100, keep="uniform")
    copy.load_state_dict(uniform.state_dict())
    assert torch.equal(copy.contents()[0], uniform.contents()[0]) and copy.seen == 500 and copy.keep == "uniform"
    with pytest.raises(ValueError, match="needs rng"):
        copy.add(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3))


def test_a_run_writes_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path)
    summary = run_distill(cfg, progress=False)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "student.json", "student.pt2", "generator.safetensors",
                 "transfer.safetensors", "manifest.json", "summary.json", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name
    assert list((out / "grids").glob("step_*.png"))
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["kind"] == "round"]
    assert {"loss_bn", "loss_onehot", "loss_adv", "bn_per_layer", "class_histogram", "pool_size"} <= set(rounds[0])
    assert len(rounds[0]["bn_per_layer"]) == 4 and sum(rounds[0]["class_histogram"]) == 32
    assert any(r["kind"] == "eval" and "holdout_agreement" in r for r in records)
    transfer = load_file(out / "transfer.safetensors")
    assert transfer["images"].shape[1:] == (1, 28, 28) and transfer["teacher_logits"].shape[1] == 10
    assert summary["steps"] == 6
    # the reported held-out agreement is the saved student's, re-measured here on the saved held-out samples
    held = load_file(out / "holdout.safetensors")
    assert held["images"].shape[1:] == (1, 28, 28) and len(held["images"]) == len(held["teacher_logits"]) > 0
    student, card = load_model(out / "student.safetensors")
    with torch.no_grad():
        predicted = student.eval()(held["images"]).argmax(1)
    measured = (predicted == held["teacher_logits"].argmax(1)).float().mean().item() * 100
    assert summary["holdout_agreement"] == pytest.approx(measured, abs=0.01)
    assert card["holdout_agreement"] == summary["holdout_agreement"] and card["selected_step"] == summary["selected_step"]
    # the student program is self-contained: [0, 1] images in, logits out
    program = torch.export.load(str(out / "student.pt2")).module()
    assert program(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_same_seed_same_student(tmp_path):
    a = run_distill(tiny_config(tmp_path / "a"), progress=False)
    b = run_distill(tiny_config(tmp_path / "b"), progress=False)
    wa, wb = load_file(tmp_path / "a/run/student.safetensors"), load_file(tmp_path / "b/run/student.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["holdout_agreement"] is not None and a["holdout_agreement"] == b["holdout_agreement"]


@pytest.mark.parametrize("snapshots, final, expected", [
    ([(3, "a"), (6, "b")], "c", (6, "b")),   # the snapshot the teacher's labels came from wins
    ([(3, "b"), (6, "a")], "b", (9, "b")),   # a tie: the later step (here the final student) wins
    ([(3, "b"), (6, "b")], "a", (6, "b")),   # a tie between snapshots: the later one
    ([(3, "c"), (6, "a")], "b", (9, "b")),   # the final student can win too
    ([(3, "a"), (6, "c")], "a", None),       # none matches exactly: the higher of a and c (which one, measured below)
    ([(0, "b"), (3, "a"), (6, "c")], "a", (0, "b")),  # the student as it started (round 0) wins when training made it worse
    ([(0, "a"), (3, "b")], "c", (3, "b")),   # ... and loses when it did not
])
def test_select_best_keeps_the_snapshot_with_the_highest_holdout_agreement(tmp_path, snapshots, final, expected):
    """DistillModule.select_best loads the snapshot that agrees most with the held-out teacher labels (ties: the later step)."""
    from datafree.distill.module import DistillModule
    from datafree.models.inference import agreement

    cfg = tiny_config(tmp_path, "dfq")
    teacher = load_teacher(BN_TEACHER)
    states = {}
    for seed, name in enumerate("abc"):
        torch.manual_seed(seed)
        states[name] = {k: v.clone() for k, v in create_model("lenet5_half").state_dict().items()}
    module = DistillModule(teacher, create_model("lenet5_half"), create_generator(cfg.generator, 1, 28, 10, **cfg.generator_kwargs), cfg)
    images = torch.randn(256, 1, 28, 28)
    module.student.load_state_dict(states["b"])
    labels = module.student.eval()(images).detach()  # held-out "teacher logits" that "b" matches exactly
    module.holdout.add(images, labels)
    scores = {"b": 100.0}
    for name in "ac":  # the others really disagree with them somewhere
        module.student.load_state_dict(states[name])
        scores[name] = agreement(module.student, images, labels)
    assert scores["a"] < 100 and scores["c"] < 100 and scores["a"] != scores["c"]
    if expected is None:
        expected = (6, "c") if scores["c"] > scores["a"] else (9, "a")
    module.start_snapshot = next(((step, states[name]) for step, name in snapshots if step == 0), None)
    module.snapshots = [(step, states[name]) for step, name in snapshots if step > 0]
    module.student.load_state_dict(states[final])
    module.rounds = 9
    step, score = module.select_best()
    assert (step, score) == (expected[0], scores[expected[1]])
    kept = module.student.state_dict()
    assert all(torch.equal(kept[k], states[expected[1]][k]) for k in kept)  # the winner is loaded into the student


@pytest.mark.real_data
def test_real_test_data_does_not_change_the_student(tmp_path):
    """A run with eval_data writes a byte-identical student.safetensors to one without: real data is report only."""
    plain = run_distill(tiny_config(tmp_path / "plain"), progress=False)
    evaluated = run_distill(tiny_config(tmp_path / "eval", eval_data="mnist"), progress=False)
    assert "student_test_accuracy" not in plain and "student_test_accuracy" in evaluated
    assert (tmp_path / "plain/run/student.safetensors").read_bytes() == (tmp_path / "eval/run/student.safetensors").read_bytes()
    assert plain["selected_step"] == evaluated["selected_step"] and plain["holdout_agreement"] == evaluated["holdout_agreement"]


@pytest.mark.parametrize("overrides", [{"synth_steps": 1, "meta_rate": 0.5}, {"preset": "fast", "meta_rate": 0.5}])
def test_meta_rate_without_several_generator_updates_is_refused(overrides):
    """One update a round, or a pixel batch, has no adapted generator to keep a share of."""
    fields = {k: v for k, v in overrides.items() if k != "preset"}  # the parameter itself stays as given
    with pytest.raises(UserError, match="meta_rate"):
        resolve_distill_config(overrides.get("preset", "dfq"), overrides={"teacher": BN_TEACHER, **fields})


@pytest.mark.parametrize("meta_rate", [0.5, 0.25])
def test_meta_rate_keeps_that_share_of_a_rounds_generator_updates(tmp_path, meta_rate):
    """Fast-DFKD's meta generator: after a round of synth_steps updates the generator sits
    meta_rate of the way from where the round started to where the updates took it (1: all of it)."""
    from datafree.distill.module import DistillModule

    def round_from(state, rate):
        torch.manual_seed(0)
        cfg = tiny_config(tmp_path, "dfq", synth_steps=3, meta_rate=rate)
        generator = create_generator(cfg.generator, 1, 28, 10, **cfg.generator_kwargs)
        generator.load_state_dict(state)
        module = DistillModule(load_teacher(BN_TEACHER), create_model("lenet5_half"), generator, cfg, notify=lambda m: None)
        opt = torch.optim.Adam(generator.parameters(), lr=1e-2)
        module._synthesis_step(0, opt)
        return [p.detach().clone() for p in generator.parameters()], len(module.pool) + len(module.holdout)

    cfg = tiny_config(tmp_path, "dfq")
    start = create_generator(cfg.generator, 1, 28, 10, **cfg.generator_kwargs).state_dict()
    start = {k: v.clone() for k, v in start.items()}
    adapted, _ = round_from(start, 1.0)
    kept, made = round_from(start, meta_rate)
    assert made == cfg.batch_size  # the round's batch entered the pool (or the held-out set) either way
    names = [name for name, _ in create_generator(cfg.generator, 1, 28, 10, **cfg.generator_kwargs).named_parameters()]
    before = [start[name] for name in names]
    assert any(not torch.equal(a, b) for a, b in zip(adapted, before))  # the updates moved it
    for p0, p1, p in zip(before, adapted, kept):
        assert torch.allclose(p, p0 + meta_rate * (p1 - p0), atol=1e-6)


def test_student_ema_is_the_moving_average_of_the_steps_and_is_what_is_kept(tmp_path):
    """With student_ema d, the kept student is d * average + (1 - d) * weights after each step (the
    first step copied), not the raw weights; snapshots and selection use it."""
    from datafree.distill.module import DistillModule

    cfg = tiny_config(tmp_path, "dfq", student_ema=0.5)
    teacher = load_teacher(BN_TEACHER)
    module = DistillModule(teacher, create_model("lenet5_half"), create_generator(cfg.generator, 1, 28, 10, **cfg.generator_kwargs), cfg)
    module.pool.add(torch.randn(64, 1, 28, 28), torch.randn(64, 10))
    opt = torch.optim.SGD(module.student.parameters(), lr=0.5)
    raw = []
    for _ in range(2):
        module._student_step(opt)
        raw.append({k: v.detach().clone() for k, v in module.student.named_parameters()})
    kept = dict(module.kept_student().named_parameters())
    for name, value in kept.items():
        assert torch.allclose(value, 0.5 * raw[0][name] + 0.5 * raw[1][name], atol=1e-6), name
    assert any(not torch.equal(kept[k], raw[1][k]) for k in kept)
    module._evaluate(0)
    assert all(torch.equal(module.snapshots[-1][1][k], v) for k, v in module.kept_student().state_dict().items())


@pytest.mark.parametrize("extra", [{}, {"student_ema": 0.9}, {"preset": "dfq", "final_share": 0.7},
                                   {"preset": "dfq", "final_share": 0.4, "archive_keeps": "uniform", "final_pool": 40}],
                         ids=["plain", "ema", "in-the-last-share", "uniform-archive"])
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, monkeypatch, extra):
    straight = tiny_config(tmp_path / "straight", **extra)
    run_distill(straight, progress=False)

    original = RunControl.on_train_batch_end

    def interrupt_after_round_3(self, trainer, pl_module, *args):
        original(self, trainer, pl_module, *args)
        if pl_module.rounds == 3:
            self.stop_requested = True
            trainer.should_stop = True

    interrupted = tiny_config(tmp_path / "resumed", **extra)
    monkeypatch.setattr(RunControl, "on_train_batch_end", interrupt_after_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(interrupted, progress=False)
    assert not (tmp_path / "resumed/run/student.safetensors").exists()
    monkeypatch.setattr(RunControl, "on_train_batch_end", original)
    run_distill(interrupted, resume=True, progress=False)

    a = load_file(tmp_path / "straight/run/student.safetensors")
    b = load_file(tmp_path / "resumed/run/student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = load_file(tmp_path / "straight/run/generator.safetensors"), load_file(tmp_path / "resumed/run/generator.safetensors")
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed/run/metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "round"]
    assert steps == sorted(set(steps))  # no duplicated rounds in the log after the resume


def test_the_last_share_trains_the_student_only_on_the_archive_of_synthesised_batches(tmp_path, monkeypatch):
    from datafree.distill.module import DistillModule

    at_switch = {}
    original = DistillModule._start_final_share

    def remember(self, step):
        at_switch["generator"] = {k: v.clone() for k, v in self.generator.state_dict().items()}
        at_switch["student"] = {k: v.clone() for k, v in self.student.state_dict().items()}
        original(self, step)

    monkeypatch.setattr(DistillModule, "_start_final_share", remember)
    cfg = tiny_config(tmp_path, preset="dfq", final_share=0.5, holdout_every=0)  # no held-out set: the last student is kept
    summary = run_distill(cfg, progress=False)
    out = tmp_path / "run"
    assert summary["final_share"]["round"] == 3 and summary["final_share"]["pool_size"] == 96
    # the archive of the 3 synthesis rounds (3 x 32 images) is the last share's pool and the transfer set
    assert len(load_file(out / "transfer.safetensors")["images"]) == 96
    generator = load_file(out / "generator.safetensors")
    # the generator is frozen in the last share ...
    assert all(torch.equal(generator[k], v) for k, v in at_switch["generator"].items())
    # ... while the student kept learning there
    student = load_file(out / "student.safetensors")
    assert any(not torch.equal(student[k], v) for k, v in at_switch["student"].items())
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last_share = [r for r in records if r["kind"] == "round" and r["step"] > 3]
    assert last_share and not any("loss_bn" in r for r in last_share)
    assert [r["step"] for r in records if r["kind"] == "final_share"] == [3]


@pytest.mark.parametrize("augment,final_augment,expected", [(False, True, "last share only"), (True, False, "every round"),
                                                          (False, False, "never")])
def test_final_augment_augments_only_the_student_only_last_share(tmp_path, monkeypatch, augment, final_augment, expected):
    """With final_augment the rounds before the last share keep their un-augmented (cheap) student steps."""
    import datafree.distill.module as student_mod

    augmented_rounds = []
    real_augment = student_mod.student_augment

    def counting_augment():
        inner = real_augment()

        def apply(x):
            augmented_rounds.append(module_rounds[0])
            return inner(x)
        return apply

    module_rounds = [0]
    original_step = student_mod.DistillModule.training_step

    def step(self, batch, batch_idx):
        module_rounds[0] = self.rounds
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(student_mod, "student_augment", counting_augment)
    monkeypatch.setattr(student_mod.DistillModule, "training_step", step)
    cfg = tiny_config(tmp_path, preset="dfq", final_share=0.5, holdout_every=0, augment=augment, final_augment=final_augment)
    run_distill(cfg, progress=False)
    rounds = sorted(set(augmented_rounds))
    assert rounds == {"last share only": [3, 4, 5], "every round": [0, 1, 2, 3, 4, 5], "never": []}[expected]


def test_no_bn_teacher_falls_back_with_a_message(tmp_path):
    messages = []
    cfg = tiny_config(tmp_path, teacher=NOBN_TEACHER, steps=2)
    summary = run_distill(cfg, progress=False, notify=messages.append)
    assert any("no BatchNorm" in m and "onehot" in m for m in messages)
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert "loss_bn" not in first and "loss_onehot" in first
    assert summary["steps"] == 2


def test_torchscript_teacher_makes_bn_presets_fall_back_with_a_note(tmp_path):
    """TorchScript hides the BN layers: a BN preset goes on without its BN term and says what to send instead."""
    model = create_model("lenet5").eval()
    export_program(model, dataset_spec("mnist"), tmp_path / "t.ts", {"arch": "lenet5"})
    notes = []
    summary = run_distill(tiny_config(tmp_path, "dfq", teacher=str(tmp_path / "t.ts")), progress=False, notify=notes.append)
    assert summary["steps"] == 6
    assert any("TorchScript" in n and ".pt2" in n and "goes on with onehot, entropy, adv" in n for n in notes), notes
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_bn" not in r for r in records if r["kind"] == "round")


def test_distill_never_reads_real_data(tmp_path, monkeypatch):
    """Inside the training loop every real-data load raises; the run itself needs none."""
    import torchvision

    import datafree.data.datasets as data
    from datafree.distill.module import DistillModule

    calls = []
    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("read")))
    seen = []
    original = DistillModule.training_step

    def probing_step(self, batch, batch_idx):
        try:
            data.load_dataset("mnist", train=True)
        except RuntimeError as e:
            seen.append(str(e))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillModule, "training_step", probing_step)
    run_distill(tiny_config(tmp_path, steps=2), progress=False)
    assert calls == [] and len(seen) == 2 and all("data-free distillation" in s for s in seen)


@pytest.mark.parametrize("overrides,message", [
    ({"preset": "dreamy"}, "unknown preset"),
    ({"student": "lenet9"}, "unknown architecture"),
    ({"time_budget": "ten minutes"}, "cannot read the time budget"),
    ({"time_budget": "0"}, "must be positive"),  # not "no budget"
    ({"teacher": "missing.safetensors"}, "no teacher file"),
    ({"weights": {"bnn": 1.0}}, "unknown loss weight"),
    ({"generator": "vae"}, "unknown generator"),
])
def test_bad_input(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        cfg = tiny_config(tmp_path, **overrides)
        run_distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written for a mistake


def test_student_with_other_class_count_is_refused(tmp_path):
    spec = dataset_spec("mnist")
    spec.class_names = spec.class_names[:5]
    save_model(create_model("lenet5_half", num_classes=5), tmp_path / "s5.safetensors", "lenet5_half", spec)
    with pytest.raises(UserError, match="5 classes but the teacher has 10"):
        run_distill(tiny_config(tmp_path, student=str(tmp_path / "s5.safetensors")), progress=False)


def test_unknown_input_spec_teacher_is_refused(tmp_path):
    import warnings

    from datafree.outputs.export import PixelModel
    model = PixelModel(create_model("lenet5").eval(), dataset_spec("mnist")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), str(tmp_path / "bare.ts"))
    with pytest.raises(UserError, match="input spec.*unknown"):
        run_distill(tiny_config(tmp_path, "dfad", teacher=str(tmp_path / "bare.ts")), progress=False)
    summary = run_distill(tiny_config(tmp_path, "dfad", teacher=str(tmp_path / "bare.ts"), teacher_input_spec="1x28x28", steps=2),
                          progress=False)
    assert summary["steps"] == 2


def test_output_folder_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        run_distill(tiny_config(tmp_path), progress=False)
    assert (tmp_path / "run" / "mine.txt").read_text() == "precious"


def test_overwrite_starts_a_fresh_metrics_log(tmp_path):
    """A run with overwrite=True into a finished run's folder logs only its own rounds."""
    def logged():
        return [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())]

    run_distill(tiny_config(tmp_path, steps=3), progress=False)
    one_run = logged()
    assert one_run
    run_distill(tiny_config(tmp_path, steps=3), overwrite=True, progress=False)
    assert logged() == one_run


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "datafree.cli", "distill", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _resume_in_process(out, steps, capsys) -> dict:
    """``datafree distill --out OUT --resume --steps N`` through the command line's own ``main``, in this process (the
    killed or stopped run was a process of its own; its resume needs only what that run left on disk)."""
    from datafree.cli import main

    capsys.readouterr()
    assert main(["distill", "--out", str(out), "--resume", "--steps", str(steps), "--no-progress"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_kill_then_resume_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["--out", out, "--steps", 400, "--batch-size", 32, "--student-steps", 1, "--checkpoint-every", 2,
            "--eval-every", 2, "--no-eval", "--no-progress"]
    proc = _cli(*args)
    deadline = time.time() + 120
    while not (out / "checkpoints/last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints/last.ckpt").exists() and not (out / "summary.json").exists()
    saved = torch.load(out / "checkpoints/last.ckpt", weights_only=True)["datafree"]["rounds"]
    assert saved >= 2
    assert _resume_in_process(out, saved + 4, capsys)["steps"] == saved + 4


def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path, capsys):
    """Ctrl-C saves a checkpoint and exits 130; --resume goes on from the checkpoint's round (not round 0) and finishes."""
    out = tmp_path / "interrupted"
    proc = _cli("--out", out, "--steps", 400, "--batch-size", 32, "--student-steps", 1, "--checkpoint-every", 50,
                "--no-eval", "--no-progress")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in stderr and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    saved = int(torch.load(out / "checkpoints/last.ckpt", weights_only=True)["datafree"]["rounds"])
    assert saved >= 1
    before = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert before and all(r["step"] <= saved for r in before)  # nothing logged past the round it stopped at

    assert _resume_in_process(out, saved + 3, capsys)["steps"] == saved + 3
    after = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert after[:len(before)] == before  # the rounds before the Ctrl-C were kept, not recomputed
    rounds = [r["step"] for r in after if r["kind"] == "round"]
    # a run restarted from round 0 would log round 1 again; a resumed one goes on from the checkpoint's round
    assert rounds == sorted(set(rounds)) and rounds[-1] == saved + 3
    assert int(torch.load(out / "checkpoints/last.ckpt", weights_only=True)["datafree"]["rounds"]) == saved + 3


@pytest.mark.parametrize("length", [["--steps", 3], ["--time-budget", "4s", "--final-share", 0.5]], ids=["steps", "budget"])
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path, length):
    """With a time budget the ranks share one clock (rank 0's slowest-of-all elapsed time), so they switch to the
    last share and stop in the same round; ranks that disagreed would hang in a collective or drift apart."""
    out = tmp_path / "ddp"
    proc = _cli("--out", out, "--preset", "dfad", *length, "--batch-size", 32, "--student-steps", 2, "--accelerator", "cpu",
                "--devices", 2, "--strategy", "ddp", "--no-eval", "--no-progress", "--eval-every", 3)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    sync = [r for r in records if r["kind"] == "ddp_sync"]
    assert sync and sync[0]["world_size"] == 2 and len(set(sync[0]["student_checksums"])) == 1


def _mnist_with_a_smaller_test_split(root, count: int):
    """A data root whose MNIST test split is the real one's first ``count`` images (the training files are links to the
    real ones): the same files, loader and normalisation as ``mnist``, at a fraction of the evaluation's cost."""
    from datafree.data.datasets import data_root

    real, raw = data_root() / "MNIST" / "raw", root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).symlink_to(real / name)
    for name, header, size in (("t10k-images-idx3-ubyte", 16, 28 * 28), ("t10k-labels-idx1-ubyte", 8, 1)):
        data = (real / name).read_bytes()  # big-endian header: magic, count, (rows, columns); then the items
        (raw / name).write_bytes(data[:4] + count.to_bytes(4, "big") + data[8:header] + data[header:header + count * size])
    return root


@pytest.mark.real_data
def test_pt2_teacher_of_another_zoo_arch(tmp_path):
    """A resnet8 teacher handed over as .pt2 ([0, 1] inputs): BN taps work and the report evaluates in its space."""
    model = create_model("resnet8", 10, 1, 28)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 28, 28))
    export_program(model.eval(), dataset_spec("mnist"), tmp_path / "r8.pt2", {"arch": "resnet8"})
    data = _mnist_with_a_smaller_test_split(tmp_path / "data", 2000)  # the resnet8 teacher is slow on all 10,000
    summary = run_distill(tiny_config(tmp_path, teacher=str(tmp_path / "r8.pt2"), eval_data="mnist", data_dir=str(data)),
                          progress=False)
    assert summary["steps"] == 6
    # the reported accuracy is the saved student's, re-measured here on the (first 2,000 of the) real MNIST test set
    from datafree.data.datasets import InputSpec, load_dataset

    test = load_dataset("mnist", train=False, data_dir=data)
    assert len(test) == 2000 and torch.equal(test.images, load_dataset("mnist", train=False).images[:2000])
    student, card = load_model(tmp_path / "run/student.safetensors")
    spec = InputSpec.from_dict(card["input_spec"])
    assert spec.mean != test.spec.mean  # the .pt2 teacher (and so the student) takes [0, 1] pixels, not MNIST-normalised images
    with torch.no_grad():
        predicted = torch.cat([student.eval()(spec.normalize(test.spec.denormalize(x))) for x in test.images.split(2000)]).argmax(1)
    measured = (predicted == test.labels).float().mean().item() * 100
    assert summary["student_test_accuracy"] == pytest.approx(measured, abs=0.01)
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert len(first["bn_per_layer"]) == len(load_teacher(tmp_path / "r8.pt2").bn_names) > 0
    with pytest.raises(UserError, match="evaluation data 'cifar10' is 3x32x32"):
        run_distill(tiny_config(tmp_path, teacher=str(tmp_path / "r8.pt2"), eval_data="cifar10", out=str(tmp_path / "x")),
                    progress=False)


def test_a_stop_while_the_trainer_starts_still_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    """SIGTERM before the first round (Lightning's set-up) ends as a stop, not as Lightning's exit status 1:
    one round, a checkpoint, 130 and the --resume hint."""
    from datafree.cli import main

    def terminate_during_setup(self, trainer, pl_module, stage):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunControl, "setup", terminate_during_setup, raising=False)
    out = tmp_path / "stopped"
    code = main(["distill", "--out", str(out), "--steps", "50", "--batch-size", "32", "--student-steps", "1",
                 "--no-eval", "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 130 and "--resume" in stderr
    assert int(torch.load(out / "checkpoints/last.ckpt", weights_only=True)["datafree"]["rounds"]) == 1
    assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler  # the command put the handlers back


def test_the_stop_message_offers_resume_only_when_a_checkpoint_exists(tmp_path):
    from datafree.cli import interrupted_message

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert "nothing to resume" in interrupted_message(checkpoint) and "--resume" not in interrupted_message(checkpoint)
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    assert "--resume" in interrupted_message(checkpoint) and str(checkpoint) in interrupted_message(checkpoint)


def test_a_diverging_run_stops_and_keeps_a_finite_student(tmp_path):
    """A student rate that blows the loss up: the run stops at the first non-finite value, says so in its
    summary, and hands over the best finite student (here the one it started from)."""
    messages = []
    summary = run_distill(tiny_config(tmp_path, lr_student=1e12, steps=30), progress=False, notify=messages.append)
    assert summary["diverged"] is not None and summary["steps"] < 30
    assert any("diverged" in m for m in messages)
    weights = load_file(tmp_path / "run/student.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())

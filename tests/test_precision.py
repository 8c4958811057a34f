"""Precision and layout chosen by measurement, passes that follow their device, and the multi-process fixes."""
import time

import pytest
import torch

from conftest import TEACHERS
from datafree.base.errors import UserError
from datafree.base.precision import FP32, Precision, candidates, check_precision, choose
from datafree.data.augment import AugmentParams, SiameseAugment
from datafree.distill.module import DistillModule, rank_rng_state
from datafree.distill.presets import resolve_distill_config
from datafree.models.zoo import create_model
from datafree.teachers.formats import load_teacher
from generators import create_generator

BN_TEACHER = str(TEACHERS / "mnist_lenet5.safetensors")


def test_choose_keeps_the_fastest_and_fp32_on_a_tie(monkeypatch):
    """A candidate replaces fp32 only when it is clearly faster; one that fails is skipped and said."""
    import datafree.base.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_usable", lambda: True)  # as on a CPU with native bf16
    def step_costs(costs):
        def step(p: Precision):
            cost = costs[p.describe()]
            if cost is None:
                raise RuntimeError("no kernel for this dtype\nmore lines")
            time.sleep(cost)
        return step

    fast_bf16 = {"fp32": 0.02, "fp32 + channels_last": 0.02, "bf16": 0.02, "bf16 + channels_last": 0.004}
    chosen, measured = choose("auto", "cpu", step_costs(fast_bf16), repeats=2)
    assert chosen == Precision("bf16", channels_last=True) and measured["chosen"] == "bf16 + channels_last"
    tie = {"fp32": 0.01, "fp32 + channels_last": 0.0099, "bf16": None, "bf16 + channels_last": 0.03}
    chosen, measured = choose("auto", "cpu", step_costs(tie), repeats=2)
    assert chosen == FP32
    assert measured["failed"] == {"bf16": "no kernel for this dtype"} and "bf16 + channels_last" in measured["ms"]


def test_a_cpu_without_fast_bf16_times_fp32_layouts_only(monkeypatch):
    """Where a small bf16 matmul runs at under half the fp32 speed, auto does not spend the run's
    seconds timing whole networks in bf16; asked for explicitly, bf16 still runs."""
    import datafree.base.precision as precision

    probe = precision.cpu_bf16_usable()  # the real probe, on this CPU
    assert isinstance(probe, bool) and {"fp32_gflops", "bf16_gflops"} <= set(precision.BF16_PROBE)
    monkeypatch.setattr(precision, "cpu_bf16_usable", lambda: False)
    assert [p.describe() for p in candidates("auto", "cpu")] == ["fp32", "fp32 + channels_last"]
    assert candidates("bf16", "cpu") == [Precision("bf16")]  # asked for: run as it is, nothing timed


def test_precision_requests_a_device_cannot_run_are_one_sentence():
    with pytest.raises(UserError, match="fp16.*needs a CUDA device"):
        check_precision("fp16", "cpu")
    with pytest.raises(UserError, match="unknown precision 'fp64'"):
        check_precision("fp64", "cpu")
    assert [p.dtype for p in candidates("auto", "cuda")] == ["fp32", "fp32", "bf16", "bf16", "fp16", "fp16"]
    with pytest.raises(UserError, match="unknown precision"):
        resolve_distill_config(overrides={"teacher": BN_TEACHER, "precision": "fp64"})


def test_bf16_teacher_pass_gives_fp32_logits_and_fp32_bn_statistics():
    """Under bf16 autocast the convolutions run in 16 bits; what the losses read stays fp32 and close."""
    from datafree.distill.synthesis import Synthesizer

    cfg = resolve_distill_config(overrides={"teacher": BN_TEACHER})
    teacher = load_teacher(BN_TEACHER)
    synth = Synthesizer(teacher, create_generator("dcgan", 1, 28, 10, latent_dim=8, width=4), cfg, notify=lambda m: None)
    x = torch.randn(16, 1, 28, 28)
    _, exact = synth.teacher_pass(x)
    exact_taps = [t.mean for t in teacher.bn_taps()]
    synth.teacher_precision = Precision("bf16", channels_last=True)
    features, logits = synth.teacher_pass(x)
    taps = teacher.bn_taps()
    assert logits.dtype == features.dtype == torch.float32 and all(t.mean.dtype == t.var.dtype == torch.float32 for t in taps)
    assert torch.allclose(logits, exact, atol=0.5) and (logits.argmax(1) == exact.argmax(1)).float().mean() > 0.8
    assert all(torch.allclose(a, b.mean, atol=0.1) for a, b in zip(exact_taps, taps))
    loss, stats = synth.losses(x, None, create_model("lenet5_half"))
    assert loss.dtype == torch.float32
    assert all(torch.is_tensor(v) for k, v in stats.items() if k.startswith("loss_"))  # no host sync until logged


def test_a_bf16_run_records_what_ran(tmp_path):
    """--precision bf16 trains (slower on a CPU without native bf16, but it runs) and says so."""
    from datafree.distill.job import run_distill

    cfg = resolve_distill_config(preset="dfq", overrides={
        "teacher": BN_TEACHER, "out": str(tmp_path / "run"), "steps": 3, "batch_size": 16, "student_batch": 16,
        "student_steps": 1, "eval_every": 3, "checkpoint_every": 3, "final_share": 0, "precision": "bf16",
        "generator_kwargs": {"latent_dim": 8, "width": 4}})
    summary = run_distill(cfg, progress=False)
    assert summary["precision"]["requested"] == "bf16"
    assert summary["precision"]["teacher"]["dtype"] == summary["precision"]["student"]["dtype"] == "bf16"
    assert summary["precision"]["measured_ms"]["teacher_pass"] == {}  # a named precision is not timed
    assert "precision" in (tmp_path / "run" / "report.html").read_text()


def _module(tmp_path, preset="dfq"):
    cfg = resolve_distill_config(preset=preset, overrides={
        "teacher": BN_TEACHER, "out": str(tmp_path), "batch_size": 8, "bn_momentum": 0.5 if preset == "dfq" else 0.0,
        **({"generator_kwargs": {"latent_dim": 8, "width": 4}} if preset == "dfq" else {})})
    kwargs = {"batch_size": 8} if cfg.generator == "pixels" else cfg.generator_kwargs
    generator = create_generator(cfg.generator, 1, 28, 10, **kwargs)
    return DistillModule(load_teacher(BN_TEACHER), create_model("lenet5_half"), generator, cfg, notify=lambda m: None)


def test_the_run_state_follows_the_module_to_its_device(tmp_path):
    """Pools, the archive, momentum BN statistics and soft targets move with the module (a resume
    restores them on the CPU before Lightning moves the module): checked on the meta device."""
    module = _module(tmp_path)
    images = torch.randn(8, 1, 28, 28)
    for pool in (module.pool, module.holdout):
        pool.add(images, torch.randn(8, 10))
    module.synth.losses(images, None, module.student)  # fills the momentum BN statistics
    module.synth.soft_targets = torch.rand(8, 10)
    state = module.state_tensors()
    assert {"pool.images", "holdout.logits", "soft_targets"} <= set(state) and any(k.startswith("bn_previous") for k in state)
    module.move_state(torch.device("meta"))
    assert {t.device.type for t in module.state_tensors().values()} == {"meta"}


def test_pixel_gradients_are_never_averaged_across_processes(tmp_path):
    """Each process optimises images of its own; a generator network is one model, averaged as DDP does."""
    pixels = _module(tmp_path / "p", preset="deepinversion")
    assert pixels.synth.is_pixels and pixels.averaged_parameters(pixels.generator) == []
    assert len(pixels.averaged_parameters(pixels.student)) == len(list(pixels.student.parameters()))
    network = _module(tmp_path / "g")
    assert len(network.averaged_parameters(network.generator)) == len(list(network.generator.parameters())) > 0


def test_each_process_resumes_with_a_random_stream_of_its_own():
    """After a resume every rank used to restore rank 0's random state and synthesise rank 0's batches."""
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (0, 1000)]
    saved = {"rng": states[0], "rng_ranks": states}
    assert torch.equal(rank_rng_state(saved, 1), states[1]) and torch.equal(rank_rng_state(saved, 0), states[0])
    old = {"rng": states[0]}  # a checkpoint of one process, resumed by two
    derived = [rank_rng_state(old, r) for r in (0, 1, 2)]
    assert not torch.equal(derived[0], derived[1]) and not torch.equal(derived[1], derived[2])
    assert torch.equal(rank_rng_state(old, 1), derived[1])  # and it is reproducible


def test_the_schedule_waits_for_the_device_before_reading_the_clock(monkeypatch):
    import datafree.distill.schedule as schedule

    waited = []
    monkeypatch.setattr(schedule, "synchronize", waited.append)
    schedule._timed(lambda: None, repeats=2, device="cuda")
    assert waited == ["cuda"] * 3  # after the warm-up and after each timed call


@pytest.mark.parametrize("family", ["colour", "cutout", "flip"])
def test_augmentation_parameters_follow_the_images_device(family):
    """Parameters are drawn on the CPU (the seed fixes them anywhere) and used where the images are."""
    x = torch.zeros(2, 1, 8, 8, device="meta")
    out = SiameseAugment(families=(family,)).apply(x, AugmentParams(family, torch.rand(4)))
    assert out.device.type == "meta" and out.shape == x.shape


def test_a_resumed_condensation_keeps_the_precision_it_began_with(tmp_path):
    """Timing noise must not switch the layout halfway: a resume continues as the run would have."""
    from datafree.condense.run import MatchingRun
    from datafree.condense.settings import CondenseSettings

    def fresh_run(resume: bool):
        syn = torch.zeros(10, 1, 8, 8, requires_grad=True)
        return MatchingRun(CondenseSettings(ipc=1, iterations=1), lambda *a: None, torch.Generator(), syn,
                           torch.optim.SGD([syn], lr=0.1), checkpoint=tmp_path / "condense.pt", resume=resume)

    first = fresh_run(resume=False)
    chosen, _ = first.precision(lambda: (None, {"chosen": {"dtype": "fp32", "channels_last": True}}))
    first.end_iteration({"match_loss": 0.0})  # the last iteration: saved

    def measure_again():
        raise AssertionError("a resumed run measured its precision again")

    assert fresh_run(resume=True).precision(measure_again)[0] == chosen == Precision("fp32", channels_last=True)

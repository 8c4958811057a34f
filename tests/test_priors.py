"""Each prior's value and gradient on hand-made cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from datafree.distill.losses import kd_loss
from datafree.distill.priors import PRIORS, SynthesisBatch, disagreement, total_variation
from datafree.teachers.formats import load_teacher
from datafree.teachers.taps import BNStatistics, BNTap, bn_layer_losses


def _tap(mean, var, rm, rv, name="bn"):
    return BNTap(name, torch.tensor(mean), torch.tensor(var), torch.tensor(rm), torch.tensor(rv))


def test_bn_loss_is_zero_at_the_running_statistics():
    taps = [_tap([0.5, -1.0], [2.0, 0.3], [0.5, -1.0], [2.0, 0.3])]
    assert bn_layer_losses(taps)[0].item() == 0.0


def test_bn_loss_is_l2_of_mean_plus_l2_of_var():
    taps = [_tap([3.0, 0.0], [1.0, 1.0], [0.0, 4.0], [1.0, 1.0])]
    assert bn_layer_losses(taps)[0].item() == pytest.approx(5.0)  # ||(3, -4)|| = 5


def test_bn_loss_zero_when_a_real_layer_sees_exactly_its_running_stats(tiny_teacher):
    teacher = load_teacher(tiny_teacher[0])
    x = torch.randn(32, 1, 28, 28)
    first_bn = teacher.module.body[1]
    conv_out = teacher.module.body[0](x)
    first_bn.running_mean.copy_(conv_out.mean((0, 2, 3)))
    first_bn.running_var.copy_(conv_out.var((0, 2, 3), unbiased=False))
    teacher(x)
    losses = bn_layer_losses(teacher.bn_taps())
    assert losses[0].item() < 1e-5 and losses[1].item() > 1e-3


def test_bn_prior_gradient_moves_images_toward_the_statistics(tiny_teacher):
    teacher = load_teacher(tiny_teacher[0])
    x = torch.randn(16, 1, 28, 28, requires_grad=True)
    prior = BNStatistics(first_layer_weight=1.0)
    teacher(x)
    before, _ = prior(teacher.bn_taps())
    before.backward()
    with torch.no_grad():
        teacher(x - 0.5 * x.grad / x.grad.norm())
        after, _ = prior(teacher.bn_taps())
    assert after < before


def test_bn_first_layer_weight_and_momentum_blend():
    taps = [_tap([1.0], [1.0], [0.0], [1.0], "a"), _tap([1.0], [1.0], [0.0], [1.0], "b")]
    total, per_layer = BNStatistics(first_layer_weight=3.0)(taps)
    assert per_layer.tolist() == [1.0, 1.0] and total.item() == pytest.approx(4.0)
    prior = BNStatistics(momentum=0.5)
    prior([_tap([2.0], [1.0], [0.0], [1.0], "a")])
    total, _ = prior([_tap([0.0], [1.0], [0.0], [1.0], "a")])  # blended mean 0.5*2 + 0.5*0 = 1
    assert total.item() == pytest.approx(1.0)


def test_bn_prior_with_no_taps_is_zero():
    total, per_layer = BNStatistics()([])
    assert total.item() == 0 and per_layer.tolist() == []


def test_onehot_uses_the_asked_class_or_the_argmax():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], requires_grad=True)
    assert PRIORS["onehot"](SynthesisBatch(None, logits)).item() < 1e-3
    asked = PRIORS["onehot"](SynthesisBatch(None, logits, targets=torch.tensor([2, 2])))
    assert asked.item() > 9
    asked.backward()
    assert logits.grad[0, 2] < 0  # raising the asked class's logit lowers the loss


def test_entropy_prior_is_minimal_for_a_balanced_batch():
    balanced = torch.eye(4) * 20
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 20
    e_bal = PRIORS["entropy"](SynthesisBatch(None, balanced)).item()
    e_col = PRIORS["entropy"](SynthesisBatch(None, collapsed)).item()
    assert e_bal == pytest.approx(-math.log(4), abs=1e-3) and e_col > e_bal


def test_activation_prior_rewards_large_features():
    feats = torch.tensor([[1.0, -3.0]], requires_grad=True)
    value = PRIORS["activation"](SynthesisBatch(None, torch.zeros(1, 2), features=feats))
    assert value.item() == pytest.approx(-2.0)
    value.backward()
    assert feats.grad.tolist() == [[-0.5, 0.5]]


@pytest.mark.parametrize("kind", ["l1", "kl", "js"])
def test_disagreement_zero_when_equal_positive_otherwise(kind):
    t = torch.randn(8, 5)
    assert disagreement(t.clone(), t, kind).abs().item() < 1e-6
    s = torch.randn(8, 5, requires_grad=True)
    d = disagreement(s, t, kind, temperature=2.0)
    d.backward()
    assert d.item() > 0 and s.grad.abs().sum() > 0


def test_js_is_symmetric_and_bounded():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert disagreement(a, b, "js").item() == pytest.approx(disagreement(b, a, "js").item(), rel=1e-5)
    assert disagreement(a * 50, -a * 50, "js").item() <= math.log(2) + 1e-5


def test_total_variation_and_l2():
    flat = torch.ones(1, 1, 4, 4)
    checker = (torch.arange(16).view(1, 1, 4, 4) + torch.arange(4).view(1, 1, 4, 1)) % 2
    assert total_variation(flat).item() == 0
    assert total_variation(checker.float()).item() == pytest.approx(2.0)
    assert total_variation(checker.float(), p=1).item() == pytest.approx(2.0)
    assert PRIORS["l2"](SynthesisBatch(flat * 3, None)).item() == pytest.approx(9.0)


def test_kd_loss_is_t_squared_scaled_kl_and_mixes_ce():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    T = 3.0
    manual = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(manual.item(), rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    mixed = kd_loss(s, t, T, alpha=0.25)
    assert mixed.item() == pytest.approx(0.75 * manual.item() + 0.25 * F.cross_entropy(s, t.argmax(1)).item(), rel=1e-5)
    assert kd_loss(s, t, kind="l1").item() == pytest.approx((s - t).abs().mean().item())


def test_input_prior_is_l2_of_the_channel_means_plus_l2_of_the_variances_minus_one():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 0] = 3.0  # channel 0: mean 3, var 0; channel 1: mean 0, var 0
    value = PRIORS["input"](SynthesisBatch(images=x, t_logits=torch.zeros(4, 10))).item()
    assert value == pytest.approx(3.0 + math.sqrt(2.0))  # ||(3, 0)|| + ||(-1, -1)||


def test_input_prior_gradient_moves_saturated_images_toward_the_data_statistics():
    """Half-white images (the blobs a no-BN generator makes) against MNIST's mean and std: the step
    darkens them, as the data's 0.13 mean asks."""
    from datafree.data.datasets import InputSpec

    spec = InputSpec(1, 28, (0.1307,), (0.3081,))
    pixels = (torch.rand(64, 1, 28, 28) > 0.5).float().requires_grad_(True)
    PRIORS["input"](SynthesisBatch(images=spec.normalize(pixels), t_logits=torch.zeros(64, 10))).backward()
    assert pixels.grad.mean() > 0  # descending the gradient lowers the pixels


def test_the_input_prior_is_off_with_a_note_when_the_spec_has_no_statistics(tmp_path):
    from datafree.data.datasets import dataset_spec
    from datafree.distill.presets import resolve_distill_config
    from datafree.distill.synthesis import Synthesizer
    from datafree.models.zoo import create_model
    from datafree.outputs.export import export_program
    from generators import create_generator

    export_program(create_model("lenet5_nobn").eval(), dataset_spec("mnist"), tmp_path / "t.ts", {"arch": "lenet5_nobn"})
    weights = {"onehot": 1.0, "input": 1.0}
    notes = []
    for spec, active in (("1x28x28", False), ("1x28x28:0.1307:0.3081", True)):
        cfg = resolve_distill_config("dfq", overrides={"teacher": str(tmp_path / "t.ts"), "teacher_input_spec": spec,
                                                       "weights": weights, "out": str(tmp_path / "run")})
        teacher = load_teacher(cfg.teacher, input_spec=spec)
        synth = Synthesizer(teacher, create_generator("dcgan", 1, 28, 10, latent_dim=8, width=4), cfg, notes.append)
        assert ("input" in synth.weights) is active
    assert len(notes) == 1 and "no data statistics" in notes[0] and "CxHxW:mean:std" in notes[0]

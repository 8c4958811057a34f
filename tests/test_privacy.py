"""Differentially private condensation (accounting, the mechanism, refusals, resume) and the membership audit."""
import json
import subprocess
import sys

import pytest
import torch

from datafree.base.errors import UserError
from datafree.condense.config import job_from_dict
from datafree.condense.private import bounded, epsilon_spent, noise_multiplier, noisy_class_means
from datafree.outputs.membership import lira_offline_scores, roc_summary, with_intervals

TINY_DP = {"source": "mnist", "ipc": 1, "net_width": 8, "real_per_class": 16, "dp_epsilon": 1.0, "progress": False,
           "precision": "fp32"}


def pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Google's dp-accounting PLD accountant: an implementation independent of opacus's."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("epsilon, q, steps", [(1.0, 0.02, 500), (10.0, 0.02, 500), (1.0, 0.005, 2000)])
def test_calibrated_noise_gives_the_target_epsilon_by_an_independent_accountant(epsilon, q, steps):
    sigma = noise_multiplier(epsilon, 1e-5, q, steps)
    recorded = epsilon_spent(sigma, q, steps, 1e-5)
    assert epsilon * 0.99 <= recorded <= epsilon * 1.001  # at or just under the target
    assert abs(recorded - pld_epsilon(sigma, q, steps, 1e-5)) <= 0.01 * recorded
    assert epsilon_spent(sigma * 1.5, q, steps, 1e-5) < recorded  # more noise, less epsilon


def test_the_mechanism_adds_noise_of_the_stated_scale_to_bounded_embeddings():
    from types import SimpleNamespace

    from datafree.base.precision import FP32

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    net.forward_features = net.forward
    images, labels = torch.randn(50, 1, 2, 2), torch.arange(50) % 2
    augment = SimpleNamespace(sample=lambda g: None, apply=lambda x, p: x)  # no augmentation: the sums are exact
    draws = lambda c: torch.Generator().manual_seed(c)  # noqa: E731
    exact = noisy_class_means(net, images, labels, [0, 1], draws, augment, None, 0.0, torch.Generator(), FP32)
    assert torch.allclose(exact[0][0], bounded(net(images[labels == 0]), None).mean(0), atol=1e-5)
    spread = torch.stack([noisy_class_means(net, images, labels, [0], draws, augment, None, 2.0,
                                            torch.Generator().manual_seed(i), FP32)[0][0] for i in range(300)])
    # each sum gets noise of std sigma * sqrt(2) * 1 over 25 images (the count's noise is small beside 25)
    assert spread.std(0).mean().item() == pytest.approx(2.0 * 2 ** 0.5 / 25, rel=0.15)
    assert bounded(torch.tensor([[30.0, 40.0]]), 2.0).norm().item() == pytest.approx(2.0)


@pytest.mark.real_data
def test_a_dp_condensation_records_its_plan_and_its_epsilon_matches_an_independent_accountant(tmp_path):
    from datafree.condense.job import run_condense
    from datafree.outputs.export import load_image_set

    run_condense(job_from_dict(TINY_DP | {"out": str(tmp_path / "dp"), "steps": 4}))
    manifest = json.loads((tmp_path / "dp" / "manifest.json").read_text())
    privacy = manifest["privacy"]
    assert privacy["steps"] == privacy["steps_done"] == manifest["iterations_done"] == 4
    assert privacy["sample_rate"] == pytest.approx(16 * 10 / 60000)
    assert privacy["accountant"].startswith("opacus PRV") and privacy["accountant_version"]
    recomputed = pld_epsilon(privacy["sigma"], privacy["sample_rate"], privacy["steps_done"], privacy["delta"])
    assert abs(privacy["epsilon_spent"] - recomputed) <= 0.01 * recomputed and privacy["epsilon_spent"] <= 1.0
    assert manifest["init"]["method"] == "noise" and manifest["init"]["from_source_images"] == 0
    assert "guarantee" in privacy and privacy["not_guaranteed"]
    assert "sha256" not in manifest["source"]  # a hash of the private data is not released
    images, _, _ = load_image_set(tmp_path / "dp")
    assert torch.isfinite(images.images).all()


@pytest.mark.real_data
def test_a_time_budget_becomes_a_step_count_before_the_first_private_step(tmp_path):
    from datafree.condense.job import run_condense

    run_condense(job_from_dict(TINY_DP | {"out": str(tmp_path / "dp"), "time_budget": "3s"}))
    manifest = json.loads((tmp_path / "dp" / "manifest.json").read_text())
    privacy = manifest["privacy"]
    assert privacy["step_seconds"] > 0 and privacy["steps"] >= 1
    # every planned step, or stopped by the budget (on a slow machine the calibration alone can take seconds) and said so
    assert privacy["steps_done"] == privacy["steps"] or "ran out after" in privacy["stopped_early"]


@pytest.mark.real_data
def test_a_dp_run_stops_at_its_time_budget_when_the_machine_slows_and_records_the_smaller_epsilon(tmp_path, monkeypatch):
    """The timed step says 1 ms (far too fast): the planned count cannot finish in 4 s, so the run
    stops at the budget and records the epsilon of the steps it took, below the planned one. (The
    noise level is fixed here, as calibrating it for thousands of steps takes seconds itself.)"""
    import datafree.condense.private as private
    from datafree.condense.job import run_condense

    plan = private.plan_privacy
    monkeypatch.setattr(private, "plan_privacy", lambda *a: plan(*a[:-1], lambda: 1e-3))
    monkeypatch.setattr(private, "noise_multiplier", lambda *a: 1.0)
    run_condense(job_from_dict(TINY_DP | {"out": str(tmp_path / "dp"), "time_budget": "4s"}))
    manifest = json.loads((tmp_path / "dp" / "manifest.json").read_text())
    privacy = manifest["privacy"]
    assert privacy["steps"] > 3000 and 1 <= privacy["steps_done"] < privacy["steps"] / 2 and "ran out after" in privacy["stopped_early"]
    spent = epsilon_spent(1.0, privacy["sample_rate"], privacy["steps_done"], privacy["delta"])
    assert privacy["epsilon_spent"] == pytest.approx(spent, abs=1e-3)
    assert spent < epsilon_spent(1.0, privacy["sample_rate"], privacy["steps"], privacy["delta"])
    assert 4 <= manifest["seconds"] < 8


@pytest.mark.real_data
def test_a_resumed_dp_run_keeps_its_steps_and_noise(tmp_path):
    from datafree.condense.job import CHECKPOINT, run_condense

    out = tmp_path / "dp"
    run_condense(job_from_dict(TINY_DP | {"out": str(out), "steps": 3}))
    first = json.loads((out / "manifest.json").read_text())["privacy"]
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert json.loads(state["aux"])["plan"]["sigma"] == first["sigma"] and set(state["secret"]) == {"sampling", "noise"}
    run_condense(job_from_dict(TINY_DP | {"out": str(out), "steps": 3, "resume": True}))
    again = json.loads((out / "manifest.json").read_text())["privacy"]
    assert (again["sigma"], again["steps"], again["steps_done"]) == (first["sigma"], first["steps"], first["steps_done"])


@pytest.mark.real_data
@pytest.mark.parametrize("fields, words", [
    ({"dp_epsilon": 0}, "must be more than 0"),
    ({"dp_epsilon": -1.0}, "must be more than 0"),
    ({"dp_delta": 1e-4}, "is not below 1 / 60,000"),
    ({"init": "real"}, "starts from noise"),
    ({"init": "kmeans"}, "starts from noise"),
    ({"method": "dsa"}, "has no private variant"),
    ({"dp_epsilon": None, "dp_clip": 1.0}, "applies only with dp_epsilon"),
])
def test_what_a_dp_run_cannot_do_is_refused_in_one_sentence(tmp_path, fields, words):
    from datafree.condense.job import run_condense

    with pytest.raises(UserError, match=words):
        run_condense(job_from_dict(TINY_DP | {"out": str(tmp_path / "dp"), "steps": 1} | fields))
    assert not (tmp_path / "dp").exists()  # refused before anything is written


def test_a_transfer_set_is_not_private_data(tmp_path):
    from datafree.condense.private import check_private_job

    with pytest.raises(UserError, match="holds no private image"):
        check_private_job(job_from_dict({"dp_epsilon": 1.0}), data_free=True, private_images=1000)


# --- membership inference ---------------------------------------------------------------------------

def test_roc_figures_of_separated_and_of_indistinguishable_scores():
    g = torch.Generator().manual_seed(0)
    apart = roc_summary(torch.rand(500, generator=g) + 2, torch.rand(500, generator=g))
    assert apart["auc"] == 1.0 and apart["tpr_at_0.001_fpr"] == 1.0
    same = with_intervals(torch.randn(2000, generator=g), torch.randn(2000, generator=g))
    assert 0.45 < same["auc"] < 0.55 and same["auc_ci"][0] <= same["auc"] <= same["auc_ci"][1]
    assert same["tpr_at_0.01_fpr"] < 0.05  # chance: about the FPR itself
    assert lira_offline_scores(torch.zeros(3), torch.zeros(2, 3)).abs().max() == 0


@pytest.mark.real_data
def test_the_audit_finds_an_overfitted_models_members_and_not_a_fresh_ones(tmp_path):
    """A LeNet trained for many epochs on 200 images: their loss gives them away (AUC well above chance);
    the same architecture untrained cannot tell them from non-members."""
    from datafree.data.datasets import ImageSet, load_dataset
    from datafree.models.training import fit_supervised
    from datafree.models.zoo import create_model
    from datafree.outputs.membership import audit_membership

    train, test = load_dataset("mnist", train=True), load_dataset("mnist", train=False)
    members = ImageSet(train.images[:200], train.labels[:200], train.spec)
    non_members = ImageSet(test.images[:200], test.labels[:200], test.spec)
    overfit = fit_supervised(create_model("lenet5_half"), members, epochs=40, batch_size=50, progress=False)
    found = audit_membership(overfit, members, non_members)["attacks"]["loss"]
    assert found["auc"] > 0.75 and found["auc_ci"][0] > 0.6
    fresh = audit_membership(create_model("lenet5_half").eval(), members, non_members)["attacks"]["loss"]
    assert fresh["auc_ci"][0] < 0.5 < fresh["auc_ci"][1] or abs(fresh["auc"] - 0.5) < 0.08


@pytest.mark.real_data
def test_the_membership_audit_of_the_shipped_teacher_writes_its_figures_and_plot(tmp_path):
    from datafree.outputs.membership_job import membership_config, run_membership_audit

    cfg = membership_config({"target": "assets/teachers/mnist_lenet5.safetensors", "members": "mnist", "non_members": "mnist:test",
                             "samples": 200, "references": 2, "reference_epochs": 1, "reference_pool": 600, "out": str(tmp_path)})
    result = run_membership_audit(cfg, progress=False)
    assert set(result["attacks"]) == {"loss", "lira"} and result["reference_models"]["count"] == 2
    written = json.loads((tmp_path / "membership.json").read_text())
    for attack in written["attacks"].values():
        assert 0 <= attack["auc"] <= 1 and len(attack["auc_ci"]) == 2 and "tpr_at_0.001_fpr" in attack
    assert (tmp_path / "membership_roc.png").stat().st_size > 1000


@pytest.mark.parametrize("args, words", [
    (["--members", "mnist"], "needs non-members"),
    (["--non-members", "mnist:test"], "needs members"),
])
def test_a_membership_audit_without_both_sides_is_refused(args, words):
    done = subprocess.run([sys.executable, "-m", "datafree.cli", "audit", "assets/teachers/mnist_lenet5.safetensors",
                           "--membership", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr


def _pixels_npz(path, images, labels, spec):
    import numpy as np

    np.savez(path, x=spec.to_uint8(images).numpy(), y=labels.numpy())
    return str(path)


@pytest.mark.real_data
def test_canary_style_audit_with_every_member_audited_uses_reference_data_and_refuses_audited_references(tmp_path):
    """All 200 members are audited, so LiRA's reference models need images from elsewhere: given as
    reference_data, they are used and named; reference data that holds an audited image is refused."""
    from datafree.data.datasets import ImageSet, load_dataset
    from datafree.models.training import fit_supervised
    from datafree.models.zoo import create_model
    from datafree.outputs.membership_job import membership_config, run_membership_audit
    from datafree.teachers.formats import save_model

    train, test = load_dataset("mnist", train=True), load_dataset("mnist", train=False)
    members = ImageSet(train.images[:200], train.labels[:200], train.spec)
    overfit = fit_supervised(create_model("lenet5_half"), members, epochs=40, batch_size=50, progress=False)
    save_model(overfit.eval(), tmp_path / "overfit.safetensors", "lenet5_half", train.spec)
    fields = {"target": str(tmp_path / "overfit.safetensors"), "samples": 200, "references": 1, "reference_epochs": 1,
              "reference_pool": 600, "out": str(tmp_path / "audit"),
              "members": _pixels_npz(tmp_path / "members.npz", members.images, members.labels, train.spec),
              "non_members": _pixels_npz(tmp_path / "non_members.npz", test.images[:200], test.labels[:200], test.spec)}
    with pytest.raises(UserError, match="200 of the images in reference_data 'mnist:test' are audited images"):
        run_membership_audit(membership_config(fields | {"reference_data": "mnist:test"}), progress=False)
    with pytest.raises(UserError, match="at least 20 images that are not audited"):
        run_membership_audit(membership_config(fields), progress=False)
    others = _pixels_npz(tmp_path / "others.npz", test.images[200:1000], test.labels[200:1000], test.spec)
    result = run_membership_audit(membership_config(fields | {"reference_data": others}), progress=False)
    assert result["reference_models"]["drawn_from"] == others and result["reference_models"]["count"] == 1
    assert result["attacks"]["lira"]["auc"] > 0.75 and result["attacks"]["loss"]["auc"] > 0.75

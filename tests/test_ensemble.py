"""Distillation from an ensemble of teachers: combined soft targets (mean logits or mean softmax), every member's BN prior, one sentence for a mismatch."""
import json

import pytest
import torch

from conftest import ROOT, TEACHERS
from datafree.base.errors import UserError
from datafree.distill.job import run_distill
from datafree.distill.presets import resolve_distill_config
from datafree.teachers.ensemble import TeacherEnsemble, load_teachers
from datafree.teachers.formats import load_teacher

LENET = str(TEACHERS / "mnist_lenet5.safetensors")
LENET_NOBN = str(TEACHERS / "mnist_lenet5_nobn.safetensors")
OWNER_PT2 = str(ROOT / "assets" / "suite" / "mnist_owner_resgap.pt2")  # [0, 1] inputs, its normalisation inside
TINY = {"steps": 3, "batch_size": 16, "student_batch": 16, "student_steps": 1, "pool_size": 32, "eval_every": 3,
        "checkpoint_every": 3, "grid_every": 0, "holdout_every": 2, "generator_kwargs": {"latent_dim": 8, "width": 8}}


def test_the_ensemble_answers_with_its_members_mean_logits_or_their_averaged_soft_targets():
    ensemble = load_teachers([LENET, OWNER_PT2], input_spec=None)
    lenet, owner = load_teacher(LENET), load_teacher(OWNER_PT2)
    assert isinstance(ensemble, TeacherEnsemble) and lenet.spec != owner.spec  # the members normalise differently
    x = torch.randn(6, 1, 28, 28)  # in the first member's input space
    a, b = lenet(x), owner(owner.spec.normalize(lenet.spec.denormalize(x)))
    assert ensemble.rule == "logits" and torch.allclose(ensemble(x), (a + b) / 2, atol=1e-5)
    averaged = load_teachers([LENET, OWNER_PT2], rule="probs")
    assert torch.allclose(averaged(x).softmax(1), (a.softmax(1) + b.softmax(1)) / 2, atol=1e-5)
    assert not torch.allclose(averaged(x).softmax(1), ensemble(x).softmax(1), atol=1e-3)  # the rules differ
    assert ensemble.spec == lenet.spec and ensemble.num_classes == 10 and ensemble.describe()["rule"] == "logits"
    with pytest.raises(UserError, match="unknown ensemble rule 'median'; choose one of logits, probs"):
        load_teachers([LENET, OWNER_PT2], rule="median")


def test_every_member_with_bn_statistics_feeds_the_bn_prior():
    both = load_teachers([LENET, LENET])
    with_one = load_teachers([LENET, LENET_NOBN])
    x = torch.randn(4, 1, 28, 28)
    both(x), with_one(x)
    single = load_teacher(LENET)
    single(x)
    assert len(both.bn_taps()) == 2 * len(single.bn_taps()) > 0
    assert len(with_one.bn_taps()) == len(single.bn_taps()) and "teachers 1 have no readable BN" in with_one.bn_note
    assert not load_teachers([LENET_NOBN, LENET_NOBN]).has_bn
    from datafree.teachers.taps import BNStatistics

    prior = BNStatistics(first_layer_weight=3.0, momentum=0.5)
    twice, once = prior(both.bn_taps())[0], BNStatistics(3.0, 0.5)(single.bn_taps())[0]
    assert torch.allclose(twice, once)  # the members' mean: two copies weigh as one teacher, first layers each x3
    assert {t.member for t in both.bn_taps()} == {0, 1} and len(prior.previous) == 2 * len(single.bn_taps())


def test_teachers_that_disagree_are_refused_in_one_sentence(tmp_path):
    from datafree.data.datasets import InputSpec, dataset_spec
    from datafree.models.zoo import create_model
    from datafree.teachers.formats import save_model

    fashion = str(TEACHERS / "fmnist_convnet.safetensors")
    with pytest.raises(UserError, match="name their classes differently"):
        load_teachers([LENET, fashion])
    five = tmp_path / "five.safetensors"
    save_model(create_model("lenet5", num_classes=5), five, "lenet5", InputSpec(1, 28, (0.5,), (0.5,), list("abcde")))
    with pytest.raises(UserError, match=r"disagree on classes: .* has 10, .*five.safetensors' has 5"):
        load_teachers([LENET, str(five)])
    big = tmp_path / "big.safetensors"
    spec = dataset_spec("mnist")
    save_model(create_model("lenet5", image_size=32), big, "lenet5", InputSpec(1, 32, spec.mean, spec.std, spec.class_names))
    with pytest.raises(UserError, match="take different images: .* 1x28x28, .* 1x32x32"):
        load_teachers([LENET, str(big)])


def test_a_run_from_an_ensemble_records_every_teacher(tmp_path):
    from datafree.base.io import sha256_file
    from datafree.condense.job import teacher_of_run

    cfg = resolve_distill_config("dfq", overrides={"teacher": [LENET, OWNER_PT2], "out": str(tmp_path / "run"),
                                                   "ensemble_rule": "probs", **TINY})  # not the default: a derived job must read it
    summary = run_distill(cfg, progress=False)
    assert [t["path"] for t in summary["teachers"]] == [LENET, OWNER_PT2]
    assert [t["sha256"] for t in summary["teachers"]] == [sha256_file(LENET), sha256_file(OWNER_PT2)]
    assert [t["format"] for t in summary["teachers"]] == ["safetensors", "pt2"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["teachers"] == summary["teachers"] and len(manifest["teacher_sha256"]) == 64
    teacher, _ = teacher_of_run(tmp_path / "run")  # the run's teachers, each checked against its hash
    assert isinstance(teacher, TeacherEnsemble) and len(teacher.members) == 2
    assert summary["ensemble_rule"] == teacher.rule == "probs"  # the rule the run used, and a derived job uses it too


def test_the_command_line_takes_several_teachers(tmp_path, capsys):
    from datafree.cli import main

    args = ["distill", "--teacher", LENET, "--teacher", LENET_NOBN, "--out", str(tmp_path / "run"), "--no-eval", "--no-progress",
            "--steps", "2", "--batch-size", "16", "--pool-size", "32", "--eval-every", "2", "--checkpoint-every", "2",
            "--ensemble-rule", "probs"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [t["path"] for t in summary["teachers"]] == [LENET, LENET_NOBN] and summary["ensemble_rule"] == "probs"
    assert "teachers 1 have no readable BN statistics" in capsys.readouterr().err  # said once, in one line
    fashion = str(TEACHERS / "fmnist_convnet.safetensors")
    assert main(["distill", "--teacher", LENET, "--teacher", fashion, "--out", str(tmp_path / "bad"), "--no-eval"]) == 2
    assert "name their classes differently" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_relational_terms_compare_structure_not_scale():
    from datafree.distill.knowledge import rkd_loss

    t = torch.randn(16, 8)
    assert rkd_loss(t * 3.0, t).item() < 1e-6  # distances normalised by their mean, angles scale-free
    assert rkd_loss(torch.randn(16, 4), t).item() > 0.1


def test_attention_maps_compare_where_the_energy_is_not_its_scale_or_channels():
    from datafree.distill.knowledge import attention_loss

    where = torch.zeros(4, 1, 6, 6)
    where[:, :, :4] = 1.0  # the energy is in the top four rows
    a = where.expand(4, 8, 6, 6) * torch.rand(4, 8, 1, 1).add(0.5)  # channels of different strengths
    assert attention_loss(a * 5.0, a).item() < 1e-9  # scale-free
    assert attention_loss(where.expand(4, 3, 6, 6), a).item() < 1e-9  # channel counts may differ
    assert attention_loss(torch.nn.functional.avg_pool2d(a, 2), a).item() < 1e-9  # sizes pooled to the smaller
    assert attention_loss(a.flip(2), a).item() > 10.0  # energy moved to the bottom rows


@pytest.mark.parametrize("path", [LENET, OWNER_PT2], ids=["safetensors", "pt2"])
def test_the_teachers_last_spatial_map_is_reachable_in_both_forms(path):
    teacher = load_teacher(path)
    x = torch.randn(3, *teacher.input_shape)
    teacher(x)
    first = teacher.spatial_map()
    assert first is not None and first.dim() == 4 and first.shape[0] == 3 and min(first.shape[2:]) >= 2
    teacher(x[:2] * 2)
    assert teacher.spatial_map().shape[0] == 2  # refreshed by every forward, not kept from the last


def test_knowledge_terms_train_with_the_student_and_are_recorded(tmp_path):
    from datafree.distill.module import DistillModule

    cfg = resolve_distill_config("dfq", overrides={"teacher": LENET, "out": str(tmp_path / "run"), **TINY,
                                                   "knowledge": {"hint": 1.0, "attention": 2.0, "rkd": 1.0}})
    summary = run_distill(cfg, progress=False)
    assert summary["knowledge"] == ["logits (KD)", "attention x2", "hint x1", "rkd x1"]
    teacher = load_teacher(LENET)
    from datafree.models.zoo import create_model
    from generators import create_generator

    generator = create_generator("dcgan", 1, 28, 10, latent_dim=8, width=8)
    module = DistillModule(teacher, create_model("lenet5_half"), generator, cfg, notify=lambda m: None)
    assert module.hint is not None and module.hint.project.in_features == 42 and module.hint.project.out_features == 84
    x = torch.randn(8, 1, 28, 28)
    teacher.forward_with_features(x)
    module.student.forward_features(x)
    assert tuple(module.student_spatial.value.shape) == (8, 8, 5, 5) and tuple(teacher.spatial_map().shape) == (8, 16, 5, 5)
    assert {id(p) for p in module.hint.parameters()} <= {id(p) for g in module.configure_optimizers()[1].param_groups
                                                          for p in g["params"]}  # the student's optimiser trains the projection


def test_a_teacher_without_reachable_features_turns_the_terms_off_with_a_note(tmp_path):
    from datafree.distill.module import DistillModule
    from datafree.models.zoo import create_model

    scripted = load_teacher(str(ROOT / "assets" / "suite" / "fmnist_resnet8.ts"), input_spec="1x28x28")
    cfg = resolve_distill_config("dfq", overrides={"teacher": LENET, **TINY, "knowledge": {"rkd": 1.0}})
    notes = []
    from generators import create_generator

    generator = create_generator("dcgan", 1, 28, 10, latent_dim=8, width=8)
    module = DistillModule(scripted, create_model("lenet5_half"), generator, cfg, notify=notes.append)
    said = [n for n in notes if "knowledge" in n]  # (the BN prior's own note comes too)
    assert module.knowledge == {} and len(said) == 1 and "TorchScript" in said[0] and "logits only" in said[0]
    with pytest.raises(UserError, match="unknown knowledge term 'gram'"):
        resolve_distill_config("dfq", overrides={"teacher": LENET, "knowledge": {"gram": 1.0}})


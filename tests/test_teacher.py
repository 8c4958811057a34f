import json
import pickle
import warnings

import pytest
import torch

from conftest import ROOT
from datafree.base.errors import UserError
from datafree.data.datasets import dataset_spec
from datafree.models.zoo import create_model
from datafree.outputs.export import PixelModel, export_program
from datafree.teachers.formats import load_teacher, save_model, sniff_format


def _pixels(n=5):
    return torch.rand(n, 1, 28, 28)


def test_safetensors_round_trip_gives_identical_logits(tiny_teacher):
    path, model = tiny_teacher
    teacher = load_teacher(path)
    x = dataset_spec("mnist").normalize(_pixels())
    assert torch.equal(teacher(x), model(x))
    assert teacher.num_classes == 10 and teacher.input_shape == (1, 28, 28)
    assert teacher.card["sha256"] and teacher.arch == "lenet5"


def test_teacher_is_frozen_in_eval_mode(tiny_teacher):
    teacher = load_teacher(tiny_teacher[0])
    teacher.train()
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    teacher(x).sum().backward()  # gradients reach the input, not the weights
    assert x.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_bn_taps_report_every_bn_layer(tiny_teacher):
    teacher = load_teacher(tiny_teacher[0])
    teacher(torch.randn(8, 1, 28, 28))
    taps = teacher.bn_taps()
    assert [t.name for t in taps] == teacher.bn_names and len(taps) == 4
    first = taps[0]
    assert first.mean.shape == first.running_mean.shape == (6,)


def test_bn_taps_match_a_hand_computation(tiny_teacher):
    teacher = load_teacher(tiny_teacher[0])
    x = torch.randn(16, 1, 28, 28)
    teacher(x)
    conv_out = teacher.module.body[0](x)
    tap = teacher.bn_taps()[0]
    assert torch.allclose(tap.mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(tap.var, conv_out.var((0, 2, 3), unbiased=False), atol=1e-5)


def test_teacher_without_bn_reports_none_and_says_why(tmp_path):
    path = tmp_path / "nobn.safetensors"
    save_model(create_model("lenet5_nobn"), path, "lenet5_nobn", dataset_spec("mnist"))
    teacher = load_teacher(path)
    teacher(torch.randn(2, 1, 28, 28))
    assert teacher.bn_taps() == [] and not teacher.has_bn
    assert "no BatchNorm" in teacher.no_bn_reason


def test_pt2_round_trip_keeps_predictions_and_bn_taps(tiny_teacher, tmp_path):
    path, model = tiny_teacher
    spec = dataset_spec("mnist")
    export_program(model, spec, tmp_path / "t.pt2", json.loads(path.with_suffix(".json").read_text()))
    # loadable with plain torch, [0, 1] images in
    plain = torch.export.load(str(tmp_path / "t.pt2")).module()
    x = _pixels(7)
    assert torch.allclose(plain(x), model(spec.normalize(x)), atol=1e-5)
    teacher = load_teacher(tmp_path / "t.pt2")
    assert teacher.format == "pt2" and teacher.spec.mean == (0.0,) and teacher.num_classes == 10
    assert torch.allclose(teacher(x), model(spec.normalize(x)), atol=1e-5)
    # the graph's batch-norm nodes are tapped: same statistics as hooks on the zoo model
    zoo = load_teacher(path)
    zoo(spec.normalize(x))
    graph_taps, hook_taps = teacher.bn_taps(), zoo.bn_taps()
    assert len(graph_taps) == len(hook_taps) == 4
    for g, h in zip(graph_taps, hook_taps):
        assert torch.allclose(g.mean, h.mean, atol=1e-4) and torch.allclose(g.running_var, h.running_var)
    feats, _ = teacher.forward_with_features(x)
    assert feats.shape == (7, 84)


def test_pt2_taps_pass_gradients_to_the_input(tiny_teacher, tmp_path):
    path, model = tiny_teacher
    export_program(model, dataset_spec("mnist"), tmp_path / "t.pt2")
    teacher = load_teacher(tmp_path / "t.pt2")
    x = _pixels(4).requires_grad_()
    teacher(x)
    sum(t.mean.sum() for t in teacher.bn_taps()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pt2_exported_by_a_user_with_a_fixed_batch(tmp_path):
    """A program exported without a dynamic batch runs in chunks; BN statistics are pooled exactly."""
    model = create_model("resnet8", 10, 1, 28).eval()
    program = torch.export.export(model, (torch.randn(2, 1, 28, 28),))
    torch.export.save(program, str(tmp_path / "user.pt2"))
    teacher = load_teacher(tmp_path / "user.pt2")
    assert teacher.spec.describe() == "1x28x28" and teacher.num_classes == 10 and teacher.has_bn
    x = torch.randn(6, 1, 28, 28)
    assert torch.allclose(teacher(x), model(x), atol=1e-5)
    tap = teacher.bn_taps()[0]
    stem = model.stem[0](x)
    assert torch.allclose(tap.mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(tap.var, stem.var((0, 2, 3), unbiased=False), atol=1e-4)


def test_torchscript_gives_logits_only_and_bn_methods_refuse_it(tiny_teacher, tmp_path):
    path, model = tiny_teacher
    spec = dataset_spec("mnist")
    export_program(model, spec, tmp_path / "t.ts")
    teacher = load_teacher(tmp_path / "t.ts")
    x = _pixels(3)
    assert teacher.format == "torchscript"
    assert torch.allclose(teacher(x), model(spec.normalize(x)), atol=1e-5)
    assert teacher.bn_taps() == [] and not teacher.has_features
    with pytest.raises(UserError, match="TorchScript.*safetensors.*pt2"):
        teacher.require_bn("deepinversion")


def test_torchscript_without_card_needs_an_input_spec(tmp_path):
    model = PixelModel(create_model("lenet5").eval(), dataset_spec("mnist")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.rand(2, 1, 28, 28)), str(tmp_path / "bare.ts"))
    with pytest.raises(UserError, match="input spec.*unknown.*--input-spec"):
        load_teacher(tmp_path / "bare.ts")
    teacher = load_teacher(tmp_path / "bare.ts", input_spec="1x28x28")
    assert teacher.num_classes == 10


# --- bad input ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no teacher file"):
        load_teacher(tmp_path / "nope.safetensors")


def test_truncated_safetensors(tiny_teacher, tmp_path):
    path, _ = tiny_teacher
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt|does not match"):
        load_teacher(path)


def test_corrupt_safetensors_header(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError):
        load_teacher(tmp_path / "bad.safetensors", arch="lenet5", dataset="mnist")


def test_corrupt_pt2(tiny_teacher, tmp_path):
    path, model = tiny_teacher
    export_program(model, dataset_spec("mnist"), tmp_path / "t.pt2")
    data = (tmp_path / "t.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="corrupt|not a readable"):
        load_teacher(tmp_path / "cut.pt2")


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_files_are_refused_never_unpickled(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"state": Boom()}, path, _use_new_zipfile_serialization=zip_format)
    assert sniff_format(path) == "pickle"
    with pytest.raises(UserError, match="pickle.*never unpickles"):
        load_teacher(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match="pickle"):
        load_teacher(raw)


def test_weights_that_do_not_fit_the_arch(tiny_teacher):
    path, _ = tiny_teacher
    card = json.loads(path.with_suffix(".json").read_text())
    card["arch"] = "lenet5_half"
    card.pop("sha256")
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="do not fit the architecture 'lenet5_half'"):
        load_teacher(path)


def test_unknown_arch_and_dataset(tiny_teacher):
    path, _ = tiny_teacher
    with pytest.raises(UserError, match="unknown architecture"):
        load_teacher(path, arch="alexnet9")
    with pytest.raises(UserError, match="unknown data set"):
        load_teacher(path, dataset="svhn9")


def test_card_sha_mismatch_is_reported(tiny_teacher):
    path, _ = tiny_teacher
    card = json.loads(path.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="sha256"):
        load_teacher(path)


def test_input_spec_the_teacher_rejects(tiny_teacher):
    path, _ = tiny_teacher
    with pytest.raises(UserError, match="do not fit|takes"):
        teacher = load_teacher(path, input_spec="3x32x32")
        teacher(torch.randn(2, 3, 32, 32))
    teacher = load_teacher(path)
    with pytest.raises(UserError, match="takes N x 1x28x28"):
        teacher(torch.randn(2, 3, 32, 32))


def test_safetensors_without_card_needs_arch(tiny_teacher):
    path, model = tiny_teacher
    path.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="no card"):
        load_teacher(path)
    teacher = load_teacher(path, arch="lenet5", dataset="mnist")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(teacher(x), model(x))


def test_save_model_is_byte_reproducible(tmp_path):
    """Saving the same model twice gives byte-identical files (and so the same sha256 in the card)."""
    model = create_model("lenet5_half").eval()
    files = set()
    for i in range(12):
        save_model(model, tmp_path / f"m{i}.safetensors", "lenet5_half", dataset_spec("mnist"))
        files.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(files) == 1


SHIPPED = sorted((ROOT / "assets" / "teachers").glob("*.safetensors"))


@pytest.mark.real_data
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_teacher_card_accuracy_is_remeasured_on_the_real_test_set(path):
    """Each shipped teacher's card test_accuracy equals (to 0.01) its accuracy re-measured on the real test set it names."""
    from datafree.data.datasets import load_dataset
    from datafree.teachers.formats import load_model

    model, card = load_model(path)
    test = load_dataset(card["dataset"], train=False)
    assert card["input_spec"]["mean"] == list(test.spec.mean) and len(test) == 10000
    with torch.no_grad():
        predicted = torch.cat([model.eval()(x) for x in test.images.split(2000)]).argmax(1)
    measured = (predicted == test.labels).float().mean().item() * 100
    assert card["test_accuracy"] == pytest.approx(measured, abs=0.01)
    assert measured > 90

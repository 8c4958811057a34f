"""compress: pruned shapes and MACs, a pruned model saved and loaded, the refusals, a run end to end that
reads no real data before every stage is done, and the ONNX round trip."""
import json

import pytest
import torch

from conftest import ROOT, TEACHERS
from datafree.base.errors import UserError
from datafree.cli import main
from datafree.compress.prune import count_macs, parse_macs_target, prune_model
from datafree.data.datasets import dataset_spec
from datafree.models.zoo import create_model
from datafree.teachers.formats import load_model, save_model

SHAPE = (1, 28, 28)


def _with_bn_statistics(model):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, *SHAPE))
    return model.eval()


@pytest.mark.parametrize("arch, kwargs", [("lenet5", {}), ("resnet8", {"in_channels": 1}),
                                          ("convnet", {"width": 16, "norm": "instance"})])
def test_pruning_halves_channels_keeps_classes_and_the_original(arch, kwargs):
    """sparsity 0.5 removes half of every hidden layer's channels (residual adds and instance norm stay consistent),
    the head keeps its 10 classes, MACs fall 3-4x, and the model handed in is untouched."""
    model = _with_bn_statistics(create_model(arch, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_model(model, SHAPE, sparsity=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    convs = [(a, b) for a, b in zip(model.modules(), pruned.modules()) if isinstance(a, torch.nn.Conv2d)]
    assert all(b.out_channels == a.out_channels - int(a.out_channels * 0.5) for a, b in convs)
    assert convs[0][1].in_channels == 1 and pruned.head.out_features == 10
    assert pruned(torch.randn(3, *SHAPE)).shape == (3, 10)
    ratio = count_macs(model, SHAPE) / count_macs(pruned, SHAPE)
    assert 2.5 < ratio < 5.0, ratio  # the first layer keeps its one input channel
    # pruning copies the kept channels' weights: the first convolution's surviving filters are the teacher's own
    first, kept = convs[0]
    assert all(any(torch.equal(w, v) for v in first.weight) for w in kept.weight)


@pytest.mark.parametrize("arch, kwargs", [("resnet8", {"in_channels": 1}), ("convnet", {"width": 16, "norm": "instance"})])
def test_a_macs_target_is_met_without_overshooting(arch, kwargs):
    model = _with_bn_statistics(create_model(arch, **kwargs))
    teacher_macs = count_macs(model, SHAPE)
    for factor in (2, 4):
        target = parse_macs_target(f"{factor}x", teacher_macs)
        macs = count_macs(prune_model(model, SHAPE, target_macs=target), SHAPE)
        assert 0.75 * target < macs <= target, (factor, macs, target)  # whole channels: small layers move in steps


def test_taylor_importance_uses_synthetic_batches_and_differs_from_magnitude():
    from datafree.compress.prune import synthetic_batches

    model = _with_bn_statistics(create_model("lenet5"))
    images, classes = synthetic_batches(model, SHAPE, 10, images=32, steps=3)
    assert images.shape == (32, *SHAPE) and classes.tolist()[:11] == [*range(10), 0]
    with pytest.raises(UserError, match="synthetic batches"):
        prune_model(model, SHAPE, sparsity=0.5, importance="taylor")
    taylor = prune_model(model, SHAPE, sparsity=0.5, importance="taylor", batches=images)
    magnitude = prune_model(model, SHAPE, sparsity=0.5)
    assert count_macs(taylor, SHAPE) == count_macs(magnitude, SHAPE)
    assert not torch.equal(taylor.body[0].weight, magnitude.body[0].weight)  # other channels kept


def test_a_pruned_model_saves_and_loads_with_its_layer_sizes(tmp_path):
    model = _with_bn_statistics(create_model("resnet8", in_channels=1))
    pruned = prune_model(model, SHAPE, sparsity=0.25).eval()
    card = save_model(pruned, tmp_path / "p.safetensors", "resnet8", dataset_spec("mnist"))
    assert card["layer_shapes"]["stem.0"] == {"out_channels": 12} and "head" in card["layer_shapes"]
    loaded, _ = load_model(tmp_path / "p.safetensors")
    x = torch.randn(4, *SHAPE)
    assert torch.equal(loaded.eval()(x), pruned(x))
    assert "layer_shapes" not in save_model(model, tmp_path / "m.safetensors", "resnet8", dataset_spec("mnist"))
    # a card that sets anything but a layer size is refused in one sentence
    bad = dict(card, layer_shapes={"stem.0": {"padding": 3}})
    bad.pop("sha256")
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="not a layer size"):
        load_model(tmp_path / "p.safetensors")


def test_macs_targets_and_refusals_in_one_sentence(tmp_path, capsys):
    assert parse_macs_target("4x", 1000) == 250 and parse_macs_target("0.5k", 1000) == 500
    for bad, words in (("0.5x", "reduction above 1"), ("lots", "neither a count"), ("2000", "not below the teacher")):
        with pytest.raises(UserError, match=words):
            parse_macs_target(bad, 1000)
    out = tmp_path / "out"
    cases = [
        (["--teacher", str(ROOT / "assets/suite/fmnist_resnet8.ts")], "is TorchScript, whose layers cannot be rewritten"),
        (["--teacher", str(ROOT / "assets/suite/mnist_owner_resgap.pt2")], "is a torch.export .pt2 program, whose layers cannot"),
        (["--sparsity", "0.5", "--target-macs", "2x"], "give either sparsity or target_macs, not both"),
        (["--target-macs", "1G"], "is not below the teacher's"),
        (["--sparsity", "1.5"], "'sparsity' must be less than 1"),
        (["--teacher", str(tmp_path / "missing.safetensors")], "no teacher file at"),
    ]
    for flags, words in cases:
        assert main(["compress", "--out", str(out), "--steps", "2", "--no-progress", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not out.exists()  # nothing half-written


@pytest.mark.real_data
def test_compress_end_to_end_reads_real_data_only_after_every_stage(tmp_path, monkeypatch, capsys):
    """prune -> recover -> int8 + ONNX -> stage table; the real test set is loaded once every stage is written."""
    from datafree.data import datasets

    out = tmp_path / "c"
    loads, original = [], datasets.load_dataset

    def watched(*args, **kwargs):
        loads.append((out / "handoff" / "student.onnx").is_file() and (out / "handoff" / "student_int8.pt2").is_file())
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", watched)
    assert main(["compress", "--teacher", str(TEACHERS / "mnist_lenet5.safetensors"), "--target-macs", "2x", "--steps", "24",
                 "--precision", "fp32", "--eval-data", "mnist", "--out", str(out), "--no-progress"]) == 0
    assert loads == [True]  # one load, after the handoff was complete
    summary = json.loads((out / "compress.json").read_text())
    rows = {r["stage"]: r for r in summary["stages"]}
    assert list(rows) == ["teacher", "pruned", "recovered", "int8"]
    teacher_macs = rows["teacher"]["macs"]
    assert rows["pruned"]["macs"] <= teacher_macs / 2 and rows["recovered"]["macs"] == rows["pruned"]["macs"]
    assert rows["recovered"]["parameters"] < rows["teacher"]["parameters"]
    assert rows["teacher"]["holdout_agreement"] == 100.0 and rows["teacher"]["test_accuracy"] > 98
    assert rows["int8"]["weight_bytes"] * 3 < rows["recovered"]["weight_bytes"] < rows["teacher"]["weight_bytes"]
    assert all(r["latency_ms"]["batch_1"] > 0 for r in rows.values())
    recovered, card = load_model(out / "recovery" / "student.safetensors")
    assert card["arch"] == "lenet5" and card["layer_shapes"] and recovered.head.out_features == 10
    handoff = json.loads((out / "handoff" / "model_card.json").read_text())
    assert handoff["compression"]["stages"] == summary["stages"] and handoff["onnx"]["argmax_agreement"] == 100.0
    assert "| pruned |" in (out / "COMPRESS.md").read_text() and "## ONNX" in (out / "handoff" / "MODEL_CARD.md").read_text()
    assert json.loads((out / "recovery" / "summary.json").read_text()).get("student_test_accuracy") is None  # recovery read none
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"] == summary["stages"]
    assert summary["recovery"].get("guard") is None and (out / "guard.safetensors").is_file()  # the check is off by default


def test_a_recovery_worse_than_the_pruned_network_is_not_handed_over(tmp_path):
    """The check after recovery: a 'recovered' network that calls everything one class loses to the pruned
    one on the independent synthetic images, and the pruned network takes its place in the recovery folder."""
    from datafree.base.io import save_tensors
    from datafree.compress.job import keep_the_better
    from datafree.data.datasets import InputSpec
    from datafree.teachers.formats import save_model

    teacher, card = load_model(TEACHERS / "mnist_lenet5.safetensors")
    spec = InputSpec.from_dict(card["input_spec"])
    (tmp_path / "recovery").mkdir()
    save_model(teacher, tmp_path / "pruned.safetensors", "lenet5", spec)
    collapsed, _ = load_model(TEACHERS / "mnist_lenet5.safetensors")
    with torch.no_grad():
        collapsed.head.weight.zero_()
        collapsed.head.bias.copy_(torch.arange(10.0) == 8)
    save_model(collapsed, tmp_path / "recovery" / "student.safetensors", "lenet5", spec, selected_step=40)
    from datafree.compress.prune import synthetic_batches

    images, _ = synthetic_batches(teacher, (1, 28, 28), 10, images=40, steps=20)  # a class each: ten classes
    save_tensors(tmp_path / "guard.safetensors", {"images": images})
    notes = []
    guard = keep_the_better(tmp_path, teacher.eval(), card, spec, notes.append)
    assert guard["kept"] == "pruned" and guard["agreement"]["pruned"] == 100.0 and guard["agreement"]["recovered"] < 50
    kept, kept_card = load_model(tmp_path / "recovery" / "student.safetensors")
    assert torch.equal(kept.head.weight, teacher.head.weight) and kept_card["selected_step"] == 0 and "pruned" in notes[0]
    assert (tmp_path / "recovery" / "student.pt2").is_file()


def test_onnx_matches_the_pt2_program_at_any_batch(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from datafree.outputs.export import export_program
    from datafree.outputs.onnx import export_onnx

    spec = dataset_spec("mnist")
    model = _with_bn_statistics(create_model("lenet5_half"))
    export_program(model, spec, tmp_path / "student.pt2")
    record = export_onnx(tmp_path / "student.pt2", tmp_path / "student.onnx", check_images=torch.rand(20, *SHAPE), repeats=3)
    assert record["argmax_agreement"] == 100.0 and record["max_abs_logit_diff"] <= 1e-4
    assert "20 from the transfer set" in record["checked_on"] and record["latency_ms"]["batch_64"] > 0
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    session = ort.InferenceSession(str(tmp_path / "student.onnx"))
    for batch in (1, 7):  # the batch axis is dynamic
        x = torch.rand(batch, *SHAPE)
        got = session.run(None, {"images": x.numpy().astype(np.float32)})[0]
        assert np.abs(got - program(x).detach().numpy()).max() <= 1e-4


def test_an_onnx_file_that_disagrees_is_refused_and_removed(tmp_path, monkeypatch):
    import datafree.outputs.onnx as onnx_module
    from datafree.outputs.export import export_program

    export_program(create_model("lenet5_half").eval(), dataset_spec("mnist"), tmp_path / "student.pt2")
    monkeypatch.setattr(onnx_module, "TOLERANCE", -1.0)  # any difference, even none, is too much
    with pytest.raises(UserError, match="disagrees with student.pt2"):
        onnx_module.export_onnx(tmp_path / "student.pt2", tmp_path / "student.onnx", repeats=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt2"]

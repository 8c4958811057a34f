"""Privacy audit, report and handoff package."""
import json

import pytest
import torch

from conftest import TEACHERS
from datafree.cli import main
from datafree.data.datasets import ImageSet, load_dataset
from datafree.outputs.audit import audit_set
from datafree.outputs.export import load_image_set, save_image_set
from datafree.teachers.formats import load_teacher


@pytest.fixture(scope="module")
def real(real_data):
    full = load_dataset("mnist", train=True)
    return ImageSet(full.images[:6000], full.labels[:6000], full.spec, name="mnist")


def _class_means(real: ImageSet, per_class: int = 3) -> ImageSet:
    """Clearly synthetic images: averages of 40 random training digits of one class."""
    g = torch.Generator().manual_seed(0)
    images, labels = [], []
    for c in range(10):
        idx = torch.nonzero(real.labels == c).flatten()
        for _ in range(per_class):
            images.append(real.images[idx[torch.randperm(len(idx), generator=g)[:40]]].mean(0))
            labels.append(c)
    return ImageSet(torch.stack(images), torch.tensor(labels), real.spec, name="means")


def test_audit_flags_planted_real_images_and_passes_clean_ones(real):
    clean = _class_means(real)
    report = audit_set(clean, real)
    assert report["verdict"] == "pass" and report["pixel"]["near_copies"] == 0
    assert report["pixel"]["threshold"] > 0 and report["pixel"]["nn1"]["min"] > report["pixel"]["threshold"]

    planted_from = torch.tensor([5, 123, 4567])
    noisy = real.images[planted_from] + 0.01 * torch.randn(3, 1, 28, 28)  # a copy survives slight noise
    mixed = ImageSet(torch.cat([clean.images, noisy]), torch.cat([clean.labels, real.labels[planted_from]]), real.spec)
    report = audit_set(mixed, real)
    assert report["verdict"] == "fail"
    assert report["pixel"]["near_copy_indices"] == [30, 31, 32]
    assert report["pixel"]["nearest_real_index"] == planted_from.tolist()
    assert report["pixel"]["ratio"]["min"] < 0.2


def test_audit_in_teacher_feature_space_and_diversity(real):
    teacher = load_teacher(TEACHERS / "mnist_lenet5.safetensors")
    planted = ImageSet(torch.cat([_class_means(real).images, real.images[:2]]), torch.cat([_class_means(real).labels, real.labels[:2]]),
                       real.spec)
    report = audit_set(planted, real, teacher)
    assert report["feature"]["near_copies"] >= 2 and {30, 31} <= set(report["feature"]["near_copy_indices"])
    diversity = report["diversity"]["pixel"]
    assert diversity["class_coverage"] == 1.0 and diversity["count"] == 32
    assert sum(report["diversity"]["teacher_class_counts"]) == 32


def test_audit_without_real_data_measures_diversity_only(real):
    dupes = ImageSet(torch.cat([real.images[:5], real.images[:5]]), torch.cat([real.labels[:5]] * 2), real.spec)
    report = audit_set(dupes, None)
    assert report["real"] is None and "pixel" not in report
    assert report["diversity"]["pixel"]["exact_duplicates"] == 10
    assert report["diversity"]["pixel"]["class_coverage"] < 1.0


def test_audit_command_updates_manifest_and_report(real, tmp_path, capsys):
    folder = tmp_path / "set"
    leaked = ImageSet(torch.cat([_class_means(real).images, real.images[:1]]), torch.cat([_class_means(real).labels, real.labels[:1]]),
                      real.spec)
    save_image_set(folder, leaked.images, leaked.labels, real.spec, {"method": "test", "ipc": 3, "source": {"name": "mnist"}})
    assert main(["audit", str(folder), "--real", "mnist", "--strict"]) == 1
    assert "fail: 1 near-copies" in capsys.readouterr().out
    audit = json.loads((folder / "audit.json").read_text())
    assert audit["pixel"]["near_copies"] == 1
    _, _, manifest = load_image_set(folder)
    assert manifest["audit"]["verdict"] == "fail"
    assert "Privacy audit" in (folder / "report.html").read_text() and (folder / "report" / "grid.png").is_file()


def test_audit_refuses_mismatched_sizes(real):
    from datafree.base.errors import UserError
    from datafree.data.datasets import InputSpec

    small = ImageSet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), InputSpec(1, 8, (0.0,), (1.0,), [str(i) for i in range(10)]))
    with pytest.raises(UserError, match="1x8x8"):
        audit_set(small, real)


@pytest.mark.real_data
def test_export_student_handoff_package(tmp_path, capsys, monkeypatch):
    """export student writes a loadable package whose card accuracy and teacher agreement match an independent evaluation."""
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config

    cfg = resolve_distill_config("dfq", overrides={
        "teacher": str(TEACHERS / "mnist_lenet5.safetensors"), "out": str(tmp_path / "run"), "steps": 30, "batch_size": 32,
        "student_batch": 32, "student_steps": 5, "pool_size": 256, "eval_every": 3, "checkpoint_every": 3, "grid_every": 3,
        "schedule": "fixed",
        "holdout_every": 2, "generator_kwargs": {"latent_dim": 16, "width": 8}})
    run_distill(cfg, progress=False)
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "report" / "losses.png").is_file()
    out = tmp_path / "handoff"
    assert main(["export", "student", str(tmp_path / "run"), "--out", str(out), "--int8", "--test", "mnist"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture"] == "lenet5_half" and card["parameters"] > 0
    # the card's figures are the handed-off program's, re-measured here on the real MNIST test set: its accuracy
    # against the labels, its agreement with the run's teacher (which takes MNIST-normalised images)
    test = load_dataset("mnist", train=False)
    pixels = test.spec.denormalize(test.images)
    program = torch.export.load(str(out / "student.pt2")).module()
    teacher = load_teacher(TEACHERS / "mnist_lenet5.safetensors")
    with torch.no_grad():
        predicted = torch.cat([program(x) for x in pixels.split(2000)]).argmax(1)
        taught = torch.cat([teacher(teacher.spec.normalize(x)) for x in pixels.split(2000)]).argmax(1)
    percent = lambda hits: hits.float().mean().item() * 100
    assert card["accuracy"]["test_set"] == "mnist"
    assert card["accuracy"]["test_accuracy"] == pytest.approx(percent(predicted == test.labels), abs=0.01)
    assert card["accuracy"]["teacher_agreement"] == pytest.approx(percent(predicted == taught), abs=0.01)
    assert card["latency_ms"]["batch_1"] > 0 and card["latency_ms"]["batch_64"] > 0
    _check_int8(card["int8"], out, test, program, taught)
    # the ONNX file computes what student.pt2 computes, at any batch size, without torch
    import onnxruntime as ort

    onnx = card["onnx"]
    assert onnx["file"] == "student.onnx" and onnx["argmax_agreement"] == 100.0 and onnx["max_abs_logit_diff"] <= 1e-4
    assert "from the transfer set" in onnx["checked_on"] and onnx["latency_ms"]["batch_1"] > 0
    session = ort.InferenceSession(str(out / "student.onnx"))
    onnx_predicted = torch.cat([torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) for x in pixels.split(2000)]).argmax(1)
    assert (onnx_predicted == predicted).float().mean().item() == 1.0
    assert "MODEL_CARD" not in card["load"] and "torch.export.load" in (out / "MODEL_CARD.md").read_text()
    images = torch.rand(3, 1, 28, 28)
    scope = {"images": images}
    exec(card["load"].replace("student.pt2", str(out / "student.pt2")), scope)  # the documented snippet works as written
    assert scope["probabilities"].shape == (3, 10)
    assert main(["export", "student", str(tmp_path / "run"), "--out", str(out)]) == 2  # nothing overwritten
    assert "not empty" in capsys.readouterr().err

    # a quantisation that fails is an error that names it, before anything is written: never a missing file
    import datafree.outputs.handoff

    def broken_prepare(*args):
        raise RuntimeError("no quantiser for this op")

    monkeypatch.setattr(datafree.outputs.handoff, "_import_pt2e", lambda: (broken_prepare, None, None))
    assert main(["export", "student", str(tmp_path / "run"), "--out", str(tmp_path / "failed"), "--int8"]) == 2
    assert "int8 quantisation of the lenet5_half student failed (RuntimeError: no quantiser" in capsys.readouterr().err
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").iterdir())


def _check_int8(q: dict, out, test, float_program, taught):
    """The int8 entry of the card, re-measured on the written files: a static int8 .pt2 of convolutions and linears."""
    from datafree.teachers.formats import load_model

    assert q["file"] == "student_int8.pt2" and not list(out.glob("*.ts"))
    # the card's snippet runs as written, and the program calls only aten ops and the quantize/dequantize ops that
    # torch itself defines (torch.ao.quantization.fx._decomposed): plain torch loads it, no torchao or datafree needed
    scope = {"images": torch.rand(3, 1, 28, 28)}
    exec(q["load"].replace("student_int8.pt2", str(out / "student_int8.pt2")), scope)
    assert scope["probabilities"].shape == (3, 10)
    program = torch.export.load(str(out / "student_int8.pt2"))
    calls = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {c.split(".")[0] for c in calls} == {"aten", "quantized_decomposed"}
    assert "quantized_decomposed.dequantize_per_channel.default" in calls
    held = list(program.state_dict.values()) + list(program.constants.values())
    # every convolution and linear weight is an int8 tensor, and no float copy of them travels along
    student = load_model(out / "student.safetensors")[0]
    weights = {tuple(m.weight.shape) for m in student.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert sum(isinstance(m, torch.nn.Conv2d) for m in student.modules()) == q["quantised_layers"]["conv"] == 3
    assert {tuple(t.shape) for t in held if t.dtype == torch.int8} == weights
    assert not {tuple(t.shape) for t in held if t.is_floating_point()} & weights
    # sizes: bytes of all held tensors (scales and zero points included), and the files on disk
    nbytes = lambda p: sum(t.numel() * t.element_size() for t in list(p.state_dict.values()) + list(p.constants.values()))
    float_bytes = nbytes(torch.export.load(str(out / "student.pt2")))
    assert (q["size_bytes"], q["float_size_bytes"]) == (nbytes(program), float_bytes)
    assert float_bytes / nbytes(program) >= 3.5
    assert (q["file_bytes"], q["float_file_bytes"]) == ((out / "student_int8.pt2").stat().st_size, (out / "student.pt2").stat().st_size)
    # accuracy and teacher agreement of the written int8 program, beside the float one's
    pixels = test.spec.denormalize(test.images)
    with torch.no_grad():
        predicted = torch.cat([program.module()(x) for x in pixels.split(2000)]).argmax(1)
        float_predicted = torch.cat([float_program(x) for x in pixels.split(2000)]).argmax(1)
    percent = lambda hits: hits.float().mean().item() * 100
    assert q["accuracy"]["test_accuracy"] == pytest.approx(percent(predicted == test.labels), abs=0.01)
    assert q["accuracy"]["teacher_agreement"] == pytest.approx(percent(predicted == taught), abs=0.01)
    assert q["float_accuracy"]["test_accuracy"] == pytest.approx(percent(float_predicted == test.labels), abs=0.01)
    assert q["agreement_with_float"]["test"] == pytest.approx(percent(predicted == float_predicted), abs=0.01)
    assert q["agreement_with_float"]["test"] > 95 and abs(q["accuracy_drop"]) < 2
    assert min(q["latency_ms"].values()) > 0 and min(q["float_latency_ms"].values()) > 0

"""Condensation: the matching distance, siamese augmentation, each condenser, export round trips."""
import json

import pytest
import torch
import torch.nn.functional as F

from datafree.augment import ALL_FAMILIES, SiameseAugment
from datafree.cli import main
from datafree.condense import CONDENSERS, CondenseSettings, condense, match_distance
from datafree.data import ImageSet, InputSpec, load_dataset
from datafree.errors import UserError
from datafree.export import load_image_set, save_image_set


@pytest.fixture(scope="module")
def tiny_mnist():
    full = load_dataset("mnist", train=False)
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:20] for c in range(10)])
    return ImageSet(full.images[keep], full.labels[keep], full.spec, name="mnist")


def test_match_distance_zero_for_equal_and_ignores_biases():
    g = [torch.randn(8, 3, 3, 3), torch.randn(8), torch.randn(10, 32), torch.randn(10)]
    assert match_distance(g, g).abs().item() < 1e-5
    other_bias = [g[0], torch.randn(8), g[2], torch.randn(10)]
    assert match_distance(other_bias, g).abs().item() < 1e-5
    flipped = [-g[0], g[1], g[2], g[3]]
    assert match_distance(flipped, g).item() == pytest.approx(2 * 8, rel=1e-4)  # 1 - cos(-1) = 2 per output unit


def test_match_distance_is_per_output_unit():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert match_distance([a], [b]).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_siamese_augment_shares_parameters_and_passes_gradients(family):
    dsa = SiameseAugment(families=(family,))
    real = torch.randn(6, 1, 28, 28)
    syn = real[:2].clone().requires_grad_(True)
    params = dsa.sample(torch.Generator().manual_seed(3))
    out_real, out_syn = dsa.apply(real, params), dsa.apply(syn, params)
    assert torch.allclose(out_real[:2], out_syn, atol=1e-5)  # the same transformation on both batches
    out_syn.sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_siamese_augment_rejects_unknown_family():
    with pytest.raises(UserError, match="unknown augmentation family"):
        SiameseAugment(families=("warp",))


def _fixed_net_loss(source, images, method):
    """The matching loss of ``images`` on one fixed network and real batch (no augmentation)."""
    from datafree.condense import _class_index, gradient_matching_loss
    from datafree.models import create_model

    torch.manual_seed(123)
    net = create_model("convnet", 10, 1, 28, width=16, depth=3, norm="instance")
    rng = torch.Generator().manual_seed(7)
    by_class = _class_index(source.labels, 10)
    if method == "dm":
        with torch.no_grad():
            real = torch.stack([net.forward_features(source.images[idx]).mean(0) for idx in by_class])
            return ((net.forward_features(images) - real) ** 2).sum().item()
    return gradient_matching_loss(net, source.images, by_class, images.clone().requires_grad_(), 1, 20, rng).item()


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_matching_condensers_lower_their_loss(tiny_mnist, method):
    start = condense(tiny_mnist, method, ipc=1, seed=0, iterations=0)
    result = condense(tiny_mnist, method, ipc=1, seed=0, iterations=15, net_width=16, real_per_class=16,
                      outer_loop=1, inner_loop=1, lr_images=0.5)
    assert len(result.history) == 15
    assert result.images.shape == (10, 1, 28, 28) and result.labels.tolist() == list(range(10))
    assert _fixed_net_loss(tiny_mnist, result.images, method) < _fixed_net_loss(tiny_mnist, start.images, method)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_baselines_pick_the_right_counts_per_class(tiny_mnist, method):
    result = condense(tiny_mnist, method, ipc=3, seed=0, net_width=16)
    assert torch.bincount(result.labels, minlength=10).tolist() == [3] * 10
    # selected images are real images of their class
    for img, y in zip(result.images, result.labels):
        matches = (tiny_mnist.images == img).flatten(1).all(1)
        assert matches.any() and tiny_mnist.labels[matches][0] == y
    assert len({img.numpy().tobytes() for img in result.images}) == 30  # no repeats


@pytest.mark.parametrize("method", sorted(CONDENSERS))
def test_condensers_are_deterministic_for_a_seed(tiny_mnist, method):
    kwargs = dict(iterations=2, net_width=8, real_per_class=8, outer_loop=1, inner_loop=1)
    a = condense(tiny_mnist, method, ipc=1, seed=5, **kwargs)
    b = condense(tiny_mnist, method, ipc=1, seed=5, **kwargs)
    assert torch.equal(a.images, b.images)


def test_kmeans_and_noise_initialisation(tiny_mnist):
    for init in ("kmeans", "noise"):
        result = condense(tiny_mnist, "dm", ipc=2, seed=0, iterations=1, net_width=8, real_per_class=8, init=init)
        assert result.images.shape == (20, 1, 28, 28)
    with pytest.raises(UserError, match="unknown initialisation"):
        condense(tiny_mnist, "dm", ipc=2, iterations=1, init="zeros")


def test_bad_input(tiny_mnist):
    with pytest.raises(UserError, match="more than class"):
        condense(tiny_mnist, "random", ipc=21)
    with pytest.raises(UserError, match="unknown condensation method"):
        condense(tiny_mnist, "magic", ipc=1)


def test_export_round_trips_safetensors_and_imagefolder(tiny_mnist, tmp_path):
    from torchvision.datasets import ImageFolder

    images, labels = tiny_mnist.images[::4], tiny_mnist.labels[::4]
    soft = torch.randn(len(labels), 10)
    save_image_set(tmp_path / "set", images, labels, tiny_mnist.spec, {"method": "random", "ipc": 5}, soft)
    back, soft_back, manifest = load_image_set(tmp_path / "set")
    assert torch.equal(back.images, images) and torch.equal(back.labels, labels) and torch.equal(soft_back, soft)
    assert manifest["ipc"] == 5 and manifest["class_names"] == tiny_mnist.spec.class_names
    folder = ImageFolder(str(tmp_path / "set" / "train"))
    assert folder.classes == manifest["class_folders"]
    assert sorted(t for _, t in folder.samples) == sorted(labels.tolist())
    # PNG pixels are the denormalised images to 8 bits
    from torchvision.transforms.functional import pil_to_tensor
    first_path, first_label = folder.samples[0]
    pixels = pil_to_tensor(folder.loader(first_path).convert("L")).float() / 255
    index = int(first_path.rsplit("/", 1)[1].split(".")[0])
    assert torch.allclose(pixels, tiny_mnist.spec.denormalize(images[index:index + 1])[0].clamp(0, 1), atol=1 / 255)
    lines = [json.loads(l) for l in (tmp_path / "set" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(labels) and {"file_name", "label"} <= set(lines[0])


def test_class_names_with_slashes_make_safe_folders(tmp_path):
    spec = InputSpec(1, 4, (0.0,), (1.0,), ["T-shirt/top", "Bag"])
    save_image_set(tmp_path / "s", torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), spec, {})
    assert sorted(p.name for p in (tmp_path / "s" / "train").iterdir() if p.is_dir()) == ["0_T-shirt_top", "1_Bag"]


def test_condense_command_line(tmp_path, capsys):
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--method", "herding", "--net-width", "8",
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    back, _, manifest = load_image_set(tmp_path / "c")
    assert len(back) == 10 and manifest["method"] == "herding" and manifest["source"]["kind"] == "real data"
    assert len(manifest["source"]["sha256"]) == 64
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--out", str(tmp_path / "c")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["condense", "--source", "mnist", "--method", "nope", "--out", str(tmp_path / "d")]) == 2


def test_evaluate_set_command_line(tmp_path, capsys):
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--method", "random", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    assert main(["evaluate-set", str(tmp_path / "c"), "--arch", "lenet5", "--models", "2", "--epochs", "3", "--record"]) == 0
    assert "+-" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["evaluations"][0]["protocol"]["models"] == 2


def test_huggingface_datasets_reads_the_folder(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    images, labels = tiny_mnist.images[::4], tiny_mnist.labels[::4]
    save_image_set(tmp_path / "set", images, labels, tiny_mnist.spec, {"method": "random", "ipc": 5})
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "set" / "train"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == len(labels)
    from torchvision.transforms.functional import pil_to_tensor

    # metadata.jsonl lists the files in index order, and HF keeps that order: images and labels match exactly
    pixels = torch.stack([pil_to_tensor(r["image"].convert("L")).float() / 255 for r in ds])
    assert torch.allclose(pixels, tiny_mnist.spec.denormalize(images).clamp(0, 1), atol=1 / 255)
    assert [r["label"] for r in ds] == labels.tolist()


def test_resumed_condensation_equals_an_uninterrupted_one(tiny_mnist, tmp_path):
    kwargs = dict(iterations=4, net_width=8, real_per_class=8, outer_loop=2, inner_loop=2)
    whole = condense(tiny_mnist, "dsa", 2, seed=3, **kwargs)
    ckpt = tmp_path / "c.pt"
    part = condense(tiny_mnist, "dsa", 2, seed=3, checkpoint=ckpt, **dict(kwargs, iterations=2))
    assert len(part.history) == 2 and ckpt.is_file()
    resumed = condense(tiny_mnist, "dsa", 2, seed=3, checkpoint=ckpt, resume=True, **kwargs)
    assert torch.equal(resumed.images, whole.images)
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="ipc"):
        condense(tiny_mnist, "dsa", 3, seed=3, checkpoint=ckpt, resume=True, **kwargs)
    with pytest.raises(UserError, match="nothing to resume"):
        condense(tiny_mnist, "dsa", 2, seed=3, checkpoint=tmp_path / "none.pt", resume=True, **kwargs)


def test_ctrl_c_keeps_the_last_finished_iteration(tiny_mnist, tmp_path):
    ckpt = tmp_path / "c.pt"

    def interrupt(done, total, record):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        condense(tiny_mnist, "dm", 1, iterations=5, net_width=8, real_per_class=4, checkpoint=ckpt, progress=interrupt)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2


def test_time_budget_is_checked_inside_an_iteration(tiny_mnist):
    import time

    started = time.monotonic()
    result = condense(tiny_mnist, "dc", 2, iterations=1000, net_width=8, real_per_class=8, outer_loop=1000, inner_loop=1,
                      time_budget=1.0)
    assert time.monotonic() - started < 10 and len(result.history) == 1  # one long iteration cut short


def test_data_free_condensation_from_a_transfer_set_with_soft_labels(tiny_mnist, tmp_path, capsys):
    """A folder in the distill run's format (what ``datafree distill`` writes); its images here are
    class-balanced stand-ins so that every class has one, labelled by the shipped teacher."""
    from conftest import TEACHERS
    from datafree.data import no_real_data
    from datafree.io import save_tensors, sha256_file, write_json
    from datafree.teacher import load_teacher
    from datafree.training import predict

    teacher_path = TEACHERS / "mnist_lenet5.safetensors"
    teacher = load_teacher(teacher_path)
    logits = predict(teacher, tiny_mnist.images)
    run = tmp_path / "run"
    run.mkdir()
    save_tensors(run / "transfer.safetensors", {"images": tiny_mnist.images, "teacher_logits": logits, "labels": logits.argmax(1)})
    write_json(run / "manifest.json", {"schema": "datafree-transfer/1", "input_spec": teacher.spec.to_dict(),
                                       "teacher_sha256": sha256_file(teacher_path)})
    (run / "config.yaml").write_text(f"teacher: {teacher_path}\n")
    with no_real_data("the test"):  # any attempt to load a real data set inside would raise
        assert main(["condense", "--source", str(run), "--ipc", "1", "--method", "dm", "--steps", "2",
                     "--net-width", "8", "--real-per-class", "4", "--soft-labels", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    back, soft, manifest = load_image_set(tmp_path / "c")
    assert manifest["source"]["kind"].startswith("transfer set") and manifest["teacher_sha256"] == sha256_file(teacher_path)
    assert soft.shape == (len(back), 10) and torch.allclose(soft.sum(1), torch.ones(len(back)), atol=1e-5)
    assert (tmp_path / "c" / "report.html").is_file() and (tmp_path / "c" / "history.jsonl").is_file()
    (run / "config.yaml").write_text("teacher: /nowhere/teacher.safetensors\n")
    assert main(["condense", "--source", str(run), "--ipc", "1", "--method", "random", "--soft-labels", "--out", str(tmp_path / "d")]) == 2
    assert "soft labels need the run's teacher" in capsys.readouterr().err


def test_condense_command_line_bad_input(tmp_path, capsys):
    from PIL import Image

    mixed = tmp_path / "mixed"
    for i, size in enumerate((8, 8, 9)):
        (mixed / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size)).save(mixed / str(i % 2) / f"{i}.png")
    assert main(["condense", "--source", str(mixed), "--ipc", "1", "--out", str(tmp_path / "o1")]) == 2
    assert "differ in size" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # an output folder that cannot be made (works as root too)
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--method", "random", "--out", str(tmp_path / "a_file" / "x")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["condense", "--source", "mnist", "--ipc", "7000", "--method", "random", "--out", str(tmp_path / "o2")]) == 2
    assert "more than class" in capsys.readouterr().err
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--resume", "--out", str(tmp_path / "o3")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["condense", "--source", "mnist", "--ipc", "1", "--soft-labels", "--out", str(tmp_path / "o4")]) == 2
    assert "distill run" in capsys.readouterr().err

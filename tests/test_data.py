import os

import numpy as np
import pytest
import torch
from PIL import Image

from datafree.base.errors import UserError
from datafree.data.datasets import InputSpec, dataset_spec, load_dataset, no_real_data


@pytest.mark.real_data
@pytest.mark.parametrize("name,classes0", [("mnist", "0"), ("fashion-mnist", "T-shirt/top"), ("FMNIST", "T-shirt/top")])
def test_torchvision_sets_load_from_shared_data(name, classes0):
    test = load_dataset(name, train=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.shape == (10000,) and set(test.labels.tolist()) == set(range(10))
    assert test.spec.class_names[0] == classes0
    # normalised with the data set's own statistics: pixel mean maps close to 0
    pixels = test.spec.denormalize(test.images)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 + 1e-5


@pytest.mark.real_data
def test_mnist_train_split_is_60000():
    assert len(load_dataset("mnist", train=True)) == 60000


def test_missing_files_name_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("DATAFREE_DOWNLOAD", raising=False)
    with pytest.raises(UserError, match="MNIST.*looked for") as missing:
        load_dataset("mnist", data_dir=tmp_path)
    # it says what to set: the folder (flag or variable), or the download (flag or variable)
    assert all(f in str(missing.value) for f in ("--data-dir", "DATAFREE_DATA", "--download", "DATAFREE_DOWNLOAD=1"))
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown data set 'imagenet-mini'"):
        load_dataset("imagenet-mini")
    with pytest.raises(UserError):
        dataset_spec("nope")


def test_npz_round_trip(tmp_path):
    x = (np.random.rand(20, 12, 12) * 255).astype(np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.images.shape == (20, 1, 12, 12) and ds.spec.num_classes == 4
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(x).float() / 255)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(UserError, match="not a readable .npz"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_imagefolder(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray((np.random.rand(8, 8, 3) * 255).astype(np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (6, 3, 8, 8) and ds.spec.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_mixed_sizes_is_a_user_error(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("L", (9, 9)).save(tmp_path / "a" / "1.png")
    with pytest.raises(UserError, match="differ in size"):
        load_dataset(str(tmp_path))


def test_input_spec_parse_and_roundtrip():
    spec = InputSpec.parse("1x28x28:0.1307:0.3081", num_classes=10)
    assert spec.channels == 1 and spec.size == 28 and spec.mean == (0.1307,)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(spec.denormalize(spec.normalize(x)), x, atol=1e-6)
    for bad in ("28x28", "1x28x27", "ax28x28"):
        with pytest.raises(UserError):
            InputSpec.parse(bad)


def test_no_real_data_guard_blocks_loading():
    with no_real_data("a data-free test"):
        with pytest.raises(RuntimeError, match="a data-free test"):
            load_dataset("mnist", train=False)


# --- downloads (from a mirror on this machine: the tests never need the network) -----------------------
@pytest.fixture
def mnist_mirror(tmp_path, monkeypatch):
    """A tiny MNIST (12 train, 6 test images) served over HTTP on 127.0.0.1, as torchvision's MNIST mirror."""
    import gzip
    import hashlib
    import http.server
    import struct
    import threading
    from functools import partial

    import torchvision

    served = tmp_path / "mirror"
    served.mkdir()
    rng = np.random.default_rng(0)
    resources = []
    for split, n in (("train", 12), ("t10k", 6)):
        images = struct.pack(">iiii", 2051, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        labels = struct.pack(">ii", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()
        for kind, raw in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte.gz"
            (served / name).write_bytes(gzip.compress(raw))
            resources.append((name, hashlib.md5((served / name).read_bytes()).hexdigest()))
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    monkeypatch.delenv("DATAFREE_DOWNLOAD", raising=False)
    yield tmp_path / "data"
    server.shutdown()


def test_download_flag_and_variable_fetch_mnist(mnist_mirror, monkeypatch, capsys):
    from datafree.cli import main

    with pytest.raises(UserError, match="--download"):  # never fetched unless asked
        load_dataset("mnist", data_dir=mnist_mirror)
    monkeypatch.setenv("DATAFREE_DOWNLOAD", "1")
    assert len(load_dataset("mnist", train=False, data_dir=mnist_mirror)) == 6
    monkeypatch.delenv("DATAFREE_DOWNLOAD")
    # the command line's --download, here on a fresh folder
    fresh = mnist_mirror.parent / "fresh"
    args = ["teacher", "train", "--dataset", "mnist", "--data-dir", str(fresh), "--epochs", "1", "--out", str(fresh / "t")]
    assert main(args) == 2 and "--download" in capsys.readouterr().err
    assert main([*args, "--download"]) == 0, capsys.readouterr().err
    assert (fresh / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file() and (fresh / "t.safetensors").is_file()
    assert "DATAFREE_DOWNLOAD" not in os.environ  # --download lasts as long as its command


def test_a_failed_download_says_so(mnist_mirror, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    with pytest.raises(UserError, match="downloading it failed") as failed:
        load_dataset("mnist", data_dir=mnist_mirror, download=True)
    assert "--data-dir" in str(failed.value) and "\n" not in str(failed.value)

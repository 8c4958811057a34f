import functools
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
if not os.environ.get("DATAFREE_DATA") and SHARED_DATA.is_dir():  # the tests find the data in ../shared/data
    os.environ["DATAFREE_DATA"] = str(SHARED_DATA)
TEACHERS = ROOT / "assets" / "teachers"
REAL_SETS = ("MNIST", "FashionMNIST")  # torchvision's folder names under the data root
NO_DATA = "real data not found:"
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: reads MNIST / Fashion-MNIST; skipped (saying why) when they are not found")


def real_data_missing() -> str | None:
    """Why the real-data tests cannot run here (None when MNIST and Fashion-MNIST are under the data root).

    With DATAFREE_DOWNLOAD=1, missing sets are downloaded first (where the network allows).
    """
    from datafree.base.errors import UserError
    from datafree.data.datasets import data_root, download_allowed, load_dataset

    root = data_root()
    missing = [name for name in REAL_SETS if not all((root / name / "raw" / f).is_file() for f in RAW_FILES)]
    if missing and download_allowed():
        try:
            for name in missing:
                load_dataset(name, train=False)  # torchvision fetches both splits
        except UserError as e:
            return f"{NO_DATA} {e}"
        return None
    if missing:
        return (f"{NO_DATA} no {' or '.join(missing)} under {root} (the tests look in ../shared/data, else where DATAFREE_DATA "
                "points; set DATAFREE_DATA=/path/to/data, or DATAFREE_DOWNLOAD=1 to download them)")
    return None


@functools.cache
def _real_data_reason() -> str | None:
    return real_data_missing()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``real_data`` are skipped, with the reason, when the data is not found."""
    marked = [item for item in items if item.get_closest_marker("real_data")]
    reason = _real_data_reason() if marked else None
    for item in marked if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def real_data():
    """For fixtures that load MNIST / Fashion-MNIST: skips whatever uses them, with the reason, when the data is not found."""
    reason = _real_data_reason()
    if reason:
        pytest.skip(reason)


def pytest_terminal_summary(terminalreporter, config):
    """One line saying why the real-data tests were skipped, even under -q (which hides skip reasons)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_DATA in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} real-data tests skipped, {_real_data_reason()}", yellow=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_teacher(tmp_path):
    """A freshly initialised lenet5 (with BN running stats that are not trivial) saved as safetensors + card."""
    from datafree.data.datasets import dataset_spec
    from datafree.models.zoo import create_model
    from datafree.teachers.formats import save_model

    model = create_model("lenet5")
    model.train()
    with torch.no_grad():  # give the BN layers real running statistics
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28))
    model.eval()
    path = tmp_path / "tiny.safetensors"
    save_model(model, path, "lenet5", dataset_spec("mnist"), dataset="mnist")
    return path, model

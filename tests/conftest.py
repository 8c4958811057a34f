import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("DATAFREE_DATA", str(SHARED_DATA))
TEACHERS = ROOT / "assets" / "teachers"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_teacher(tmp_path):
    """A freshly initialised lenet5 (with BN running stats that are not trivial) saved as safetensors + card."""
    from datafree.data import dataset_spec
    from datafree.models import create_model
    from datafree.teacher import save_model

    model = create_model("lenet5")
    model.train()
    with torch.no_grad():  # give the BN layers real running statistics
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28))
    model.eval()
    path = tmp_path / "tiny.safetensors"
    save_model(model, path, "lenet5", dataset_spec("mnist"), dataset="mnist")
    return path, model

"""Doctests: the test command runs every ``>>>`` example in ``datafree/`` and ``generators/``
(``--doctest-modules``). Examples that read a real data set carry the ``real_data`` mark, so they
are skipped, saying why, where MNIST / Fashion-MNIST are not found (``tests/conftest.py``)."""
import os

# One torch (OpenMP) thread per process, here and in the processes the tests start (they inherit it), unless the
# caller chose: the tests' models are tiny, and where other work shares the cores, two OpenMP threads spin-wait for
# each other (measured on 2 busy cores: a condensation test 168 s with two threads, 4 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402

try:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file
except ValueError:
    pass


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, DoctestItem) and any("load_dataset(" in example.source for example in item.dtest.examples):
            item.add_marker(pytest.mark.real_data)

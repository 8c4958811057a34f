"""Doctests: the test command runs every ``>>>`` example in ``datafree/`` and ``generators/``
(``--doctest-modules``). Examples that read a real data set carry the ``real_data`` mark, so they
are skipped, saying why, where MNIST / Fashion-MNIST are not found (``tests/conftest.py``)."""
import pytest
from _pytest.doctest import DoctestItem


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, DoctestItem) and any("load_dataset(" in example.source for example in item.dtest.examples):
            item.add_marker(pytest.mark.real_data)

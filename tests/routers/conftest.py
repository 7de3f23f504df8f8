"""Router tests run tiny tensors on one intra-op thread (the `one_thread` fixture of tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield

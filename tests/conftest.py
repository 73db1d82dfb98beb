"""Shared fixtures. The tiny models and data themselves are built by ``tests/tiny.py``."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model, save_tiny_gpt2


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test models are tiny: per-op thread hand-offs cost more than the arithmetic, and on a shared
    2-core machine two spinning threads per op slow runs by 10-20x. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))

"""Shared by the interop tests: tiny tensors, so run them on one intra-op thread."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (50x slower on a busy 2-core box), so use one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

"""Fixtures shared by the test files (pytest finds them here)."""

import pytest
import torch


@pytest.fixture(params=[2, 3], ids=["2threads", "3threads"])
def threads(request):
    """torch's intra-op thread count set for the test (the CPU split loops' team size)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)

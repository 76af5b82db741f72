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


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 comparisons mean float32: TF32 off on both sides (cuBLAS, cuDNN and ours) for
    every test, restored after. torch's default has cuDNN's on, so nn.GRU on cuDNN and our
    float32 GEMMs would round to TF32 (about 5e-4 relative) in every float32 CUDA case; the
    tests of the TF32 policy turn it on themselves."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

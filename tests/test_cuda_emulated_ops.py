"""torch.library.opcheck and gradcheck of every op on the CUDA backend, without a GPU: within
emulation.cuda_backend_on_cpu the ops' CPU kernels are the CUDA backend's op entries on the
emulation (ops_cuda.cu's code on CPU tensors, its kernels on CPU threads, a pretend device), so
the checks test_opcheck.py and test_cells_ops.py run on the CPU kernels hold the CUDA backend to
the same: the fake kernels' shapes, dtypes and strides (the workspace's bfloat16 included), the
autograd registration, and the backward against numerical derivatives of the forward (float64,
gradcheck's fast mode: a few random directions, so each check is a few calls), on both paths."""

import emulation
import pytest
import torch
from test_cells_ops import KINDS, _backward_args, op, op_args, wrapper

pytestmark = emulation.needs_emulation
emu = emulation.emu

ALL_KINDS = ["gru", *KINDS]
LAYOUTS = [None, 0, 1]
LAYOUT_IDS = ["padded", "offsets", "packed"]


@pytest.fixture(params=["persistent", "fallback"])
def cuda_backend(emu, request):
    """The CUDA backend in the ops' place for the test, on the path named."""
    emu.backend.set_device(4, 227 * 1024, 9)
    emu.backend.set_knobs(request.param, 0, False, 2, True)
    with emulation.cuda_backend_on_cpu(emu):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_opcheck_on_the_cuda_backend(cuda_backend, dtype, kind, layout):
    ragged = layout is not None
    args = op_args(kind, "cpu", dtype, layout=layout)
    torch.library.opcheck(op(kind, ragged), (*args, True))
    torch.library.opcheck(op(kind, ragged, "backward"), _backward_args(kind, layout, "cpu", dtype))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("D,bias,batch_first", [(1, True, False), (2, False, True)])
def test_gradcheck_on_the_cuda_backend(cuda_backend, kind, layout, D, bias, batch_first):
    args = op_args(kind, "cpu", D=D, bias=bias, batch_first=batch_first, layout=layout)
    fn = wrapper(kind, layout is not None)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), args, eps=1e-6, atol=1e-8, fast_mode=True)

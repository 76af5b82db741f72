"""The persistent kernels with and without tensor cores, switched in one process through the ctypes
hooks of csrc/cuda (varlen_rnn_cuda_set_knobs_for_testing forces the persistent path,
varlen_rnn_cuda_set_tensor_cores_for_testing is VARLEN_RNN_TENSOR_CORES): the two agree within the
compute precision (TF32, bfloat16, float16), VARLEN_RNN_TENSOR_CORES=0 gives bit for bit what the
environment variable gives, and float32 without TF32 never takes the tensor-core path. Every GPU
test skips with a reason on a machine without CUDA; the hook's export is checked wherever the
extension was built with CUDA."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch
from testing import HAS_CUDA

import varlen_rnn

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
needs_sm80 = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] < 8,
    reason="no CUDA device" if not HAS_CUDA else "the tensor-core (mma.sync) path needs sm_80+",
)
# ||a - b|| / ||b|| allowed between the tensor-core and the exact kernels (the same bounds as
# benchmarks/gpu_smoke.py's MMA_TOL: about ten units of the product's input precision).
MMA_TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SHAPE = dict(T=9, B=11, I=6, H=40, layers=2)  # 11 rows: two 8-row mma tiles, the second ragged


def _lib():
    return ctypes.CDLL(varlen_rnn._C.__file__)


def set_tensor_cores(on: int) -> int:
    f = _lib().varlen_rnn_cuda_set_tensor_cores_for_testing
    f.argtypes, f.restype = [ctypes.c_int], ctypes.c_int
    return f(on)


def set_path(path: str) -> None:
    f = _lib().varlen_rnn_cuda_set_knobs_for_testing
    f.argtypes, f.restype = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int], ctypes.c_int
    assert f(path.encode(), 0, 0) == 0


@pytest.fixture(autouse=True)
def restore_knobs():
    if not varlen_rnn.WITH_CUDA:
        yield
        return
    before = set_tensor_cores(-1)
    yield  # (TF32 flags: conftest.py's no_tf32 restores them)
    set_tensor_cores(before)
    set_path(os.environ.get("VARLEN_RNN_CUDA_PATH", "auto") or "auto")


def test_tensor_core_hook_exported_when_built_with_cuda():
    if not varlen_rnn.WITH_CUDA:
        pytest.skip("varlen_rnn was built without CUDA (no toolkit, or a CPU torch)")
    start = set_tensor_cores(-1)
    expected = {"0": 0, "1": 1}.get(os.environ.get("VARLEN_RNN_TENSOR_CORES"), 2)
    assert start == expected, "the default (unset or auto) is 2: priced by the cost model"
    assert set_tensor_cores(0) == start
    assert set_tensor_cores(-1) == 0, "-1 only reads"
    assert set_tensor_cores(1) == 0
    assert set_tensor_cores(2) == 1
    assert set_tensor_cores(7) == 2, "above 1 means auto"
    assert set_tensor_cores(start) == 2


def last_exchange(backward: int) -> int:
    """csrc/cuda/launch.h's Exchange code of the last forward (0) or backward (1) pass."""
    f = _lib().varlen_rnn_cuda_last_exchange_for_testing
    f.argtypes, f.restype = [ctypes.c_int], ctypes.c_int
    return f(backward)


EXACT, MMA_FP32, MMA_16 = 1, 2, 3  # launch.h's Exchange


def run(dtype, seed=0, H=None):
    """[out, h_n, d x, d params...] of a bidirectional 2-layer GRU on the persistent path."""
    T, B, I, L = SHAPE["T"], SHAPE["B"], SHAPE["I"], SHAPE["layers"]
    H = H or SHAPE["H"]
    torch.manual_seed(seed)
    gru = varlen_rnn.GRU(I, H, L, bidirectional=True).to("cuda", dtype)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    x = torch.randn(T, B, I, generator=g).to("cuda", dtype).requires_grad_()
    w = torch.randn(T, B, 2 * H, generator=g).to("cuda", dtype)
    out, h = gru(x, lengths=lengths)
    grads = torch.autograd.grad((out * w).float().sum() + h.float().sum(), [x, *gru.parameters()])
    return [t.detach().float().cpu() for t in (out, h, *grads)]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@needs_sm80
@pytest.mark.parametrize("H", [40, 37], ids=["vector-rows", "scalar-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_cores_agree_with_the_exact_kernels(dtype, H):
    # H = 40: h and dgh rows are whole 16-byte vectors (stage_row's vector copies); H = 37 not.
    set_path("persistent")
    torch.backends.cudnn.allow_tf32 = True  # float32: the TF32 mma path
    set_tensor_cores(0)
    exact = run(dtype, H=H)
    assert (last_exchange(0), last_exchange(1)) == (EXACT, EXACT)
    set_tensor_cores(1)
    mma = run(dtype, H=H)
    want = MMA_FP32 if dtype == torch.float32 else MMA_16  # 16-bit h published between blocks
    assert (last_exchange(0), last_exchange(1)) == (want, want)
    errs = [rel(a, b) for a, b in zip(mma, exact)]
    assert max(errs) <= MMA_TOL[dtype], errs
    # The knob reaches the kernels: rounding h to the product's precision changes the bits.
    assert any(not torch.equal(a, b) for a, b in zip(mma, exact)), "tensor cores had no effect"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_off_is_bitwise_the_environment_variable(dtype):
    """VARLEN_RNN_TENSOR_CORES=0 read at start-up (a child process) and the hook set to 0 here
    give the same bits: both run the exact kernels."""
    set_path("persistent")
    torch.backends.cudnn.allow_tf32 = True
    set_tensor_cores(0)
    here = run(dtype)
    code = (
        "import sys, torch, varlen_rnn; sys.path.insert(0, sys.argv[1]);"
        "import test_cuda_tensor_cores as t; torch.backends.cudnn.allow_tf32 = True;"
        f"torch.save(t.run(torch.{str(dtype).split('.')[1]}), sys.argv[2])"
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tc_off_{os.getpid()}.pt")
    env = dict(os.environ, VARLEN_RNN_TENSOR_CORES="0", VARLEN_RNN_CUDA_PATH="persistent")
    try:
        # under the GPU check's 60 s a test, so a hung child fails this test alone
        r = subprocess.run(
            [sys.executable, "-c", code, os.path.dirname(__file__), out],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=45,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        child = torch.load(out)
    finally:
        if os.path.exists(out):
            os.remove(out)
    for a, b in zip(here, child):
        assert torch.equal(a, b)


@needs_cuda
def test_float32_without_tf32_never_takes_tensor_cores():
    """nn.GRU's policy: with cudnn.allow_tf32 off, float32 is exact, knob or not."""
    set_path("persistent")
    torch.backends.cudnn.allow_tf32 = False
    set_tensor_cores(1)
    on = run(torch.float32)
    set_tensor_cores(0)
    off = run(torch.float32)
    for a, b in zip(on, off):
        assert torch.equal(a, b)

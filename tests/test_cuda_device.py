"""What only a GPU can show about the CUDA kernels, beside test_cuda.py's parity tests. The CPU
emulation (tests/cuda_emulation) runs the same kernel code on x86 threads, which forgive misaligned
loads, see every store at once (a strong memory model) and all make progress; a GPU does none of
that. So, on a device:
- misaligned views: hx one element into its storage (contiguous, as a slice of a larger tensor is,
  but no row 16-byte aligned) must stage one element per load (a 16-byte load would fault with a
  misaligned address, which kills the context: hence a child process) and give the aligned hx's
  bits, on every path and exchange; a non-contiguous input likewise;
- the exchange between blocks under load: a grid of one block per SM over hundreds of steps, each
  step reading h that every other block wrote before the grid barrier (a stale L1 line or a missing
  fence shows as a result that differs run to run or from the fallback);
- the tagged exchange (VARLEN_RNN_EXCHANGE=tagged: the blocks poll words of value and step, h in
  the forward and dgh in the backward, instead of meeting at a grid barrier) on the GPU's weak
  memory model: the barrier's bits for every cell, over every SM, with several row tiles and with
  K in chunks;
- forward progress: persistent launches on two streams at once while a GEMM fills the device must
  finish (a grid barrier whose blocks are not all resident waits forever: hence a child process
  with a timeout under the check script's per-test limit);
- a tensor on a device other than the current one (needs two GPUs).
Every test skips with a reason on a machine without CUDA."""

import ctypes

import cuda_testing
import pytest
import torch
from cuda_testing import child, needs_cuda, set_knobs
from testing import TOL

import varlen_rnn

# The shared fixtures: knobs reset per test (TF32 is off for every test: conftest.py).
auto_knobs_after = cuda_testing.auto_knobs_after

# The child processes' common part: the ctypes hooks and a GRU layer's results.
HOOKS = r"""
import ctypes, torch, varlen_rnn
lib = ctypes.CDLL(varlen_rnn._C.__file__)
knobs = lib.varlen_rnn_cuda_set_knobs_for_testing
knobs.argtypes, knobs.restype = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int], ctypes.c_int
tensor_cores = lib.varlen_rnn_cuda_set_tensor_cores_for_testing
tensor_cores.argtypes, tensor_cores.restype = [ctypes.c_int], ctypes.c_int
exchange = lib.varlen_rnn_cuda_last_exchange_for_testing
exchange.argtypes, exchange.restype = [ctypes.c_int], ctypes.c_int
row_slices = lib.varlen_rnn_cuda_set_row_slices_for_testing
row_slices.argtypes, row_slices.restype = [ctypes.c_longlong], ctypes.c_longlong
last_slices = lib.varlen_rnn_cuda_last_row_slices_for_testing
last_slices.argtypes, last_slices.restype = [ctypes.c_int], ctypes.c_longlong

def layer(args, lengths):
    args = [a.detach().requires_grad_() for a in args]
    out, h = varlen_rnn.ops.gru_layer(args[0], lengths, *args[1:])
    g = torch.Generator(device=out.device).manual_seed(1)
    w = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
    return [out, h, *torch.autograd.grad((out * w).sum() + h.sum(), args)]
"""

MISALIGNED = (
    HOOKS
    + r"""
T, B, I, H, D = 7, 11, 5, 40, 2  # H = 40: whole 16-byte vectors per row in every dtype
lengths = torch.tensor([7, 0, 3, 7, 1, 5, 2, 6, 4, 0, 7], device="cuda")

def leaf(shape, dtype, seed, offset=0):
    v = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    storage = torch.zeros(offset + v.numel(), dtype=dtype, device="cuda")
    return storage[offset:].copy_(v.flatten().to("cuda", dtype)).view(shape)

# (path, tensor cores, dtype, TF32, the exchange the forward must take: launch.h's Exchange)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CASES = [("persistent", 0, d, False, 1) for d in DTYPES]
if torch.cuda.get_device_capability()[0] >= 8:
    CASES += [("persistent", 1, torch.float32, True, 2), ("persistent", 1, torch.float16, False, 3),
              ("persistent", 1, torch.bfloat16, False, 3)]
CASES += [("fallback", 0, torch.float32, False, 0), ("fallback", 0, torch.bfloat16, False, 0)]
for path, tc, dtype, tf32, want in CASES:
    assert knobs(path.encode(), 0, 0) == 0
    tensor_cores(tc)
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = [(T, B, I), (D, B, H), (D, 3 * H, I), (D, 3 * H, H), (D, 3 * H), (D, 3 * H)]
    aligned = [leaf(s, dtype, i) for i, s in enumerate(shapes)]
    expected = layer(aligned, lengths)
    assert exchange(0) == want, (path, tc, dtype, exchange(0), want)
    shifted = list(aligned)
    shifted[1] = leaf(shapes[1], dtype, 1, offset=1)  # hx: no row 16-byte aligned
    assert shifted[1].is_contiguous() and shifted[1].data_ptr() % 16 != 0
    # x non-contiguous: the same values batch-major in memory, a time-major view of them
    shifted[0] = aligned[0].transpose(0, 1).contiguous().transpose(0, 1)
    got = layer(shifted, lengths)
    torch.cuda.synchronize()
    for name, a, e in zip(["out", "h_n", "x", "hx", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        assert torch.equal(a, e), (path, tc, dtype, name, (a - e).abs().max().item())
print("misaligned ok", len(CASES))
"""
)


@needs_cuda
def test_cuda_misaligned_hx_and_strided_input_give_the_aligned_bits():
    r = child(MISALIGNED, timeout=50)
    assert r.returncode == 0 and "misaligned ok" in r.stdout, r.stderr[-3000:]


def _all_sms_gru(dtype, D=2):
    """A GRU layer whose persistent grid is one block per SM (plan.h: J = 4 units per block)."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    H = 4 * (sms // D)
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(8, H, bidirectional=D == 2, dtype=dtype, device="cuda")
    return gru, H


def _run_long(gru, dtype, T=300, B=5):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(T, B, 8, generator=g, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.tensor([T, T - 1, T // 2, 1, T - 7], device="cuda")
    out, h = gru(x, lengths=lengths)
    w = torch.randn(out.shape, generator=g, device="cuda", dtype=dtype)
    grads = torch.autograd.grad((out * w).sum() + h.sum(), [x, *gru.parameters()])
    return [out, h, *grads]


@needs_cuda
def test_cuda_exchange_over_every_sm_and_many_steps_equals_the_fallback():
    """float64: the persistent kernels (one block per SM, 300 grid barriers each way) against the
    per-step fallback; any h or dgh read before its writer's store reached L2 changes the result
    far beyond the summation-order difference allowed here."""
    gru, _ = _all_sms_gru(torch.float64)
    results = {}
    for p in ("persistent", "fallback"):
        set_knobs(p)
        results[p] = _run_long(gru, torch.float64)
    for i, (a, e) in enumerate(zip(results["persistent"], results["fallback"], strict=True)):
        torch.testing.assert_close(a, e, **TOL[torch.float64], msg=lambda m: f"tensor {i}: {m}")


@needs_cuda
@pytest.mark.parametrize(
    "dtype,tensor_cores",
    [(torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 1)],
    ids=["f32", "bf16-exact", "bf16-mma"],
)
def test_cuda_exchange_over_every_sm_is_deterministic(dtype, tensor_cores):
    """Three runs of the persistent kernels over every SM (fp32 h on CUDA cores; bf16 on tensor
    cores publishes h in bf16): bit for bit the same, which a race between blocks or a stale read
    would break."""
    if tensor_cores and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core (mma.sync) path needs sm_80+")
    set_knobs("persistent")
    hook = ctypes.CDLL(varlen_rnn._C.__file__).varlen_rnn_cuda_set_tensor_cores_for_testing
    hook.argtypes, hook.restype = [ctypes.c_int], ctypes.c_int
    before = hook(tensor_cores)
    try:
        gru, _ = _all_sms_gru(dtype)
        first = _run_long(gru, dtype)
        for _ in range(2):
            for i, (a, e) in enumerate(zip(_run_long(gru, dtype), first, strict=True)):
                assert torch.equal(a, e), f"tensor {i} differs between identical runs"
    finally:
        hook(before)


TAGGED = (
    HOOKS
    + r"""
set_exchange = lib.varlen_rnn_cuda_set_exchange_for_testing
set_exchange.argtypes, set_exchange.restype = [ctypes.c_int], ctypes.c_int
tensor_cores(0)  # the exact kernels, where the tagged exchange runs
torch.backends.cudnn.allow_tf32 = False
sms = torch.cuda.get_device_properties(0).multi_processor_count
T, I = 300, 8

def results(mod, B):
    g = torch.Generator(device="cuda").manual_seed(B)
    x = torch.randn(T, B, I, generator=g, device="cuda", dtype=mod.weight_hh_l0.dtype)
    x.requires_grad_()
    lengths = torch.randint(1, T + 1, (B,), generator=g, device="cuda")
    lengths[0], lengths[-1] = T, 1
    out, h = mod(x, lengths=lengths)
    hs = list(h) if isinstance(h, tuple) else [h]  # the LSTM's (h, c)
    w = torch.randn(out.shape, generator=g, device="cuda", dtype=out.dtype)
    loss = (out * w).sum() + hs[0].sum()
    return [out, *hs, *torch.autograd.grad(loss, [x, *mod.parameters()])]

n = 0
for cls in (varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN):
    for dtype in (torch.float32, torch.bfloat16):
        # (B, K-chunk cap, directions, row slices): one block per SM with both directions; two
        # row tiles (of 32 rows: the child's VARLEN_RNN_PERSISTENT_MAX_ROWS) in every block; the
        # rows split between 4 blocks per unit slice; K in chunks of 64 (h_prev from the tagged
        # words, not the tile)
        for B, max_kc, D, slices in ((5, 0, 2, 0), (40, 0, 1, 1), (40, 0, 1, 4), (5, 64, 1, 0)):
            torch.manual_seed(0)
            mod = cls(I, 4 * (sms // D), bidirectional=D == 2, device="cuda", dtype=dtype)
            assert knobs(b"persistent", max_kc, 0) == 0
            row_slices(slices)
            set_exchange(0)
            expected = results(mod, B)
            assert (exchange(0), exchange(1)) == (1, 1), (exchange(0), exchange(1))
            if slices:
                assert last_slices(0) == last_slices(1) == slices, (last_slices(0), last_slices(1))
            set_exchange(1)
            for rep in range(2):
                got = results(mod, B)
                assert (exchange(0), exchange(1)) == (4, 4), (exchange(0), exchange(1))
                for i, (a, e) in enumerate(zip(got, expected)):
                    assert torch.equal(a, e), (cls.__name__, dtype, B, max_kc, D, rep, i,
                                               (a - e).abs().max().item())
            n += 1
torch.cuda.synchronize()
print("tagged ok", n)
"""
)


@needs_cuda
def test_cuda_tagged_exchange_gives_the_barriers_bits():
    """The tagged exchange (forward and backward) against the grid barrier, each cell in float32
    and bfloat16 (exact kernels), one block per SM over 300 steps: every output and gradient bit
    for bit, twice.
    A word read before its writer's store, or a buffer overwritten while a slower block still
    reads it, changes bits; a poll that never ends is the child's timeout."""
    r = child(TAGGED, env={"VARLEN_RNN_PERSISTENT_MAX_ROWS": "32"}, timeout=60)  # B=40: two tiles
    assert r.returncode == 0 and "tagged ok" in r.stdout, r.stderr[-3000:]


ROW_SLICES = (
    HOOKS
    + r"""
torch.backends.cudnn.allow_tf32 = False
T, B, I, H = 60, 150, 8, 64  # K = H and 3H (4H) in one chunk whatever the slices
assert knobs(b"persistent", 0, 0) == 0

def results(mod):
    g = torch.Generator(device="cuda").manual_seed(B)
    x = torch.randn(T, B, I, generator=g, device="cuda", dtype=mod.weight_hh_l0.dtype)
    x.requires_grad_()
    lengths = torch.randint(0, T + 1, (B,), generator=g, device="cuda")
    lengths[0] = T
    out, h = mod(x, lengths=lengths)
    hs = list(h) if isinstance(h, tuple) else [h]
    w = torch.randn(out.shape, generator=g, device="cuda", dtype=out.dtype)
    loss = (out * w).sum() + hs[0].sum()
    return [out, *hs, *torch.autograd.grad(loss, [x, *mod.parameters()])]

n = 0
tensor_cores(0)  # the exact kernels (on tensor cores the split of K among warps follows the cut)
for cls in (varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN):
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        mod = cls(I, H, bidirectional=True, device="cuda", dtype=dtype)
        row_slices(1)
        expected = results(mod)
        assert last_slices(0) == last_slices(1) == 1
        for slices in (3, 16, 0):  # 0: the cost model's
            row_slices(slices)
            got = results(mod)
            used = (last_slices(0), last_slices(1))
            assert used[0] > 1 and used[1] > 1 and (slices == 0 or used == (slices, slices)), used
            for i, (a, e) in enumerate(zip(got, expected)):
                assert torch.equal(a, e), (cls.__name__, dtype, slices, i,
                                           (a - e).abs().max().item())
            n += 1
torch.cuda.synchronize()
print("row slices ok", n)
"""
)


@needs_cuda
def test_cuda_row_slices_give_one_slices_bits():
    """The rows split between blocks (VARLEN_RNN_PERSISTENT_ROW_SLICES 3, 16 and the cost
    model's choice) against every row in each block: each cell, float32 and bfloat16 on the exact
    kernels, both directions, B = 150 with zero lengths, every output and gradient bit for bit. A block that staged another slice's rows, skipped one of its own or
    wrote outside its rows changes bits."""
    r = child(ROW_SLICES, timeout=60)
    assert r.returncode == 0 and "row slices ok" in r.stdout, r.stderr[-3000:]


CONCURRENT = (
    HOOKS
    + r"""
assert knobs(b"persistent", 0, 0) == 0
torch.backends.cudnn.allow_tf32 = False  # exact float32: streams may get other cuBLAS kernels
sms = torch.cuda.get_device_properties(0).multi_processor_count
torch.manual_seed(0)
T, B, I = 200, 6, 8
lengths = torch.tensor([T, 3, T - 1, 0, T // 2, 9], device="cuda")
def args(H):  # weights at nn.GRU's scale: 0.5 * randn made H=264's gradients overflow (NaN)
    g = torch.Generator().manual_seed(H)
    shapes = [(T, B, I), (2, B, H), (2, 3 * H, I), (2, 3 * H, H), (2, 3 * H), (2, 3 * H)]
    scale = [0.5, 0.5] + [H**-0.5] * 4
    return [(c * torch.randn(s, generator=g)).cuda() for c, s in zip(scale, shapes)]
cases = {H: args(H) for H in (4 * (sms // 2), 16)}  # one block per SM; 32 small blocks
expected = {H: layer(a, lengths) for H, a in cases.items()}
torch.cuda.synchronize()
for H, res in expected.items():
    assert all(bool(torch.isfinite(t).all()) for t in res), f"H={H}: the serial results overflow"
streams = [torch.cuda.Stream() for _ in range(3)]
for s in streams:
    s.wait_stream(torch.cuda.current_stream())
big = torch.randn(4096, 4096, device="cuda")
got = {}
with torch.cuda.stream(streams[0]):
    for _ in range(8):  # GEMMs that fill every SM while the persistent grids are launched
        big = (big @ big).mul_(1e-3)
for rep in range(3):
    for s, (H, a) in zip(streams[1:], cases.items()):
        with torch.cuda.stream(s):
            got[H, rep] = layer(a, lengths)
for s in streams:
    torch.cuda.current_stream().wait_stream(s)
torch.cuda.synchronize()
for (H, rep), res in got.items():
    for i, (u, v) in enumerate(zip(res, expected[H])):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{H} {rep} {i}: {m}")
print("concurrent ok")
"""
)


@needs_cuda
def test_cuda_persistent_launches_on_busy_streams_finish():
    """Two persistent layers (a grid of one block per SM and a small one) launched three times
    each on two streams while GEMMs on a third fill the device: cooperative launches wait until
    every block of a grid can be resident, so all finish with the serial results (within what
    another stream's cuBLAS kernels may change). A grid started
    with some blocks not resident would hang in its first grid barrier: the child's timeout
    (below gpu_check.sh's per-test limit) turns that into a failure."""
    r = child(CONCURRENT, timeout=50)
    assert r.returncode == 0 and "concurrent ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="no CUDA device" if not torch.cuda.is_available() else "needs two CUDA devices",
)
def test_cuda_tensors_on_another_device_than_the_current_one():
    """Inputs on cuda:1 while cuda:0 is current: the op's device guard puts the kernels, the
    stream, the kernel facts and the workspace on cuda:1, with cuda:0's results."""
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        torch.manual_seed(0)
        gru = varlen_rnn.GRU(5, 24, bidirectional=True, device=dev)
        x = torch.randn(9, 4, 5, device=dev, requires_grad=True)
        lengths = torch.tensor([9, 2, 0, 5], device=dev)
        with torch.cuda.device(0):
            out, h = gru(x, lengths=lengths)
            grads = torch.autograd.grad(out.sum() + h.sum(), [x, *gru.parameters()])
        assert out.device == torch.device(dev)
        results[dev] = [t.cpu() for t in (out, h, *grads)]
    for i, (a, e) in enumerate(zip(results["cuda:1"], results["cuda:0"], strict=True)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"tensor {i}: {m}")

"""The CUDA backend: both recurrence paths (persistent, fallback) against nn.GRU + packing, the
CPU kernels, each other and float64; gradcheck; determinism; CUDA graphs (also a first call
inside the capture); no host sync; streams; half types; lengths on the CPU; nn.GRU's TF32
policy; a refused cooperative launch. Every GPU test skips with a reason on a machine without
CUDA; the registration tests run everywhere."""

import os
import shutil
import subprocess
import time

import cuda_testing
import pytest
import torch
from cuda_testing import PATHS, assert_device_assert, child, knob_hook, needs_cuda, set_knobs
from testing import assert_close, grads, make_pair, packed_baseline

import varlen_rnn
from varlen_rnn.reference import gru_reference

# The shared fixtures: the path knob (indirect parameter) and knobs reset per test (TF32 is
# off for every test: conftest.py).
path = cuda_testing.path
auto_knobs_after = cuda_testing.auto_knobs_after


def test_cuda_kernels_registered_when_built_with_cuda():
    """The CUDA build registers its kernels. That a machine with nvcc and a CUDA torch makes a
    CUDA build at all is tests/test_build.py's test_the_cuda_kernels_are_built_where_they_can_be:
    there, without a GPU, this skips."""
    if not varlen_rnn.WITH_CUDA:
        pytest.skip("varlen_rnn was built without CUDA (no toolkit, or a CPU torch)")
    for op in ("gru_layer_forward", "gru_layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CUDA"), op


def test_cuda_knob_hook_exported_when_built_with_cuda():
    """The tests below switch paths through this hook (the environment is read once)."""
    if not varlen_rnn.WITH_CUDA:
        pytest.skip("varlen_rnn was built without CUDA (no toolkit, or a CPU torch)")
    assert knob_hook()(b"no-such-path", 0, 0) == -1


def _lengths(B, T, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    lo = 0 if zeros else 1
    L = torch.randint(lo, T + 1, (B,), generator=g)
    L[0] = T  # the longest row is the padded length
    return L


def _run(gru, x, lengths, hx=None):
    """Forward + gradients of every input and parameter for a fixed random projection."""
    out, h = gru(x, hx, lengths=lengths)
    inputs = [x] + ([hx] if hx is not None else []) + list(gru.parameters())
    return [out, h] + list(grads([out, h], inputs))


def _inputs(T, B, I, D, H, layers, dtype, device, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = torch.randn(layers * D, B, H, generator=g, dtype=torch.float64)
    return (x.to(device, dtype).requires_grad_(), hx.to(device, dtype).requires_grad_())


def _bi_gru(T, B, I, H, dtype, lengths_seed=0):
    """A 2-layer bidirectional GRU on the GPU (parameters from torch's global generator), its
    input and hx as leaves, and lengths on the GPU with zeros."""
    gru = varlen_rnn.GRU(I, H, 2, bidirectional=True, dtype=dtype, device="cuda")
    x, hx = _inputs(T, B, I, 2, H, 2, dtype, "cuda")
    return gru, x, hx, _lengths(B, T, seed=lengths_seed).cuda()


# ------------------------------------------------------------------ parity
@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "bidirectional,batch_first,bias",
    [(False, False, True), (True, False, True), (True, True, False), (False, True, False)],
)
def test_cuda_matches_nn_gru_with_packing(path, dtype, bidirectional, batch_first, bias):
    T, B, I, H, layers = 9, 6, 5, 7, 2
    ref, ours = make_pair(I, H, layers, bias, batch_first, bidirectional, dtype, "cuda")
    x, hx = _inputs(T, B, I, 2 if bidirectional else 1, H, layers, dtype, "cuda", batch_first)
    lengths = _lengths(B, T, zeros=False)  # nn.GRU packing refuses length 0
    out_ref, h_ref = packed_baseline(ref, x, lengths.tolist(), hx)
    got = _run(ours, x, lengths.cuda(), hx)
    inputs = [x, hx] + list(ref.parameters())
    expected = [out_ref, h_ref] + list(grads([out_ref, h_ref], inputs))
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, dtype, f"tensor {i}")


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "shape",
    [(12, 37, 9, 33, True), (5, 3, 4, 257, False), (1, 1, 3, 4, True)],
    ids=["B37-H33-bi", "H257-tail-block", "T1-B1"],
)
def test_cuda_matches_cpu_kernels(path, dtype, shape):
    T, B, I, H, bidirectional = shape
    torch.manual_seed(0)
    cpu = varlen_rnn.GRU(I, H, 2, bidirectional=bidirectional, dtype=dtype)
    gpu = varlen_rnn.GRU(I, H, 2, bidirectional=bidirectional, dtype=dtype, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    D = 2 if bidirectional else 1
    x, hx = _inputs(T, B, I, D, H, 2, dtype, "cpu")
    xg, hxg = (t.detach().cuda().requires_grad_() for t in (x, hx))
    lengths = _lengths(B, T)  # zero lengths included: the CPU kernels are the oracle here
    expected = _run(cpu, x, lengths, hx)
    got = _run(gpu, xg, lengths.cuda(), hxg)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a.cpu(), e, dtype, f"tensor {i}")


@needs_cuda
@pytest.mark.parametrize("max_kc", [0, 32], ids=["whole-K", "K-chunks-of-32"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_persistent_equals_fallback(dtype, max_kc):
    """Many tiles of rows (B past the exact kernels' 128 rows a tile), rows finishing at every
    step, zero lengths, a partial last block."""
    T, B, I, H = 20, 150, 6, 70
    torch.manual_seed(1)
    gru, x, hx, lengths = _bi_gru(T, B, I, H, dtype, lengths_seed=3)
    results = {}
    for p in PATHS:
        set_knobs(p, max_kc=max_kc)
        results[p] = _run(gru, x, lengths, hx)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for i, (a, e) in enumerate(zip(results["persistent"], results["fallback"])):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"tensor {i}: {m}")


@needs_cuda
def test_cuda_persistent_shapes_interleaved():
    """Kernel facts are cached per device, plans made per call: a big-shared-memory shape, a
    small one, the big one again (its launch must still be allowed its shared memory)."""
    set_knobs("persistent")
    torch.manual_seed(0)
    grus = {H: varlen_rnn.GRU(4, H, device="cuda") for H in (512, 16)}
    x = torch.randn(5, 3, 4, device="cuda")
    lengths = torch.tensor([5, 2, 4], device="cuda")
    first = {H: grus[H](x, lengths=lengths) for H in (512, 16)}
    for H in (512, 16, 512):
        out, h = grus[H](x, lengths=lengths)
        assert torch.equal(out, first[H][0]) and torch.equal(h, first[H][1])


@needs_cuda
@pytest.mark.parametrize("B", [8000, 9000], ids=["rank-sort", "device-sort"])
def test_cuda_large_batch_orders_rows_either_way(B):
    """The persistent path orders rows by a counting kernel up to B = 8192, by a device sort
    beyond: both must give the fallback's result."""
    T, I, H = 6, 3, 8
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, bidirectional=True, dtype=torch.float64, device="cuda")
    x, hx = _inputs(T, B, I, 2, H, 1, torch.float64, "cuda")
    lengths = _lengths(B, T, seed=5).cuda()
    results = {}
    for p in PATHS:
        set_knobs(p)
        results[p] = _run(gru, x, lengths, hx)
    for i, (a, e) in enumerate(zip(results["persistent"], results["fallback"])):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12, msg=lambda m: f"tensor {i}: {m}")


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_cuda_gradcheck_op(path, D, batch_first):
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device="cuda", requires_grad=True)
    T, B, I, H = 5, 4, 3, 4
    x = f(B, T, I) if batch_first else f(T, B, I)
    args = (
        x,
        torch.tensor([3, 5, 0, 1], device="cuda"),
        f(D, B, H),
        f(D, 3 * H, I),
        f(D, 3 * H, H),
        f(D, 3 * H),
        f(D, 3 * H),
        batch_first,
    )
    assert torch.autograd.gradcheck(
        lambda *a: varlen_rnn.ops.gru_layer(*a), args, eps=1e-6, atol=1e-8
    )


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    "lengths,B",
    [([0, 0, 0], 3), ([4, 0, 2], 3), ([5], 1), ([0], 1)],
    ids=["all-zero", "some-zero", "B1", "B1-zero"],
)
def test_cuda_zero_lengths_and_single_row(path, lengths, B):
    T, I, H = 5, 3, 8
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, 2, bidirectional=True, dtype=torch.float64, device="cuda")
    x, hx = _inputs(T, B, I, 2, H, 2, torch.float64, "cuda")
    L = torch.tensor(lengths)
    got = _run(gru, x, L.cuda(), hx)
    out_ref, h_ref = gru_reference(gru, x, hx, L)
    expected = [out_ref, h_ref] + list(grads([out_ref, h_ref], [x, hx] + list(gru.parameters())))
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, torch.float64, f"tensor {i}")
    zero = L == 0
    assert torch.equal(got[0][:, zero.cuda()], torch.zeros_like(got[0][:, zero.cuda()]))


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_empty_time_and_batch(path):
    gru = varlen_rnn.GRU(3, 4, dtype=torch.float64, device="cuda")
    out, h = gru(
        torch.zeros(0, 2, 3, dtype=torch.float64, device="cuda"),
        lengths=torch.zeros(2, dtype=torch.long, device="cuda"),
    )
    assert out.shape == (0, 2, 4) and torch.equal(
        h, torch.zeros(1, 2, 4, dtype=torch.float64, device="cuda")
    )
    out, h = gru(
        torch.zeros(5, 0, 3, dtype=torch.float64, device="cuda"),
        lengths=torch.zeros(0, dtype=torch.long, device="cuda"),
    )
    assert out.shape == (5, 0, 4) and h.shape == (1, 0, 4)


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("batch_first", [False, True])
def test_cuda_padding_is_never_read(path, batch_first):
    """NaN in every padded position of x and grad_output: nothing non-finite may come out
    (0 * NaN would, had any GEMM or kernel touched them)."""
    T, B, I, H = 8, 6, 5, 12
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, 2, batch_first=batch_first, bidirectional=True, device="cuda")
    lengths = torch.tensor([8, 3, 0, 5, 1, 8])
    x = torch.randn((B, T, I) if batch_first else (T, B, I), device="cuda")
    pad = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)  # [T, B]
    pad = (pad.t() if batch_first else pad).cuda()
    x[pad] = float("nan")
    x.requires_grad_()
    out, h = gru(x, lengths=lengths.cuda())
    g_out = torch.randn_like(out).masked_fill(pad.unsqueeze(-1), float("nan"))
    grads_ = torch.autograd.grad(
        [out, h], [x] + list(gru.parameters()), [g_out, torch.randn_like(h)]
    )
    assert torch.isfinite(out).all() and torch.isfinite(h).all()
    assert (out[pad] == 0).all()
    for i, g in enumerate(grads_):
        assert torch.isfinite(g).all(), f"gradient {i} is not finite"


# --------------------------------------------------------- run-time behaviour
@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_deterministic(path, dtype):
    T, B, I, H = 30, 19, 16, 48
    torch.manual_seed(0)
    gru, x, hx, lengths = _bi_gru(T, B, I, H, dtype)
    a, b = _run(gru, x, lengths, hx), _run(gru, x, lengths, hx)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs between two identical runs"


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_no_host_sync(path):
    T, B, I, H = 8, 5, 4, 16
    gru, x, hx, lengths = _bi_gru(T, B, I, H, torch.float32)
    _run(gru, x, lengths, hx)  # warm-up outside the check: first-use allocations, handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, h = gru(x, hx, lengths=lengths)
        (out.sum() + h.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_graph_capture_and_replay(path):
    T, B, I, H = 10, 6, 5, 12
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, 2, bidirectional=True, device="cuda")
    x = torch.randn(T, B, I, device="cuda", requires_grad=True)
    lengths = _lengths(B, T).cuda()
    params = list(gru.parameters())

    def step():
        out, h = gru(x, lengths=lengths)
        return [out, h] + list(torch.autograd.grad((out * out).sum() + h.sum(), [x] + params))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        with torch.no_grad():
            x.copy_(
                torch.randn(
                    T, B, I, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
                )
            )
            lengths.copy_(_lengths(B, T, seed=seed).cuda())
        graph.replay()
        eager = step()
        for i, (a, e) in enumerate(zip(static, eager)):  # cuBLAS may pick other kernels in a graph
            torch.testing.assert_close(
                a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"replayed tensor {i} (seed {seed}): {m}"
            )


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_non_default_stream(path):
    T, B, I, H = 16, 7, 5, 24
    torch.manual_seed(0)
    gru, x, hx, lengths = _bi_gru(T, B, I, H, torch.float32)
    expected = _run(gru, x, lengths, hx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # a busy stream: wrong-stream launches would race ahead
        got = _run(gru, x, lengths, hx)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i, (a, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(
            a, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"tensor {i} on a side stream: {m}"
        )


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)], ids=["f16", "bf16"]
)
def test_cuda_half_types_smoke(path, dtype, tol):
    """Half storage, float state and accumulation: close to the float64 result."""
    T, B, I, H = 24, 9, 16, 40
    torch.manual_seed(0)
    ref = varlen_rnn.GRU(I, H, 2, bidirectional=True, dtype=torch.float64, device="cuda")
    half = varlen_rnn.GRU(I, H, 2, bidirectional=True, dtype=dtype, device="cuda")
    half.load_state_dict(ref.state_dict())
    x, hx = _inputs(T, B, I, 2, H, 2, torch.float64, "cuda")
    xh, hxh = (t.detach().to(dtype).requires_grad_() for t in (x, hx))
    lengths = _lengths(B, T).cuda()
    expected = _run(ref, x, lengths, hx)
    got = _run(half, xh, lengths, hxh)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"tensor {i}"
        scale = e.abs().max().clamp_min(1.0)
        err = (a.double() - e).abs().max() / scale
        assert err < tol * 5 if i >= 2 else err < tol, f"tensor {i}: relative error {err:.3g}"


@needs_cuda
def test_cuda_forced_persistent_refuses_what_does_not_fit():
    set_knobs("persistent")
    H = 4096  # 3*H*H doubles (400 MB) cannot be spread over any GPU's shared memory
    args = [
        torch.zeros(2, 1, 4, dtype=torch.float64, device="cuda"),
        torch.tensor([2], device="cuda"),
        torch.zeros(1, 1, H, dtype=torch.float64, device="cuda"),
        torch.zeros(1, 3 * H, 4, dtype=torch.float64, device="cuda"),
        torch.zeros(1, 3 * H, H, dtype=torch.float64, device="cuda"),
        None,
        None,
        False,
        False,
    ]
    with pytest.raises(RuntimeError, match="persistent kernel cannot run"):
        torch.ops.varlen_rnn.gru_layer_forward(*args)
    set_knobs("auto")  # auto falls back instead
    out, h, _ = torch.ops.varlen_rnn.gru_layer_forward(*args)
    assert out.shape == (2, 1, H)


@needs_cuda
def test_cuda_bad_path_name_is_refused():
    """The environment is read once per process: a child process starts with the bad value."""
    code = (
        "import torch, varlen_rnn\n"
        "gru = varlen_rnn.GRU(3, 4, device='cuda')\n"
        "try:\n"
        "    gru(torch.zeros(2, 1, 3, device='cuda'))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    r = child(code, env={"VARLEN_RNN_CUDA_PATH": "fastest"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "VARLEN_RNN_CUDA_PATH must be auto, persistent or fallback, got 'fastest'" in r.stdout


@needs_cuda
@pytest.mark.parametrize("bad", [-1, 7])
def test_cuda_out_of_range_length_is_a_device_assert(bad):
    """Lengths already on the device are checked there (no host copy): a device-side assert,
    so in a child process, since it leaves the CUDA context unusable."""
    code = (
        "import torch, varlen_rnn\n"
        "gru = varlen_rnn.GRU(3, 4, device='cuda')\n"
        f"out, h = gru(torch.zeros(6, 2, 3, device='cuda'), lengths=torch.tensor([2, {bad}], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    assert_device_assert(code)


# ------------------------------------------------------------- lengths on the CPU
def _layer_args(T=6, B=3, I=4, H=8, D=2, dtype=torch.float32, seed=0):
    """Leaf tensors of one layer on the GPU: input, hx, w_ih, w_hh, b_ih, b_hh."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, B, I), (D, B, H), (D, 3 * H, I), (D, 3 * H, H), (D, 3 * H), (D, 3 * H)]
    return [
        (0.5 * torch.randn(s, generator=g, dtype=torch.float64)).to("cuda", dtype).requires_grad_()
        for s in shapes
    ]


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("ldtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_cuda_cpu_lengths_equal_device_lengths(path, ldtype):
    """CPU lengths (checked on the host, then copied) give the result of device lengths,
    forward and backward, bit for bit."""
    x, hx, *w = _layer_args()
    L = torch.tensor([6, 0, 3], dtype=ldtype)
    results = []
    for lengths in (L, L.cuda()):
        out, h = varlen_rnn.ops.gru_layer(x, lengths, hx, *w)
        results.append([out, h] + list(grads([out, h], [x, hx] + w)))
    for i, (a, e) in enumerate(zip(*results)):
        assert torch.equal(a, e), f"tensor {i}"
    assert L.device.type == "cpu" and L.tolist() == [6, 0, 3]  # the input is untouched


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_cpu_lengths_no_host_sync(path):
    """The host check reads the CPU tensor; the copy to the device does not wait for the GPU."""
    x, hx, *w = _layer_args()
    L = torch.tensor([6, 0, 3])
    out, h = varlen_rnn.ops.gru_layer(x, L, hx, *w)  # warm-up: first-use allocations, handles
    (out.sum() + h.sum()).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, h = varlen_rnn.ops.gru_layer(x, L, hx, *w)
        (out.sum() + h.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _host_and_total_seconds_behind_a_busy_gpu(call, busy_s=0.5):
    """Queues about busy_s seconds of GPU work (torch.cuda._sleep, calibrated here), then runs
    call(): the seconds the host spent in call() and until the GPU had run it all."""
    call()  # warm-up: first-use allocations, handles, plans
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * busy_s * 1000 / start.elapsed_time(end))
    # A second warm-up behind queued work: pinned buffers are reused only once their copies
    # have run, so a busy GPU needs more of them than an idle one (first allocations here).
    torch.cuda._sleep(cycles // 10)
    call()
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    call()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host, time.perf_counter() - t0


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("form", ["lengths", "packed", "packed-cpu-order"])
def test_cuda_index_tensors_on_the_cpu_do_not_wait_for_the_gpu(path, form):
    """CPU lengths, a PackedSequence's batch_sizes (always on the CPU) and sorted_indices given
    on the CPU are copied to the device from pinned buffers: a copy from pageable memory may
    first synchronize with the stream (CUDA's "API synchronization behavior"), which
    set_sync_debug_mode does not see. Behind half a second of queued GPU work, the host must
    be back from forward + backward long before the GPU is."""
    T, B, I, H = 12, 5, 4, 16
    gru, x, hx, _ = _bi_gru(T, B, I, H, torch.float32)
    lengths = [12, 0, 7, 3, 12] if form == "lengths" else [12, 1, 7, 3, 12]
    if form == "lengths":
        args = (x,)
    else:
        p = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        order = p.sorted_indices.cpu() if form == "packed-cpu-order" else p.sorted_indices
        # data a leaf: the backward timed is ours, not pack_padded_sequence's
        args = (
            torch.nn.utils.rnn.PackedSequence(
                p.data.detach().requires_grad_(), p.batch_sizes, order, None
            ),
        )

    def call():
        out, h = gru(*args, hx, lengths=lengths) if form == "lengths" else gru(*args, hx)
        data = out if form == "lengths" else out.data
        (data.sum() + h.sum()).backward()

    host, total = _host_and_total_seconds_behind_a_busy_gpu(call)
    assert total > 0.4, f"the queued GPU work took {total:.3f} s, not the 0.5 s asked for"
    assert host < 0.1, f"the host waited {host:.3f} s of the GPU's {total:.3f} s"


@needs_cuda
@pytest.mark.parametrize("bad", [-1, 7])
def test_cuda_cpu_lengths_out_of_range_is_a_clear_error(bad):
    """The CPU backend's message, raised before any kernel runs: the context stays usable."""
    x, hx, *w = _layer_args()
    with pytest.raises(
        RuntimeError,
        match=rf"lengths must be in \[0, T\] with T=6 .*"
        rf"got lengths\[1\]={bad}",
    ):
        torch.ops.varlen_rnn.gru_layer_forward(x, torch.tensor([2, bad, 1]), hx, *w, False, False)
    out, _, _ = torch.ops.varlen_rnn.gru_layer_forward(
        x, torch.tensor([2, 6, 1]), hx, *w, False, False
    )
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@needs_cuda
def test_cuda_cpu_lengths_refused_inside_graph_capture():
    """A host-to-device copy cannot be captured: a clear error, and the capture ends cleanly."""
    x, hx, *w = _layer_args()
    args = [t.detach() for t in (x, hx, *w)]
    torch.ops.varlen_rnn.gru_layer_forward(
        args[0], torch.tensor([6, 2, 3]).cuda(), *args[1:], False, False
    )  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with (
        pytest.raises(
            RuntimeError,
            match="lengths must be on the input's device .* inside a CUDA graph capture",
        ),
        torch.cuda.graph(graph),
    ):
        torch.ops.varlen_rnn.gru_layer_forward(
            args[0], torch.tensor([6, 2, 3]), *args[1:], False, False
        )
    out, _, _ = torch.ops.varlen_rnn.gru_layer_forward(
        args[0], torch.tensor([6, 2, 3]), *args[1:], False, False
    )
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


# ------------------------------------------------------------ first call in a capture
COLD_CAPTURE = """
import torch, varlen_rnn
torch.manual_seed(0)
T, B, I, H = 7, 5, 4, 16
gru = varlen_rnn.GRU(I, H, 2, bidirectional=True, device="cuda")
x = torch.randn(T, B, I, device="cuda", requires_grad=True)
lengths = torch.tensor([7, 3, 0, 5, 1], device="cuda")
params = list(gru.parameters())
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
# cuBLAS and the allocator warmed up, varlen_rnn not called: a backward too, as torch's warm-up
# iterations before a capture do, since autograd's device thread creates its own cuBLAS handle
# (which cannot be done inside a capture: CUBLAS_STATUS_NOT_INITIALIZED on the H200's first run).
with torch.cuda.stream(side):
    a = torch.randn(64, 48, device="cuda", requires_grad=True)
    ((a @ a.t()).sum() + torch.bmm(a[None], a.t()[None]).sum()).backward()
    torch.cuda.synchronize()
torch.cuda.current_stream().wait_stream(side)
def step():
    out, h = gru(x, lengths=lengths)
    return [out, h] + list(torch.autograd.grad((out * out).sum() + h.sum(), [x] + params))
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static = step()
graph.replay()
torch.cuda.synchronize()
eager = step()
err = max((s - e).abs().max().item() for s, e in zip(static, eager))
assert err < 1e-5, err
print("cold capture ok", err)
"""


@needs_cuda
@pytest.mark.parametrize("path", ["auto", "persistent", "fallback"])
def test_cuda_graph_capture_first_call_inside_capture(path):
    """A cold plan cache inside the capture: the kernel-attribute queries and the shared-memory
    opt-in happen during capture (a fresh process, so no earlier test warmed them)."""
    r = child(COLD_CAPTURE, env={"VARLEN_RNN_CUDA_PATH": path})
    assert r.returncode == 0 and "cold capture ok" in r.stdout, r.stderr[-3000:]


# -------------------------------------------------------- a refused cooperative launch
REFUSED = """
import ctypes, warnings, torch, varlen_rnn
hook = ctypes.CDLL(varlen_rnn._C.__file__).varlen_rnn_cuda_set_knobs_for_testing
hook.argtypes = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int]
torch.manual_seed(0)
gru = varlen_rnn.GRU(4, 16, bidirectional=True, device="cuda")  # small: auto picks persistent
x = torch.randn(6, 2, 4, device="cuda", requires_grad=True)
lengths = torch.tensor([6, 3], device="cuda")
def run():
    out, h = gru(x, lengths=lengths)
    return [out, h] + list(torch.autograd.grad(out.sum() + h.sum(), [x] + list(gru.parameters())))
hook(b"fallback", 0, 0)
expected = run()
hook(b"auto", 0, 1)  # grids too large to be co-resident: the driver must refuse them
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = run(), run()
torch.cuda.synchronize()
refusals = [w for w in caught if "refused" in str(w.message)]
assert len(refusals) == 1, [str(w.message) for w in caught]
for got in (first, second):
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
hook(b"persistent", 0, 0)
try:
    run()
    raise AssertionError("forced persistent ran after the refusal")
except RuntimeError as e:
    assert "refused its cooperative launch" in str(e), str(e)
print("refused launch ok")
"""


@needs_cuda
def test_cuda_refused_cooperative_launch_falls_back_once():
    """auto: a warning once, the fallback's exact result, no exception; the refusal is
    remembered, so forced persistent then reports it."""
    r = child(REFUSED)
    assert r.returncode == 0 and "refused launch ok" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------- TF32
def _tf32_run(cudnn, matmul, args, lengths):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    out, h = varlen_rnn.ops.gru_layer(args[0], lengths, *args[1:])
    res = [out, h] + list(grads([out, h], args))
    assert torch.backends.cuda.matmul.allow_tf32 == matmul, "the matmul flag was not restored"
    assert torch.backends.cudnn.allow_tf32 == cudnn
    return res


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_float32_gemms_follow_cudnn_tf32_flag(path):
    """nn.GRU's policy: TF32 exactly when torch.backends.cudnn.allow_tf32 says so, whatever
    torch.backends.cuda.matmul.allow_tf32 says (which is left as the user set it); under TF32
    about as far from exact float32 as nn.GRU on cuDNN is, on the same inputs and flags."""
    a = torch.randn(256, 512, device="cuda")
    b = torch.randn(512, 768, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32_mm = a @ b
    torch.backends.cuda.matmul.allow_tf32 = False
    if torch.equal(tf32_mm, a @ b):
        pytest.skip("cuBLAS uses no TF32 kernel for this shape on this GPU")
    # nn.GRU's initialisation: 0.5 * randn weights (_layer_args) saturate every gate at
    # I=512, H=256, where the H200's first run saw relative differences of 0.11 from TF32.
    torch.manual_seed(0)
    ref = torch.nn.GRU(512, 256, device="cuda")
    x = 0.5 * torch.randn(8, 32, 512, device="cuda")
    hx = 0.5 * torch.randn(1, 32, 256, device="cuda")
    lengths = torch.arange(8, 0, -1).repeat(4).cuda()
    args = [x, hx] + [p.detach()[None].clone() for p in ref.parameters()]
    args = [t.requires_grad_() for t in args]

    def rel(got, ref):
        return max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, ref))

    def nn_run(tf32):
        torch.backends.cudnn.allow_tf32 = tf32
        xr, hr = x.detach().requires_grad_(), hx.detach().requires_grad_()
        out, h = packed_baseline(ref, xr, lengths, hr)
        return [out, h] + list(grads([out, h], [xr, hr, *ref.parameters()]))

    exact = _tf32_run(False, False, args, lengths)
    # matmul on, cuDNN off: exact float32 (other GEMM kernels may sum in another order).
    assert rel(_tf32_run(False, True, args, lengths), exact) < 1e-5
    tf32 = _tf32_run(True, False, args, lengths)
    assert all(torch.equal(g, e) for g, e in zip(_tf32_run(True, True, args, lengths), tf32))
    diff = rel(tf32, exact)
    with torch.backends.cudnn.flags(enabled=True):
        nn_diff = rel(nn_run(True), nn_run(False))
    torch.backends.cudnn.allow_tf32 = False
    assert diff > 1e-5, f"relative difference {diff:.2e}: TF32 was not used"
    assert diff <= 4 * max(nn_diff, 1e-4), (
        f"relative difference {diff:.2e} from exact, nn.GRU's on cuDNN {nn_diff:.2e}"
    )


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("setting", ["matmul", "all"])
def test_cuda_float32_under_the_per_op_precision_api(path, setting):
    """TF32 set through torch's per-op precision API alone (torch.backends.cuda.matmul.
    fp32_precision, or torch.backends.fp32_precision for every backend) leaves the legacy
    matmul flag behind, and reading that flag then raises torch's "mix of the legacy and new
    APIs" error: a float32 call must still run, give what the legacy flags give, and leave the
    setting as the user made it."""
    x, hx, *w = _layer_args(T=8, B=32, I=64, H=48)
    args, lengths = [x, hx, *w], torch.arange(8, 0, -1).repeat(4).cuda()
    expected = _tf32_run(True, True, args, lengths)
    torch.backends.cuda.matmul.allow_tf32 = False  # both APIs: legacy off, per-op ieee
    try:
        if setting == "matmul":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.fp32_precision = "none"  # follows torch.backends'
            torch.backends.fp32_precision = "tf32"
        out, h = varlen_rnn.ops.gru_layer(args[0], lengths, *args[1:])
        got = [out, h] + list(grads([out, h], args))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        if setting == "all":  # still following torch.backends', not set on its own
            torch.backends.fp32_precision = "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.allow_tf32 = False
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e)


TF32_GUARD_PROGRAM = r"""
#include "cuda/launch.h"
#include <atomic>
#include <chrono>
#include <cstdio>
#include <optional>
#include <thread>
using namespace varlen_rnn::cuda;
static int mm() { return at::globalContext().allowTF32CuBLAS(); }
int main() {
  auto& ctx = at::globalContext();
  std::printf("default %d %d\n", int(cudnn_rnn_allows_tf32()), mm());
  {
    MatmulTf32Guard a(true, true);
    std::printf("enabled %d\n", mm());
    { MatmulTf32Guard b(true, true); }
    std::printf("inner-exit %d\n", mm());
  }
  std::printf("restored %d\n", mm());
  ctx.setAllowTF32CuBLAS(true);
  {
    std::optional<MatmulTf32Guard> c(std::in_place, true, false);
    int other = -1;
    std::thread t([&] { other = mm(); });
    t.join();
    std::printf("disabled %d other-thread %d\n", mm(), other);
    { MatmulTf32Guard nested(true, true); std::printf("nested-other %d\n", mm()); }
    // a holder of the other setting, on another thread, waits until this one is gone
    std::atomic<int> seen{-1};
    std::thread u([&] { MatmulTf32Guard on(true, true); seen = mm(); });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::printf("other-setting-waits %d\n", seen.load());
    c.reset();
    u.join();
    std::printf("other-setting-ran %d\n", seen.load());
  }
  std::printf("after %d\n", mm());
  ctx.setAllowTF32CuBLAS(false);
  ctx.setAllowTF32CuDNN(false);
  std::printf("cudnn-off %d\n", int(cudnn_rnn_allows_tf32()));
  { MatmulTf32Guard d(false, true); std::printf("not-float32 %d\n", mm()); }
  // The per-op precision API alone (torch.backends.cuda.matmul.fp32_precision = "tf32"):
  // the legacy allowTF32CuBLAS() would raise on the mix; the guard reads the new setting.
  using B = at::Float32Backend;
  using O = at::Float32Op;
  using P = at::Float32Precision;
  auto prec = [&](B b, O o) { return at::precision2str(ctx.float32Precision(b, o)); };
  ctx.setAllowTF32CuDNN(true);
  ctx.setFloat32Precision(B::CUDA, O::MATMUL, P::TF32);
  { MatmulTf32Guard e(true, true); std::printf("new-api %d %s\n", int(cublas_matmul_allows_tf32()), prec(B::CUDA, O::MATMUL).c_str()); }
  std::printf("new-api-after %s\n", prec(B::CUDA, O::MATMUL).c_str());
  // torch.backends.fp32_precision = "ieee" with the matmul entry unset: the guard turns TF32
  // on and back off, leaving the entry to follow its parent as before.
  ctx.setFloat32Precision(B::CUDA, O::MATMUL, P::NONE);
  ctx.setFloat32Precision(B::GENERIC, O::ALL, P::IEEE);
  { MatmulTf32Guard f(true, true); std::printf("inherited-held %d\n", int(cublas_matmul_allows_tf32())); }
  ctx.setFloat32Precision(B::GENERIC, O::ALL, P::TF32);
  std::printf("inherited-after %s\n", prec(B::CUDA, O::MATMUL).c_str());
  // set on its own: put back as it was
  ctx.setFloat32Precision(B::GENERIC, O::ALL, P::TF32);
  ctx.setFloat32Precision(B::CUDA, O::MATMUL, P::IEEE);
  { MatmulTf32Guard g(true, true); }
  std::printf("own-after %s\n", prec(B::CUDA, O::MATMUL).c_str());
}
"""


def test_cuda_tf32_guard_on_the_host(tmp_path):
    """The TF32 policy's flag handling needs no GPU: compiled against csrc/cuda/launch.h, the
    guard sets matmul TF32 on or off while held (counted), restores the user's setting, lets a
    nested guard of its own thread run under its setting, and makes a guard of the other setting
    on another thread wait until it is released."""
    import glob

    import torch.utils.cpp_extension as ext

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), ext.CUDA_HOME]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    cuda_home = next(
        (h for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))),
        None,
    )
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not varlen_rnn.WITH_CUDA or cuda_home is None or cxx is None:
        pytest.skip("needs a CUDA build of varlen_rnn, a CUDA toolkit and a C++ compiler")
    includes = ext.include_paths() + [os.path.join(cuda_home, "include")]
    try:
        import nvidia

        includes += [
            os.path.join(b, sub)
            for b in nvidia.__path__
            for sub in ("cu13/include", "cu12/include", "cublas/include")
        ]
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src, exe = tmp_path / "guard.cpp", tmp_path / "guard"
    src.write_text(TF32_GUARD_PROGRAM)
    libs = ext.library_paths() + [os.path.join(cuda_home, "lib64")]
    cmd = [cxx, "-std=c++20", "-O0", "-w", "-I", os.path.join(root, "csrc")]
    cmd += [f"-I{p}" for p in includes if os.path.isdir(p)] + [str(src), "-o", str(exe)]
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    cmd += ["-ltorch", "-ltorch_cpu", "-lc10", "-ltorch_cuda", "-lc10_cuda", "-lcudart"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    assert got[:16] == [
        "default 1 0",
        "enabled 1",
        "inner-exit 1",
        "restored 0",
        "disabled 0 other-thread 0",
        "nested-other 0",
        "other-setting-waits -1",
        "other-setting-ran 1",
        "after 1",
        "cudnn-off 0",
        "not-float32 0",
        "new-api 1 tf32",
        "new-api-after tf32",
        "inherited-held 1",
        "inherited-after tf32",
        "own-after ieee",
    ], got

"""The ragged ops (gru_layer_ragged_forward/backward) on CUDA: parity with the CPU ragged ops on
both recurrence paths and both layouts (offsets, packed), zero-length sequences, workspaces of N
rows, index tensors on the CPU or the device, no host sync and CUDA graph capture with the
offsets on the device, bad index values (host errors, device asserts). The registration test
runs everywhere; every other test skips with a reason on a machine without CUDA."""

from types import SimpleNamespace

import cuda_testing
import pytest
import torch
from cuda_testing import GRU_RESULTS as NAMES
from cuda_testing import PATHS, assert_device_assert, assert_each_close, needs_cuda
from testing import TOL
from torch.nn.utils.rnn import pack_sequence

import varlen_rnn

# The shared fixtures: the path knob (indirect parameter) and knobs reset per test (TF32 is
# off for every test: conftest.py).
path = cuda_testing.path
auto_knobs_after = cuda_testing.auto_knobs_after

ops = torch.ops.varlen_rnn
OFFSETS, PACKED = 0, 1
LAYOUTS = {"offsets": OFFSETS, "packed": PACKED}
# Lengths with 0 (offsets only: PackedSequence has no empty sequences), 1, the longest, repeats.
LENGTHS = {OFFSETS: [5, 0, 3, 1, 9, 3, 0, 9, 2], PACKED: [5, 1, 3, 1, 9, 3, 2, 9, 2]}


def test_cuda_ragged_kernels_registered_when_built_with_cuda():
    if not varlen_rnn.WITH_CUDA:
        pytest.skip("varlen_rnn was built without CUDA (no toolkit, or a CPU torch)")
    for op in ("gru_layer_ragged_forward", "gru_layer_ragged_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CUDA"), op


def _layer(
    lengths,
    layout,
    I=5,
    H=33,
    D=2,
    bias=True,
    dtype=torch.float64,
    device="cuda",
    seed=0,
    max_len_extra=0,
):
    """One ragged layer's arguments: values, seq_index (offsets on `device`; batch_sizes on the
    CPU), sorted_indices (on `device`), max_len, hx and the weights as leaves."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return 0.5 * torch.randn(*s, generator=g, dtype=torch.float64)

    seqs = [r(n, I) for n in lengths]
    if layout == OFFSETS:
        x = torch.cat(seqs) if seqs else r(0, I)
        seq_index = torch.tensor([0] + list(lengths)).cumsum(0).to(device)
        si, max_len = None, max(lengths, default=0)
    else:
        packed = pack_sequence(seqs, enforce_sorted=False)
        x, seq_index = packed.data, packed.batch_sizes
        si, max_len = packed.sorted_indices.to(device), len(packed.batch_sizes)
    B = len(lengths)
    w = [r(D, B, H), r(D, 3 * H, I), r(D, 3 * H, H)] + (
        [r(D, 3 * H), r(D, 3 * H)] if bias else [None, None]
    )
    leaf = [None if t is None else t.to(device, dtype) for t in [x] + w]
    return SimpleNamespace(
        x=leaf[0],
        seq_index=seq_index,
        si=si,
        layout=layout,
        max_len=max_len + max_len_extra,
        hx=leaf[1],
        w_ih=leaf[2],
        w_hh=leaf[3],
        b_ih=leaf[4],
        b_hh=leaf[5],
    )


def _to(a, device, index_device=None):
    """The same layer on another device (index tensors on index_device, default `device`;
    batch_sizes stays on the CPU)."""
    idx = index_device or device
    moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(a).items()}
    moved["seq_index"] = a.seq_index.to(idx if a.layout == OFFSETS else "cpu")
    moved["si"] = None if a.si is None else a.si.to(idx)
    return SimpleNamespace(**moved)


def _run(a, seed=1, on_device=False):
    """[output, h_n, grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] and the
    workspace, for a fixed random projection of output and h_n (on_device: gradients computed
    from the outputs where they are, so nothing is copied from the host)."""
    index = (a.seq_index, a.si, a.layout, a.max_len)
    out, h_n, ws = ops.gru_layer_ragged_forward(
        a.x, *index, a.hx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, True
    )
    if on_device:
        go, ghn = out.cos(), h_n.sin()
    else:
        g = torch.Generator().manual_seed(seed)
        go, ghn = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (out, h_n))
    grads = ops.gru_layer_ragged_backward(go, ghn, a.x, *index, a.hx, a.w_ih, a.w_hh, out, ws)
    return [out, h_n, *grads], ws


# ------------------------------------------------------------------ parity
@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "D,bias,max_len_extra",
    [(1, True, 0), (2, True, 0), (2, False, 3)],
    ids=["uni", "bi", "bi-nobias-loose-max_len"],
)
def test_cuda_ragged_matches_cpu_ragged_ops(path, layout, dtype, D, bias, max_len_extra):
    a = _layer(
        LENGTHS[LAYOUTS[layout]],
        LAYOUTS[layout],
        D=D,
        bias=bias,
        dtype=dtype,
        max_len_extra=max_len_extra,
    )
    got, ws = _run(a)
    expected, _ = _run(_to(a, "cpu"))
    assert_each_close(NAMES, got, expected, TOL[dtype])
    assert ws.shape == (D, a.x.shape[0], 4 * 33) and ws.device.type == "cuda"


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("lengths", [[0, 4, 0, 0, 2], [0, 0], []], ids=["some", "all", "B0"])
def test_cuda_ragged_zero_length_sequences(path, lengths):
    """Zero-length sequences: no rows, h_n = hx and grad_hx = grad_h_n for them."""
    a = _layer(lengths, OFFSETS, H=8)
    got, ws = _run(a)
    expected, _ = _run(_to(a, "cpu"))
    assert_each_close(NAMES, got, expected, TOL[torch.float64])
    zero = [b for b, n in enumerate(lengths) if n == 0]
    assert torch.equal(got[1][:, zero], a.hx[:, zero])
    assert ws.shape == (2, sum(lengths), 4 * 8)


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_ragged_skewed_batch_buffers_have_N_rows(path):
    """One long sequence and many short ones: output and workspace hold N rows, not T*B."""
    lengths = [200] + [3] * 63
    a = _layer(lengths, OFFSETS, H=16, dtype=torch.float32)
    got, ws = _run(a)
    N = sum(lengths)
    assert got[0].shape == (N, 2 * 16) and ws.shape == (2, N, 4 * 16)
    expected, _ = _run(_to(a, "cpu"))
    assert_each_close(NAMES, got, expected, TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("idtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_cuda_ragged_index_on_cpu_equals_device(path, layout, idtype):
    """offsets / sorted_indices on the CPU (checked on the host, then copied) give the results
    of the same values on the device, bit for bit; the index tensors are left untouched."""
    if layout == "packed" and idtype == torch.int32:
        pytest.skip("sorted_indices is int64 (as PackedSequence keeps it)")
    a = _layer(LENGTHS[LAYOUTS[layout]], LAYOUTS[layout], dtype=torch.float32)
    a.seq_index = a.seq_index.to(idtype) if layout == "offsets" else a.seq_index
    on_cpu = _to(a, "cuda", index_device="cpu")
    before = [t.clone() for t in (on_cpu.seq_index, on_cpu.si) if t is not None]
    got_dev, _ = _run(a)
    got_cpu, _ = _run(on_cpu)
    for n, u, v in zip(NAMES, got_dev, got_cpu):
        assert torch.equal(u, v), n
    after = [t for t in (on_cpu.seq_index, on_cpu.si) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after))


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=["f16", "bf16"]
)
def test_cuda_ragged_half_types_smoke(path, dtype, tol):
    a = _layer(LENGTHS[OFFSETS], OFFSETS, dtype=torch.float32)
    expected, _ = _run(a)
    got, ws = _run(
        _to(
            SimpleNamespace(
                **{
                    k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in vars(a).items()
                }
            ),
            "cuda",
        )
    )
    # bfloat16 keeps its saved values in bfloat16 (csrc/layer.h workspace_dtype), float16 in float32.
    assert ws.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    for n, u, e in zip(NAMES, got, expected):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(
            u.float(), e, atol=tol * scale, rtol=tol, msg=lambda m: f"{n}: {m}"
        )


# ------------------------------------------------------------ no host sync, graphs
@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_ragged_offsets_on_device_no_host_sync(path):
    """Offsets on the device, max_len a Python int: forward and backward never wait for the
    GPU (N is input.size(0); the lengths and their order are computed on the device)."""
    a = _layer(LENGTHS[OFFSETS], OFFSETS, dtype=torch.float32)
    _run(a, on_device=True)  # warm-up outside the check: first-use allocations, handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(a, on_device=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_cuda_ragged_graph_capture_with_device_offsets(path):
    """Forward + backward captured once with device offsets, replayed with other offsets (same
    B and N, another split into sequences) and other values: the eager results."""
    a = _layer([4, 0, 6, 2, 6], OFFSETS, H=12, dtype=torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _run(a, on_device=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static, _ = _run(a, on_device=True)
    for seed, lengths in ((1, [6, 6, 0, 4, 2]), (2, [1, 5, 5, 5, 2])):
        new = _layer(lengths, OFFSETS, H=12, dtype=torch.float32, seed=seed)
        with torch.no_grad():
            a.x.copy_(new.x)
            a.seq_index.copy_(new.seq_index)
            a.hx.copy_(new.hx)
        graph.replay()
        eager, _ = _run(a, on_device=True)
        for n, u, e in zip(NAMES, static, eager):  # cuBLAS may pick other kernels in a graph
            torch.testing.assert_close(
                u, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"replayed {n} (seed {seed}): {m}"
            )


@needs_cuda
def test_cuda_ragged_cpu_index_refused_inside_graph_capture():
    """batch_sizes lives on the CPU, so a packed call cannot be captured: a clear error."""
    a = _layer(LENGTHS[PACKED], PACKED, dtype=torch.float32)
    index = (a.seq_index, a.si, a.layout, a.max_len)
    args = (a.hx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, False)
    ops.gru_layer_ragged_forward(a.x, *index, *args)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with (
        pytest.raises(
            RuntimeError,
            match=r"seq_index \(batch_sizes\) on the CPU cannot be used "
            "inside a CUDA graph capture",
        ),
        torch.cuda.graph(graph),
    ):
        ops.gru_layer_ragged_forward(a.x, *index, *args)
    out, _, _ = ops.gru_layer_ragged_forward(a.x, *index, *args)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ bad index values
@needs_cuda
@pytest.mark.parametrize(
    "bad,match",
    [
        ([0, 3, 2, 6], r"seq_index \(offsets\) must be non-decreasing"),
        ([1, 3, 4, 6], r"offsets\[0\] must be 0"),
        ([0, 3, 4, 5], r"offsets\[B\] must equal input.size\(0\)=6"),
        ([0, 1, 2, 6], r"max_len=3 must be >= every length"),
    ],
    ids=["decreasing", "first", "last", "max_len"],
)
def test_cuda_ragged_bad_cpu_offsets_are_clear_errors(bad, match):
    """Offsets on the CPU are checked on the host before any kernel runs (the CPU backend's
    messages): the context stays usable."""
    a = _layer([3, 1, 2], OFFSETS, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=match):
        ops.gru_layer_ragged_forward(
            a.x, torch.tensor(bad), None, OFFSETS, 3, a.hx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, False
        )
    out, _, _ = ops.gru_layer_ragged_forward(
        a.x, a.seq_index, None, OFFSETS, 3, a.hx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, False
    )
    assert torch.isfinite(out).all()


@needs_cuda
@pytest.mark.parametrize(
    "offsets,sorted_indices",
    [
        ("[0, 3, 2, 6]", None),
        ("[1, 3, 4, 6]", None),
        ("[0, 3, 4, 5]", None),
        ("[0, 1, 2, 6]", None),
        ("[0, 3, 4, 6]", "[0, 0, 1]"),
        ("[0, 3, 4, 6]", "[0, 3, 1]"),
    ],
    ids=["decreasing", "first", "last", "max_len", "sorted-dup", "sorted-range"],
)
def test_cuda_ragged_bad_device_index_is_a_device_assert(offsets, sorted_indices):
    """Index values on the device are checked there (no host copy): a device-side assert, so in
    a child process, since it leaves the CUDA context unusable. sorted_indices goes with a
    packed call (batch_sizes [3, 2, 1] on the CPU), the offsets with an offsets call."""
    if sorted_indices is None:
        call = f"torch.tensor({offsets}, device='cuda'), None, 0, 3"
    else:
        call = f"torch.tensor([3, 2, 1]), torch.tensor({sorted_indices}, device='cuda'), 1, 3"
    code = (
        "import torch, varlen_rnn\n"
        "D, B, I, H = 1, 3, 2, 4\n"
        "z = lambda *s: torch.zeros(*s, device='cuda')\n"
        "x, hx, w_ih, w_hh = z(6, I), z(D, B, H), z(D, 3 * H, I), z(D, 3 * H, H)\n"
        "op = torch.ops.varlen_rnn.gru_layer_ragged_forward\n"
        f"op(x, {call}, hx, w_ih, w_hh, None, None, False)\n"
        "torch.cuda.synchronize()\n"
    )
    assert_device_assert(code)

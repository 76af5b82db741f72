"""The CUDA backend's LSTM (with and without proj_size) and RNN (tanh, relu) ops, raw, against
torch.nn.LSTM / torch.nn.RNN with packing on cuDNN: forward and every gradient, on both
recurrence paths (persistent and fallback), padded and ragged (offsets) rows, float64 and
float32, the half types against float64; persistent equals fallback; an LSTM with a projection
runs even where the persistent path is forced; the CPU kernels agree (zero lengths included).
Every GPU test skips with a reason on a machine without CUDA; the registration test runs
wherever the build has CUDA. The kernels' logic without a GPU: test_cuda_emulated_cells.py."""

import cuda_testing
import pytest
import torch
from cuda_testing import PATHS, needs_cuda, set_knobs
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import varlen_rnn

# The shared fixtures: the path knob (indirect parameter) and knobs reset per test (TF32 is
# off for every test: conftest.py).
path = cuda_testing.path
auto_knobs_after = cuda_testing.auto_knobs_after
OPS = [
    f"{cell}_layer_{kind}{way}"
    for cell in ("lstm", "rnn")
    for kind in ("", "ragged_")
    for way in ("forward", "backward")
]
# cell name -> the torch.nn class's keyword arguments
CELLS = {
    "lstm": dict(proj_size=0),
    "lstm-proj": dict(proj_size=3),
    "rnn-tanh": dict(nonlinearity="tanh"),
    "rnn-relu": dict(nonlinearity="relu"),
}
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=5e-5, rtol=2e-4)}


def test_cuda_cell_kernels_registered_when_built_with_cuda():
    if not varlen_rnn.WITH_CUDA:
        pytest.skip("varlen_rnn was built without CUDA (no toolkit, or a CPU torch)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CUDA"), op


def _module(cell, I, H, D, bias, dtype, device, seed=0):
    torch.manual_seed(seed)
    kw = dict(bias=bias, bidirectional=D == 2, dtype=dtype, device=device)
    if cell.startswith("lstm"):
        return nn.LSTM(I, H, **CELLS[cell], **kw)
    return nn.RNN(I, H, **CELLS[cell], **kw)


def _stack(m, name, D):
    ts = [getattr(m, name + sfx, None) for sfx in ["", "_reverse"][:D]]
    return None if ts[0] is None else torch.stack([t.detach() for t in ts]).contiguous()


def _case(cell, T, B, I, H, D, dtype, device, batch_first=False, seed=0, zeros=False):
    """Inputs, lengths and the incoming gradients of one layer, in float64 then `dtype`."""
    g = torch.Generator().manual_seed(seed)
    P = CELLS[cell].get("proj_size") or H

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)

    L = torch.randint(0 if zeros else 1, T + 1, (B,), generator=g)
    L[0] = T
    x = r(B, T, I) if batch_first else r(T, B, I)
    go = r(*x.shape[:2], D * P)
    return dict(x=x, L=L, hx=r(D, B, P), cx=r(D, B, H), go=go, ghn=r(D, B, P), gcn=r(D, B, H))


def _nn(m, cell, c, batch_first):
    """torch.nn + packing: output (zeros past each length), h_n, c_n and the gradients of
    sum(out * go) + sum(h_n * ghn) [+ sum(c_n * gcn)] w.r.t. x, hx, [cx,] and the parameters."""
    lstm = cell.startswith("lstm")
    x, hx = c["x"].clone().requires_grad_(), c["hx"].clone().requires_grad_()
    cx = c["cx"].clone().requires_grad_() if lstm else None
    packed = pack_padded_sequence(x, c["L"], batch_first=batch_first, enforce_sorted=False)
    out, s = m(packed, (hx, cx) if lstm else hx)
    T = x.shape[1 if batch_first else 0]
    out = pad_packed_sequence(out, batch_first=batch_first, total_length=T)[0]
    h_n, c_n = (s[0], s[1]) if lstm else (s, None)
    loss = (out * c["go"]).sum() + (h_n * c["ghn"]).sum()
    if lstm:
        loss = loss + (c_n * c["gcn"]).sum()
    leaves = [x, hx] + ([cx] if lstm else [])
    grads = torch.autograd.grad(loss, leaves + list(m.parameters()))
    named = dict(zip([n for n, _ in m.named_parameters()], grads[len(leaves) :]))
    D = hx.shape[0]

    def st(n):
        ts = [named.get(n + sfx) for sfx in ["", "_reverse"][:D]]
        return None if ts[0] is None else torch.stack(ts)

    res = dict(out=out.detach(), h_n=h_n.detach(), gx=grads[0], ghx=grads[1])
    if lstm:
        res.update(c_n=c_n.detach(), gcx=grads[2], gw_hr=st("weight_hr_l0"))
    res.update(gw_ih=st("weight_ih_l0"), gw_hh=st("weight_hh_l0"), gb_ih=st("bias_ih_l0"))
    res.update(gb_hh=st("bias_hh_l0"))
    return res


def _ours(m, cell, c, batch_first, layout="padded"):
    """The raw ops of one layer: forward, then the backward op with the same gradients."""
    ops = torch.ops.varlen_rnn
    D = 2 if m.bidirectional else 1
    w_ih, w_hh = _stack(m, "weight_ih_l0", D), _stack(m, "weight_hh_l0", D)
    b_ih, b_hh = _stack(m, "bias_ih_l0", D), _stack(m, "bias_hh_l0", D)
    w_hr = _stack(m, "weight_hr_l0", D)
    lstm = cell.startswith("lstm")
    x, go, L = c["x"], c["go"], c["L"]
    if layout == "offsets":  # sequence-major rows of the valid positions
        xt, gt = (x, go) if batch_first else (x.transpose(0, 1), go.transpose(0, 1))
        x = torch.cat([xt[b, : L[b]] for b in range(len(L))])
        go = torch.cat([gt[b, : L[b]] for b in range(len(L))])
        offs = torch.cat([torch.zeros(1, dtype=torch.long), L.cumsum(0)]).to(x.device)
        index = (offs, None, 0, int(L.max()))
    res = {}
    if lstm:
        if layout == "padded":
            args = (x, L.to(x.device), c["hx"], c["cx"], w_ih, w_hh, b_ih, b_hh, w_hr)
            out, h_n, c_n, ws = ops.lstm_layer_forward(*args, batch_first, True)
            g = ops.lstm_layer_backward(
                go, c["ghn"], c["gcn"], x, L.to(x.device), c["hx"], c["cx"], w_ih, w_hh, w_hr,
                out, ws, batch_first,
            )  # fmt: skip
        else:
            args = (x, *index, c["hx"], c["cx"], w_ih, w_hh, b_ih, b_hh, w_hr)
            out, h_n, c_n, ws = ops.lstm_layer_ragged_forward(*args, True)
            g = ops.lstm_layer_ragged_backward(
                go, c["ghn"], c["gcn"], x, *index, c["hx"], c["cx"], w_ih, w_hh, w_hr, out, ws
            )
        res.update(c_n=c_n, gcx=g[2], gw_hr=g[7] if w_hr is not None else None)
        g = (g[0], g[1]) + tuple(g[3:7])
    else:
        nl = CELLS[cell]["nonlinearity"]
        if layout == "padded":
            args = (x, L.to(x.device), c["hx"], w_ih, w_hh, b_ih, b_hh, nl)
            out, h_n, ws = ops.rnn_layer_forward(*args, batch_first, True)
            g = ops.rnn_layer_backward(
                go, c["ghn"], x, L.to(x.device), c["hx"], w_ih, w_hh, out, ws, nl, batch_first
            )
        else:
            args = (x, *index, c["hx"], w_ih, w_hh, b_ih, b_hh, nl)
            out, h_n, ws = ops.rnn_layer_ragged_forward(*args, True)
            g = ops.rnn_layer_ragged_backward(
                go, c["ghn"], x, *index, c["hx"], w_ih, w_hh, out, ws, nl
            )
    res.update(out=out, h_n=h_n, gx=g[0], ghx=g[1], gw_ih=g[2], gw_hh=g[3])
    res.update(gb_ih=g[4] if b_ih is not None else None, gb_hh=g[5] if b_ih is not None else None)
    return res


def _to_rows(t, L, batch_first):
    tt = t if batch_first else t.transpose(0, 1)
    return torch.cat([tt[b, : L[b]] for b in range(len(L))])


def _compare(got, exp, tol, layout="padded", L=None, batch_first=False):
    for k, e in exp.items():
        a = got.get(k)
        if e is None:
            continue
        if layout == "offsets" and k in ("out", "gx"):
            e = _to_rows(e, L, batch_first)
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{k}: {m}")


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "D,batch_first,bias,layout",
    [
        (1, False, True, "padded"),
        (2, True, True, "padded"),
        (2, False, False, "padded"),
        (2, False, True, "offsets"),
    ],
    ids=["uni", "bi-bf", "bi-nobias", "bi-offsets"],
)
def test_cuda_cells_match_torch_nn_with_packing(path, dtype, cell, D, batch_first, bias, layout):
    T, B, I, H = 9, 6, 5, 7
    m = _module(cell, I, H, D, bias, dtype, "cuda")
    c = _case(cell, T, B, I, H, D, dtype, "cuda", batch_first)
    exp = _nn(m, cell, c, batch_first)
    got = _ours(m, cell, c, batch_first, layout)
    _compare(got, exp, TOL[dtype], layout, c["L"], batch_first)


@needs_cuda
@pytest.mark.parametrize("max_kc", [0, 32], ids=["whole-K", "K-chunks-of-32"])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_cells_persistent_equals_fallback(cell, max_kc):
    """Many row tiles (B past the exact kernels' 128 rows a tile), a partial last block, K
    chunks; the projected LSTM runs the fallback on both settings (forcing persistent is no
    error for it)."""
    T, B, I, H, D = 15, 150, 6, 70, 2
    m = _module(cell, I, H, D, True, torch.float64, "cuda", seed=1)
    c = _case(cell, T, B, I, H, D, torch.float64, "cuda", seed=3)
    results = {}
    for p in PATHS:
        set_knobs(p, max_kc=max_kc)
        results[p] = _ours(m, cell, c, False)
    _compare(results["persistent"], results["fallback"], dict(atol=1e-12, rtol=1e-12))


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_cells_match_cpu_kernels_with_zero_lengths(path, cell):
    """Zero-length rows (which packing refuses) against the CPU kernels in float64."""
    op = "lstm_layer_forward" if cell.startswith("lstm") else "rnn_layer_forward"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CPU"):
        pytest.skip(f"no CPU kernel for varlen_rnn::{op} in this build")
    T, B, I, H, D = 7, 9, 4, 6, 2
    m = _module(cell, I, H, D, True, torch.float64, "cpu", seed=2)
    c = _case(cell, T, B, I, H, D, torch.float64, "cpu", zeros=True, seed=4)
    exp = _ours(m, cell, c, False)
    m.cuda()
    got = _ours(m, cell, {k: v.cuda() if k != "L" else v for k, v in c.items()}, False)
    _compare({k: v.cpu() for k, v in got.items() if v is not None}, exp, TOL[torch.float64])


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_cells_half_types_against_float64(path, dtype, cell):
    T, B, I, H, D = 8, 5, 6, 16, 2
    m = _module(cell, I, H, D, True, torch.float64, "cuda", seed=5)
    c = _case(cell, T, B, I, H, D, torch.float64, "cuda", seed=6)
    exp = _ours(m, cell, c, False)
    got = _ours(m.to(dtype), cell, {k: v.to(dtype) if v.is_floating_point() else v
                                    for k, v in c.items()}, False)  # fmt: skip
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    for k, e in exp.items():
        if e is None:
            continue
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(got[k].double(), e, atol=tol * scale, rtol=tol, msg=k)


@needs_cuda
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_cells_deterministic(path, cell):
    T, B, I, H, D = 10, 20, 5, 33, 2
    m = _module(cell, I, H, D, True, torch.float32, "cuda", seed=7)
    c = _case(cell, T, B, I, H, D, torch.float32, "cuda", seed=8)
    a, b = _ours(m, cell, c, False), _ours(m, cell, c, False)
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k

"""The CUDA kernels for the LSTM (with and without a projection) and the Elman RNN (tanh, relu)
on a machine without a GPU: the same emulation as tests/test_cuda_emulated.py (the real kernel
code of csrc/cuda/*.cuh on CPU threads, tests/cuda_emulation/emu.cpp), with the kernels
instantiated for the other cells. The recurrence, layouts and tiling are the GRU's, checked there;
these cases check what a cell changes: G gate rows per unit in the persistent forward's work
items and the backward's K = G*H, the workspace of S values per unit, the LSTM's c kept per block
(and its gradient), the projection's extra GEMMs and kernels on the fallback path, padding and
ragged rows with every cell.

The oracle is torch.nn.LSTM / torch.nn.RNN with pack_padded_sequence in float64 (autograd for
the gradients), on inputs rounded to the dtype under test, with the same bounds as the GRU's
emulation test (see its docstring): 1e-12 for float64, C * eps * (|ref| + max(1, max|ref|))
otherwise."""

import math
from types import SimpleNamespace

import emulation
import pytest
import torch
from cuda_testing import assert_each_close
from emulation import (
    DTYPE_IDS,
    LAYOUTS,
    OPERAND_EPS,
    SMEM,
    SMS,
    assert_case_reaches,
    cut_knobs,
    input_gemm,
    launch_index,
    ragged_rows,
    rounded_randn,
    rounding_tol,
    weight_grads,
)
from test_cuda_emulated import CASES as GRU_CASES
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from varlen_rnn._schema import CELLS as CELL_INFO

pytestmark = emulation.needs_emulation
emu = emulation.emu

GRU, LSTM, RNN_TANH, RNN_RELU = 0, 1, 2, 3
CELLS = {"lstm": LSTM, "rnn-tanh": RNN_TANH, "rnn-relu": RNN_RELU}
GATES = {GRU: 3, LSTM: 4, RNN_TANH: 1, RNN_RELU: 1}  # GRU: for test_cuda_emulated_fuzz.py
# The workspace width the Python layer declares for each cell (its fake kernels allocate it):
# the emulated kernels' workspace must be as wide.
SAVED = {
    GRU: CELL_INFO["gru"].saved,
    LSTM: CELL_INFO["lstm"].saved,
    RNN_TANH: CELL_INFO["rnn"].saved,
    RNN_RELU: CELL_INFO["rnn"].saved,
}


# As test_cuda_emulated.CASES (three of them are those); P: the LSTM's proj_size (LSTM only,
# fallback only).
CASES = {
    "uni-basic": GRU_CASES["uni-basic"],
    "bi-bf-zeros": GRU_CASES["bi-bf-zeros"],
    "K-chunks-tail-block": dict(
        T=5,
        B=9,
        I=4,
        H=37,
        D=2,
        bias=True,
        layout="padded",
        lengths=[5, 4, 3, 2, 1, 0, 5, 4, 3],
        kc=32,
        slices=1,
        expect=["chunks", "tail"],
    ),
    "offsets-tiles-nobias": dict(
        T=4,
        B=40,
        I=3,
        H=7,
        D=2,
        bias=False,
        layout="offsets",
        max_len=6,
        rows=32,
        lengths=[(i * 7) % 5 for i in range(40)],
        slices=1,
        expect=["tiles"],
    ),
    "packed-bi-K-chunks": dict(
        T=6,
        B=9,
        I=4,
        H=33,
        D=2,
        bias=True,
        layout="packed",
        kc=32,
        lengths=[6, 5, 4, 3, 2, 1, 1, 6, 2],
        slices=1,
        expect=["chunks"],
    ),
    "packed-sorted-uni": GRU_CASES["packed-sorted-uni"],
}
PROJ_CASES = {  # the LSTM with proj_size P (below H, as torch.nn.LSTM requires)
    "proj-uni-basic": dict(CASES["uni-basic"], P=3),
    "proj-bi-bf-zeros": dict(CASES["bi-bf-zeros"], P=3),
    "proj-offsets-nobias": dict(CASES["offsets-tiles-nobias"], P=2),
    "proj-packed-bi": dict(CASES["packed-bi-K-chunks"], P=5, H=13),
}
ALL_CASES = {**CASES, **PROJ_CASES}
HALF_CASES = ["uni-basic", "K-chunks-tail-block", "offsets-tiles-nobias", "packed-bi-K-chunks"]
HALF_PROJ_CASES = ["proj-bi-bf-zeros", "proj-packed-bi"]


def _params():
    """(cell, case, dtype, persistent): every case on both paths, except that an LSTM with a
    projection has no persistent kernel (plan.h) and runs on the fallback only. The relu RNN
    runs float64 and float32 only: in the half types a pre-activation within a rounding of 0
    takes the other side of relu's kink than the float64 oracle's, a difference of order 1 in
    its gradient that no bound on rounding covers (the kernels' half-type code is the tanh
    RNN's, which runs them)."""
    out = []
    for cell in CELLS:
        for name in CASES:
            out.append((cell, name, torch.float64))
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            if cell == "rnn-relu" and dt != torch.float32:
                continue
            out += [(cell, name, dt) for name in HALF_CASES]
    both = [(*p, pers) for p in out for pers in (True, False)]
    proj = [("lstm", name, torch.float64, False) for name in PROJ_CASES]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        proj += [("lstm", name, dt, False) for name in HALF_PROJ_CASES]
    return both + proj


PARAMS = _params()
NAMES = [
    "output",
    "h_n",
    "c_n",
    "grad input",
    "grad hx",
    "grad cx",
    "grad w_ih",
    "grad w_hh",
    "grad b_ih",
    "grad b_hh",
    "grad w_hr",
]


def reference(cell, c, x_tm, L, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, go_tm, ghn, gcn):
    """torch.nn in float64 over the rows with a length (pack_padded_sequence refuses 0): output
    [T, B, D*P] (time-major, zeros past each length), h_n, c_n and the gradients of
    sum(out * go) + sum(h_n * ghn) + sum(c_n * gcn), in NAMES' order (None where the cell has
    no such tensor). Zero-length rows keep hx / cx and pass grad_h_n / grad_c_n through."""
    T, B, I = x_tm.shape
    D, H = hx.shape[0], w_ih.shape[1] // GATES[cell]
    P = hx.shape[2]
    lstm = cell == LSTM
    # Always with biases (zero where the layer has none): the ops compute the bias gradients
    # whether or not the layer has biases.
    kw = dict(bias=True, bidirectional=D == 2, dtype=torch.float64)
    if lstm:
        m = nn.LSTM(I, H, proj_size=P if w_hr is not None else 0, **kw)
    elif cell == GRU:
        m = nn.GRU(I, H, **kw)
    else:
        m = nn.RNN(I, H, nonlinearity="relu" if cell == RNN_RELU else "tanh", **kw)
    with torch.no_grad():
        for d, sfx in enumerate(["", "_reverse"][:D]):
            getattr(m, "weight_ih_l0" + sfx).copy_(w_ih[d])
            getattr(m, "weight_hh_l0" + sfx).copy_(w_hh[d])
            getattr(m, "bias_ih_l0" + sfx).copy_(b_ih[d] if b_ih is not None else 0)
            getattr(m, "bias_hh_l0" + sfx).copy_(b_hh[d] if b_hh is not None else 0)
            if w_hr is not None:
                getattr(m, "weight_hr_l0" + sfx).copy_(w_hr[d])
    live = (L > 0).nonzero().flatten()
    x = x_tm.clone().requires_grad_()
    h0 = hx.clone().requires_grad_()
    c0 = cx.clone().requires_grad_() if lstm else None
    out = torch.zeros(T, B, D * P, dtype=torch.float64)
    h_n, c_n = h0 * 1, (c0 * 1 if lstm else None)
    loss = 0
    if len(live):
        packed = pack_padded_sequence(x[:, live], L[live], enforce_sorted=False)
        state = (h0[:, live], c0[:, live]) if lstm else h0[:, live]
        o, s = m(packed, state)
        o = pad_packed_sequence(o, total_length=T)[0]
        out = out.index_copy(1, live, o)
        h_n = h_n.index_copy(1, live, s[0] if lstm else s)
        if lstm:
            c_n = c_n.index_copy(1, live, s[1])
    loss = (out * go_tm).sum() + (h_n * ghn).sum() + ((c_n * gcn).sum() if lstm else 0)
    leaves = [x, h0] + ([c0] if lstm else [])
    inputs = leaves + list(m.parameters())
    # Where no row has a length, x and the weights do not reach the loss: their gradients are 0.
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    g = dict(zip(["x", "hx"] + (["cx"] if lstm else []), grads))
    named = dict(zip([n for n, _ in m.named_parameters()], grads[len(leaves) :]))

    def stack(prefix):
        ts = [named.get(prefix + sfx) for sfx in ["", "_reverse"][:D]]
        return None if ts[0] is None else torch.stack(ts)

    return [
        out.detach(),
        h_n.detach(),
        c_n.detach() if lstm else None,
        g["x"],
        g["hx"],
        g.get("cx"),
        stack("weight_ih_l0"),
        stack("weight_hh_l0"),
        stack("bias_ih_l0"),
        stack("bias_hh_l0"),
        stack("weight_hr_l0"),
    ]


def _scale(fan_in):
    return min(0.5, 2.0 ** -round(math.log2(math.sqrt(fan_in))))


def case_inputs(cell, c, dtype):
    """Case c's inputs in `dtype` and the reference (torch.nn, reference()) mapped to the case's
    layout, as a namespace: x [rows..., I] and go [rows..., D*P] in the layout (padded time- or
    batch-major, or ragged rows), hx, cx, w_ih, w_hh, b_ih, b_hh (None without bias), w_hr (None
    without a projection), ghn, gcn, the lengths L, rows (ragged_rows, or None when padded),
    D, P and ref in NAMES' order."""
    T, B, I, H, D, bias = (c[k] for k in ("T", "B", "I", "H", "D", "bias"))
    G = GATES[cell]
    P = c.get("P", H)
    proj = "P" in c
    bf = c.get("bf", False)
    f = rounded_randn(dtype, seed=1)
    L = torch.tensor(c["lengths"], dtype=torch.long)
    rows = None if c["layout"] == "padded" else ragged_rows(c, c["lengths"])
    x_tm = f(T, B, I)
    go_tm = f(T, B, D * P)
    if c.get("unused_output"):  # the output's gradient 0 (the op given None: run_backend_case)
        go_tm = torch.zeros_like(go_tm)
    hx, cx = f(D, B, P), f(D, B, H)
    # Weights of nn's scale, 1/sqrt(fan-in), rounded to a power of two (the products stay
    # exact in `dtype`): a contracting recurrence, whose rounding errors do not grow with T.
    w_ih, w_hh = f(D, G * H, I) * _scale(I), f(D, G * H, P) * _scale(P)
    b_ih, b_hh = (f(D, G * H), f(D, G * H)) if bias else (None, None)
    w_hr = f(D, P, H) * _scale(H) if proj else None
    ghn, gcn = f(D, B, P), f(D, B, H)
    ref = reference(cell, c, x_tm, L, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, go_tm, ghn, gcn)
    # The kernels' view of x, go and the reference's output and input gradient: rows.
    if rows is None:
        to_rows = (lambda t: t.transpose(0, 1)) if bf else (lambda t: t)
    else:
        tt, bb = rows[2], rows[3]
        to_rows = lambda t: t[tt, bb]  # noqa: E731
    ref[0], ref[3] = to_rows(ref[0]), to_rows(ref[3])
    x, go = to_rows(x_tm).contiguous(), to_rows(go_tm).contiguous()
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return SimpleNamespace(
        x=cast(x), go=cast(go), hx=cast(hx), cx=cast(cx), w_ih=cast(w_ih), w_hh=cast(w_hh),
        b_ih=cast(b_ih), b_hh=cast(b_hh), w_hr=cast(w_hr), ghn=cast(ghn), gcn=cast(gcn),
        L=L, rows=rows, D=D, P=P, ref=ref,
    )  # fmt: skip


def run_case(emu, cell, c, dtype, persistent, mma=False):
    """(got, ref, cuts) as test_cuda_emulated.run_case, for `cell`, in NAMES' order: the emulated
    kernels with the launchers' GEMMs written out around them (emulation.py); ref from torch.nn
    (reference) mapped to the case's layout, None where the cell lacks the tensor or the layer
    the bias."""
    k = case_inputs(cell, c, dtype)
    D, P, H, S, lstm = k.D, k.P, c["H"], SAVED[cell], cell == LSTM
    none = torch.zeros(0, dtype=dtype)
    w_hr = none if k.w_hr is None else k.w_hr
    cx, gcn = (k.cx, k.gcn) if lstm else (none, none)
    index = (*launch_index(c, k.L, k.rows, persistent), mma)
    out_shape = (*k.x.shape[:-1], D * P)
    x2d, w2d, gx = input_gemm(k.x, k.w_ih, k.b_ih)
    with cut_knobs(emu, c):
        out, hn, cn, ws, cut_f = emu.cell_forward(cell, gx, k.w_hh, k.b_hh, k.hx, cx, w_hr, *index)
        assert ws.shape == (D, ws.shape[1], S * H)
        dgx, dghn, hprev, ghx, gcx, dhr, hcell, cut_b = emu.cell_backward(
            cell, k.go.reshape(-1, D * P), k.ghn, gcn, out, k.hx, ws, k.w_hh, w_hr, *index
        )
    grad_x, *grad_w = weight_grads(dgx, dghn, hprev, x2d, w2d, k.x.shape)
    got = [out.view(out_shape), hn, cn if lstm else None, grad_x, ghx, gcx if lstm else None]
    got += [*grad_w, None]
    if k.w_hr is not None:  # dW_hr = dhr^T h' over all rows (paths_backward.cuh)
        got[10] = torch.bmm(dhr.transpose(1, 2), hcell)
    got = [None if t is None else t.double() for t in got]
    return got, k.ref, (cut_f.tolist(), cut_b.tolist())


OP_NAMES = {GRU: "gru", LSTM: "lstm", RNN_TANH: "rnn", RNN_RELU: "rnn"}


def run_backend_case(
    emu, cell, c, dtype, path, mma=False, output_mask=(True, True), tf32=None, grad_output="given"
):
    """(got, ref) in NAMES' order from the CUDA backend itself (ops_cuda.cu's op entries, the
    emulation's `backend`) called as the ops are, on case c's pretend device ("sms", "smem") with
    path ("persistent", "fallback" or "auto"), tensor cores on (mma) or off, c's K-chunk cap and
    its tiles' rows and row slices (emulation.cut_knobs).
    tf32: torch.backends.cudnn.allow_tf32 for the call (default: mma), which float32 needs to
    take tensor cores. Gradients output_mask leaves out are None on both sides (the op returns
    them empty). grad_output "zeros" or "none" replaces the case's output gradient with a zero
    tensor or None (the output unused; ref is then not the truth of the call)."""
    k = case_inputs(cell, c, dtype)
    be = emu.backend
    be.set_device(c.get("sms", SMS), c.get("smem", SMEM), 9)
    be.set_knobs(path, c.get("kc", 0), False, 1 if mma else 0, True)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = mma if tf32 is None else tf32
    try:
        with cut_knobs(emu, c):
            got = _backend_call(be, cell, c, k, output_mask, grad_output)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    ref = list(k.ref)
    masked = [3] * (not output_mask[0]) + [6, 7, 8, 9, 10] * (not output_mask[1])
    for i in masked:
        assert got[i] is None or got[i].numel() == 0, f"{NAMES[i]} was computed"
        got[i] = ref[i] = None
    return [None if t is None else t.double() for t in got], ref


def _backend_call(be, cell, c, k, output_mask, grad_output="given"):
    """The forward and backward op of case c (inputs k) on the backend: results in NAMES'
    order, what the cell lacks None. grad_output: as run_backend_case's."""
    lstm, name = cell == LSTM, OP_NAMES[cell]
    c_in = [k.cx] if lstm else []
    tail = [k.w_hr] if lstm else ["relu" if cell == RNN_RELU else "tanh"] if name == "rnn" else []
    if k.rows is None:
        index, bf = [k.L], [c.get("bf", False)]
        op = name + "_layer_"
    else:
        seq_index, si = k.rows[0], k.rows[1]
        index, bf = [seq_index, si, LAYOUTS[c["layout"]], c.get("max_len", c["T"])], []
        op = name + "_layer_ragged_"
    fwd = getattr(be, op + "forward")(
        k.x, *index, k.hx, *c_in, k.w_ih, k.w_hh, k.b_ih, k.b_hh, *tail, *bf, True
    )
    out, hn, ws = fwd[0], fwd[1], fwd[-1]
    grad_c = [k.gcn] if lstm else []
    # The backward's tail: w_hr before output and workspace (LSTM), the nonlinearity after.
    pre, post = ([k.w_hr], []) if lstm else ([], tail)
    go = {"given": k.go, "zeros": torch.zeros_like(k.go), "none": None}[grad_output]
    grads = getattr(be, op + "backward")(
        go, k.ghn, *grad_c, k.x, *index, k.hx, *c_in, k.w_ih, k.w_hh, *pre, out, ws, *post,
        *bf, list(output_mask),
    )  # fmt: skip
    grads = list(grads)
    if not lstm:  # grad_cx and grad_w_hr: none without c
        grads = grads[:2] + [None] + grads[2:] + [None]
    elif k.w_hr is None:
        assert grads[7].numel() == 0
        grads[7] = None
    return [out, hn, fwd[2] if lstm else None, *grads]


def check(got, ref, dtype, c_eps=None):
    """got against ref in NAMES' order, within test_cuda_emulated's bound (see its docstring)."""
    assert_each_close(NAMES, got, ref, rounding_tol(dtype, c_eps))


def _id(p):
    return "-".join([p[0], p[1], DTYPE_IDS[p[2]]] + ([] if len(p) < 4 else [PATHS[p[3]]]))


PATHS = {True: "persistent", False: "fallback"}


@pytest.mark.parametrize("cell,name,dtype,persistent", PARAMS, ids=[_id(p) for p in PARAMS])
def test_emulated_cell_kernels_match_torch_nn(emu, cell, name, dtype, persistent):
    c = ALL_CASES[name]
    got, ref, cuts = run_case(emu, CELLS[cell], c, dtype, persistent)
    check(got, ref, dtype)
    if persistent:
        assert_case_reaches(name, c, GATES[CELLS[cell]], cuts)


def test_emulated_projection_refuses_the_persistent_kernel(emu):
    with pytest.raises(RuntimeError, match="no persistent kernel"):
        run_case(emu, LSTM, PROJ_CASES["proj-uni-basic"], torch.float64, True)


@pytest.mark.parametrize("cell", list(CELLS))
def test_emulated_cell_persistent_kernels_are_deterministic(emu, cell):
    # Equal bits over two runs whose threads interleave differently: no sum depends on timing
    # (the LSTM's c and dc are block-local, read and written without a barrier of their own).
    c = CASES["offsets-tiles-nobias"]
    runs = [run_case(emu, CELLS[cell], c, torch.float32, True)[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)


# The persistent kernels' tensor-core path with G = 4 and G = 1 gate rows per forward work item
# (the GRU's emulation test covers G = 3); bounds as there (the operand type's eps).
MMA_DTYPES = [torch.float32, torch.bfloat16]
MMA_PARAMS = [
    (cell, name, dt)
    for cell in CELLS
    for name in ("uni-basic", "offsets-tiles-nobias")
    for dt in MMA_DTYPES
]


@pytest.mark.parametrize("cell,name,dtype", MMA_PARAMS, ids=[_id(p) for p in MMA_PARAMS])
def test_emulated_cell_tensor_core_path_matches_torch_nn(emu, cell, name, dtype):
    got, ref, _ = run_case(emu, CELLS[cell], CASES[name], dtype, True, mma=True)
    check(got, ref, dtype, c_eps=4 * OPERAND_EPS[dtype])

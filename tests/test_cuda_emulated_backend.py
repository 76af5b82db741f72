"""The CUDA backend itself on a machine without a GPU: csrc/cuda/ops_cuda.cu's op entries (the
argument checks, the rows and lengths put on the device, the path choice, the launchers with their
input projection, per-step and weight-gradient GEMMs, the refused-launch fallback, output_mask)
compiled into the emulation (tests/cuda_emulation/emu.cpp) with csrc/cuda/runtime.h's names
defined on the CPU (emu_runtime.h), and called as the ops are, with CPU tensors. The kernel tests
(test_cuda_emulated*.py) hand the kernels gx and write the launchers' GEMMs out in Python; here
nothing between the op's arguments and its results is a stand-in but the device: ATen's GEMMs
run on the CPU, the kernels on CPU threads, the device is a pretend one (SM count, shared memory
per block, compute capability 9).

The oracle and bounds are test_cuda_emulated_cells.py's: torch.nn + packing in float64 on inputs
rounded to the dtype, to 1e-12 for float64, C * eps * (|ref| + max(1, max|ref|)) otherwise."""

import re

import emulation
import pytest
import torch
from emulation import DTYPE_IDS, OPERAND_EPS, input_gemm, launch_index
from test_cuda_emulated import CASES as GRU_CASES
from test_cuda_emulated_cells import (
    CASES,
    GRU,
    HALF_CASES,
    LSTM,
    NAMES,
    PROJ_CASES,
    RNN_RELU,
    RNN_TANH,
    case_inputs,
    check,
    run_backend_case,
)

pytestmark = emulation.needs_emulation
emu = emulation.emu

CELLS = {"gru": GRU, "lstm": LSTM, "rnn-tanh": RNN_TANH, "rnn-relu": RNN_RELU}
HALF = (torch.float16, torch.bfloat16)
GRU_HALF_CASES = ["uni-basic", "wide-tile-nobias", "offsets-K-chunks-tiles-nobias"]


def _params():
    """(cell, case, dtype, path): the GRU's cases (test_cuda_emulated.py) and the other cells'
    (test_cuda_emulated_cells.py) in float64 on both paths, a subset in float32 and the half
    types (the relu RNN not in the half types: test_cuda_emulated_cells._params), the LSTM with a
    projection on the fallback (its only path) and once with the persistent path requested."""
    out = []
    for cell in CELLS:
        cases = GRU_CASES if cell == "gru" else CASES
        half = GRU_HALF_CASES if cell == "gru" else HALF_CASES[:2]
        for path in ("persistent", "fallback"):
            out += [(cell, n, torch.float64, path) for n in cases]
            for dt in (torch.float32, *HALF):
                if cell != "rnn-relu" or dt not in HALF:
                    out += [(cell, n, dt, path) for n in half]
    out += [("lstm", n, torch.float64, "fallback") for n in PROJ_CASES]
    out += [
        ("lstm", n, dt, "fallback") for n in ("proj-packed-bi",) for dt in (torch.float32, *HALF)
    ]
    out.append(("lstm", "proj-uni-basic", torch.float64, "persistent"))
    return out


PARAMS = _params()


def _case(cell, name):
    return (GRU_CASES if cell == "gru" else {**CASES, **PROJ_CASES})[name]


def _id(p):
    return "-".join([p[0], p[1], DTYPE_IDS[p[2]], *p[3:]])


@pytest.mark.parametrize("cell,name,dtype,path", PARAMS, ids=[_id(p) for p in PARAMS])
def test_backend_matches_torch_nn(emu, cell, name, dtype, path):
    got, ref = run_backend_case(emu, CELLS[cell], _case(cell, name), dtype, path)
    check(got, ref, dtype)
    launched = emu.backend.last_launch()
    # What ran is what was asked (an LSTM with a projection has no persistent kernel).
    persistent = path == "persistent" and "P" not in _case(cell, name)
    assert launched["forward_exchange"] == launched["backward_exchange"] == int(persistent)


MMA_PARAMS = [
    (cell, name, dt)
    for cell in ("gru", "lstm", "rnn-tanh")
    for name in (
        ["uni-basic", "offsets-K-chunks-tiles-nobias"] if cell == "gru" else HALF_CASES[2:]
    )
    for dt in (torch.float32, *HALF)
]


@pytest.mark.parametrize("cell,name,dtype", MMA_PARAMS, ids=[_id(p) for p in MMA_PARAMS])
def test_backend_tensor_cores_match_torch_nn(emu, cell, name, dtype):
    """The persistent kernels on tensor cores (float32 on TF32, which nn.GRU's cuDNN policy,
    torch.backends.cudnn.allow_tf32, allows by default), bounded with the operand type's eps as
    test_cuda_emulated_cells.py's tensor-core cases."""
    got, ref = run_backend_case(emu, CELLS[cell], _case(cell, name), dtype, "persistent", mma=True)
    check(got, ref, dtype, c_eps=4 * OPERAND_EPS[dtype])
    launched = emu.backend.last_launch()
    expected = 3 if dtype in HALF else 2  # launch.h's Exchange: 16-bit or TF32 tensor cores
    assert launched["forward_exchange"] == launched["backward_exchange"] == expected


def test_backend_float32_without_tf32_stays_exact(emu):
    """With torch.backends.cudnn.allow_tf32 off float32 stays off tensor cores whatever the
    knob says, as nn.GRU on cuDNN: the exact exchange, the CUDA cores' bound."""
    c = CASES["K-chunks-tail-block"]
    got, ref = run_backend_case(emu, LSTM, c, torch.float32, "persistent", mma=True, tf32=False)
    check(got, ref, torch.float32)
    assert emu.backend.last_launch()["forward_exchange"] == 1


MASKS = [(True, False), (False, True), (False, False)]


@pytest.mark.parametrize("path", ["persistent", "fallback"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_backend_output_mask_skips_only_what_is_masked(emu, cell, path):
    """What the backward computes under an output_mask equals the full backward's bit for bit;
    what it masks comes back empty (run_backend_case asserts that)."""
    c = CASES["offsets-tiles-nobias"]
    full, _ = run_backend_case(emu, CELLS[cell], c, torch.float32, path)
    for mask in MASKS:
        got, _ = run_backend_case(emu, CELLS[cell], c, torch.float32, path, output_mask=mask)
        for n, a, b in zip(NAMES, got, full):
            assert a is None or torch.equal(a, b), f"{n} under output_mask={mask}"


# (cell, case, path): every cell on both paths, and the LSTM's projection (the fallback's).
NONE_GRAD_PARAMS = [
    (cell, case, path)
    for cell in CELLS
    for case in ("offsets-tiles-nobias", "packed-bi-K-chunks")
    for path in ("persistent", "fallback")
] + [("lstm", "proj-packed-bi", "fallback")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "cell,case,path", NONE_GRAD_PARAMS, ids=["-".join(p) for p in NONE_GRAD_PARAMS]
)
def test_backend_none_output_grad_reads_as_zeros(emu, cell, case, path, dtype):
    """grad_output None (an unused output: the kernels get a null pointer) gives the results
    of a zero tensor bit for bit, on both paths, the projection's kernels included."""
    c = (PROJ_CASES if case.startswith("proj") else CASES)[case]
    zeros, _ = run_backend_case(emu, CELLS[cell], c, dtype, path, grad_output="zeros")
    none, _ = run_backend_case(emu, CELLS[cell], c, dtype, path, grad_output="none")
    given, _ = run_backend_case(emu, CELLS[cell], c, dtype, path)
    for n, a, b in zip(NAMES, none, zeros):
        assert (a is None and b is None) or torch.equal(a, b), n
    assert not torch.equal(none[NAMES.index("grad input")], given[NAMES.index("grad input")])


@pytest.mark.parametrize("cell", list(CELLS))
def test_backend_persistent_runs_are_deterministic(emu, cell):
    """Equal bits over two runs of the whole op whose threads interleave differently."""
    c = CASES["packed-bi-K-chunks"]
    a, _ = run_backend_case(emu, CELLS[cell], c, torch.float32, "persistent")
    b, _ = run_backend_case(emu, CELLS[cell], c, torch.float32, "persistent")
    for n, x, y in zip(NAMES, a, b):
        assert (x is None and y is None) or torch.equal(x, y), n


# Too wide for 48 KiB on 1 SM: every unit's G*H x H slice of W_hh on the one block.
WIDE = dict(
    T=3, B=2, I=3, H=72, D=1, bias=True, layout="padded", lengths=[3, 1], sms=1, smem=48 * 1024
)


def test_backend_auto_runs_the_fallback_where_the_weights_do_not_fit(emu):
    got, ref = run_backend_case(emu, GRU, WIDE, torch.float64, "auto")
    check(got, ref, torch.float64)
    launched = emu.backend.last_launch()
    assert launched["forward_exchange"] == launched["backward_exchange"] == 0


def test_backend_forced_persistent_path_that_cannot_run_says_why(emu):
    with pytest.raises(RuntimeError, match="VARLEN_RNN_CUDA_PATH=persistent but the persistent"):
        run_backend_case(emu, GRU, WIDE, torch.float64, "persistent")


def test_backend_refused_cooperative_launch_falls_back(emu):
    """A grid the driver cannot make co-resident (the oversubscribe knob) is refused: with the
    path forced the op says so; on auto it warns and runs the fallback on the same outputs, and
    later calls on that device plan the fallback directly (launch.h's launch_cooperative)."""
    c = CASES["uni-basic"]
    be = emu.backend
    be.set_device(4, 227 * 1024, 9)
    be.set_knobs("fallback", 0, False, 0, True)
    fallback = _forward(be, c)
    be.set_knobs("persistent", 0, True, 0, True)
    with pytest.raises(RuntimeError, match="the driver refused its cooperative launch"):
        _forward(be, c)
    for oversubscribe in (True, False):  # the second call: planned as fallback from the start
        be.set_knobs("auto", 0, oversubscribe, 0, True)
        assert torch.equal(_forward(be, c), fallback)
        assert be.last_launch()["forward_exchange"] == 0
    be.set_device(4, 227 * 1024, 9)  # a new device: the persistent kernel runs there
    torch.testing.assert_close(_forward(be, c), fallback, atol=1e-12, rtol=1e-12)
    assert be.last_launch()["forward_exchange"] == 1


def _forward(be, c, dtype=torch.float64):
    """The GRU op's forward of padded case c on the backend as it stands (device, knobs)."""
    g = torch.Generator().manual_seed(0)
    T, B, I, H, D = (c[k] for k in ("T", "B", "I", "H", "D"))
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x, hx = r(T, B, I), torch.zeros(D, B, H, dtype=dtype)
    w_ih, w_hh, b_ih, b_hh = r(D, 3 * H, I) * 0.5, r(D, 3 * H, H) * 0.5, r(D, 3 * H), r(D, 3 * H)
    L = torch.tensor(c["lengths"])
    return be.gru_layer_forward(x, L, hx, w_ih, w_hh, b_ih, b_hh, False, True)[0]


def _empty_call_cases():
    """(name, layout, lengths, T): calls where no step runs or no row exists."""
    return [
        ("B0", "padded", [], 4),
        ("T0", "padded", [0, 0], 0),
        ("all-zero", "padded", [0, 0, 0], 3),
        ("offsets-N0", "offsets", [0, 0], 2),
        ("offsets-B0", "offsets", [], 2),
    ]


@pytest.mark.parametrize("name,layout,lengths,T", _empty_call_cases(), ids=lambda v: str(v))
def test_backend_calls_without_steps_match_the_cpu_op(emu, name, layout, lengths, T):
    """No step or no row: output zeros (or empty), h_n = hx, c_n = cx, the gradients the CPU op
    gives (grad_hx = grad_h_n, zero weight gradients), for every cell."""
    be, ops = emu.backend, torch.ops.varlen_rnn
    be.set_device(4, 227 * 1024, 9)
    be.set_knobs("auto", 0, False, 0, True)
    g = torch.Generator().manual_seed(3)
    B, I, H, D = len(lengths), 3, 4, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    L = torch.tensor(lengths, dtype=torch.long)
    if layout == "padded":
        x, go = r(T, B, I), r(T, B, D * H)
        index = [L]
    else:
        x, go = r(0, I), r(0, D * H)
        index = [torch.tensor([0, *L.cumsum(0).tolist()]), None, 0, T]
    hx, cx, ghn, gcn = r(D, B, H), r(D, B, H), r(D, B, H), r(D, B, H)
    for cell, G in (("gru", 3), ("lstm", 4), ("rnn", 1)):
        w_ih, w_hh, b_ih, b_hh = r(D, G * H, I), r(D, G * H, H), r(D, G * H), r(D, G * H)
        op = cell + ("_layer_" if layout == "padded" else "_layer_ragged_")
        c_in, c_grad = ([cx], [gcn]) if cell == "lstm" else ([], [])
        fwd_tail = [None] if cell == "lstm" else ["tanh"] if cell == "rnn" else []
        bwd_pre, bwd_post = ([None], []) if cell == "lstm" else ([], fwd_tail)
        bf = [False] if layout == "padded" else []
        results = []
        for impl in (be, ops):
            f = getattr(impl, op + "forward")
            out = f(x, *index, hx, *c_in, w_ih, w_hh, b_ih, b_hh, *fwd_tail, *bf, True)
            grads = getattr(impl, op + "backward")(
                go, ghn, *c_grad, x, *index, hx, *c_in, w_ih, w_hh, *bwd_pre, out[0], out[-1],
                *bwd_post, *bf, [True, True],
            )  # fmt: skip
            results.append([*out[:-1], *grads])
        for i, (a, b) in enumerate(zip(*results)):
            assert a.shape == b.shape, f"{cell} result {i}: {a.shape} vs {b.shape}"
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{cell} {i}: {m}")


BAD_INDEX = [
    # (layout, seq_index, sorted_indices, max_len, N): what the CPU backend refuses too
    ("offsets", [0, 2, 1, 3], None, 3, 3),
    ("offsets", [1, 2, 3], None, 3, 3),
    ("offsets", [0, 2, 4], None, 3, 3),
    ("offsets", [0, 2, 3], None, 1, 3),
    ("packed", [2, 3], None, 2, 5),
    ("packed", [2, 1], [0, 0], 2, 3),
    ("packed", [2, 1], [0, 2], 2, 3),
]


@pytest.mark.parametrize("layout,seq_index,si,max_len,N", BAD_INDEX, ids=lambda v: str(v))
def test_backend_refuses_bad_index_tensors_on_the_host_as_the_cpu_op(
    emu, layout, seq_index, si, max_len, N
):
    """Offsets, batch_sizes and sorted_indices given on the CPU are checked on the host before
    any kernel runs (rows.h): the CUDA backend raises the CPU backend's message."""
    be = emu.backend
    be.set_device(4, 227 * 1024, 9)
    be.set_knobs("auto", 0, False, 0, True)
    B = len(seq_index) - 1 if layout == "offsets" else seq_index[0]
    I, H = 2, 3
    args = [
        torch.zeros(N, I),
        torch.tensor(seq_index),
        None if si is None else torch.tensor(si),
        0 if layout == "offsets" else 1,
        max_len,
        torch.zeros(1, B, H),
        torch.zeros(1, 3 * H, I),
        torch.zeros(1, 3 * H, H),
        None,
        None,
        False,
    ]
    with pytest.raises(RuntimeError) as cpu:
        torch.ops.varlen_rnn.gru_layer_ragged_forward(*args)
    message = str(cpu.value).splitlines()[0]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        be.gru_layer_ragged_forward(*args)


PAD_PARAMS = [(cell, "bi-bf-zeros", p) for cell in ("gru", "lstm") for p in (True, False)]
PAD_PARAMS.append(("lstm", "proj-bi-bf-zeros", False))  # a projection: the fallback only


@pytest.mark.parametrize(
    "cell,case,persistent",
    PAD_PARAMS,
    ids=[f"{c}-{n}-{'persistent' if p else 'fallback'}" for c, n, p in PAD_PARAMS],
)
def test_workspace_rows_of_padded_positions_are_zero(emu, cell, case, persistent):
    """The kernels write every workspace row of a padded layout: the saved values where a
    sequence runs, 0 past its length (as the output), so the op's results are the same bits
    on every call (opcheck compares eager and traced runs). The launchers' buffers start as
    777 in the emulation's harness: a row left unwritten would show."""
    c = {**CASES, **PROJ_CASES}[case]
    cid = CELLS[cell]
    k = case_inputs(cid, c, torch.float64)
    none = torch.zeros(0, dtype=torch.float64)
    cx = k.cx if cid == LSTM else none
    w_hr = none if k.w_hr is None else k.w_hr
    gx = input_gemm(k.x, k.w_ih, k.b_ih)[2]
    index = (*launch_index(c, k.L, None, persistent), False)
    ws = emu.cell_forward(cid, gx, k.w_hh, k.b_hh, k.hx, cx, w_hr, *index)[3]
    T, B = c["T"], c["B"]
    t = torch.arange(T).view(T, 1) if not c.get("bf") else torch.arange(T).view(1, T)
    L = k.L.view(1, B) if not c.get("bf") else k.L.view(B, 1)
    padded = (t >= L).flatten()  # the rows in the layout's order
    assert padded.any() and (~padded).any()
    assert torch.equal(ws[:, padded], torch.zeros_like(ws[:, padded]))
    assert not (ws[:, ~padded] == 777).all(-1).any()

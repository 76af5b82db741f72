"""The emulated CUDA kernels' shared test setup: builds tests/cuda_emulation/emu.cpp (the CUDA
kernels on CPU threads) once per test process, and holds what every test module that runs it
(test_cuda_emulated.py, test_cuda_emulated_cells.py, test_cuda_emulated_exchange.py,
test_cuda_emulated_backend.py, test_cuda_emulated_fuzz.py) shares:
the row layouts, the pretend device, the inputs rounded to the dtype under test, the launchers'
GEMMs around the kernels, the bounds and the check that a case reaches the paths it names. The
tensor-core wrapper's tests take its source paths (test_mma_emulated.py its skip as well)."""

import contextlib
import functools
import os
import shutil
import tempfile
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
EMU_SRC = os.path.join(HERE, "cuda_emulation")  # the emulation's and the test kernels' sources

# Why the emulation cannot run here, or None.
SKIP_REASON = (
    "emulation skipped (VARLEN_RNN_SKIP_EMULATION=1, no C++ compiler, or no csrc/cuda)"
    if os.environ.get("VARLEN_RNN_SKIP_EMULATION") == "1"
    or shutil.which("c++") is None
    or not os.path.isdir(os.path.join(CSRC, "cuda"))
    else None
)
needs_emulation = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@functools.cache
def load_emulation():
    from torch.utils.cpp_extension import load

    import varlen_rnn  # noqa: F401  the CPU kernels are the oracle

    build = tempfile.mkdtemp(prefix="varlen_rnn_emu_build_")
    return load(
        name="varlen_rnn_cuda_emulation",
        sources=[os.path.join(EMU_SRC, "emu.cpp")],
        build_directory=build,
        extra_include_paths=[CSRC],
        # Hidden symbols, bound within the module: the backend's inline functions with static
        # state (launch.h's knobs, the kernel facts' cache) and its testing hooks would
        # otherwise be one instance with the real extension's (a CUDA build defines them too).
        extra_cflags=["-O1", "-std=c++20", "-fvisibility=hidden", "-fvisibility-inlines-hidden"],
        extra_ldflags=["-Wl,-Bsymbolic"],
    )


@pytest.fixture(scope="module")
def emu():
    return load_emulation()


OFFSETS, PACKED, PADDED = 0, 1, 2
LAYOUTS = {"offsets": OFFSETS, "packed": PACKED, "padded": PADDED}
DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
SMS, SMEM = 4, 227 * 1024  # a pretend device: 4 SMs (several units per block), H100 memory
# C of the bound C * eps * (|ref| + max(1, max|ref|)) for the kernels' own roundings in the
# storage type (how it is set: test_cuda_emulated.py's docstring).
TOL_EPS = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 4}
# eps of the tensor-core path's operand type: TF32 for float32, the storage type for the half
# types (test_cuda_emulated.py, above MMA_CASES).
OPERAND_EPS = {
    torch.float32: 2.0**-10,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}


def rounding_tol(dtype, c_eps=None):
    """e -> assert_close's keyword arguments for expected tensor e: to rounding (1e-12) for
    float64, else the bound C * eps * (|ref| + max(1, max|ref|)) with C * eps = c_eps (default
    TOL_EPS[dtype] times dtype's eps)."""
    if dtype == torch.float64:
        return lambda e: dict(atol=1e-12, rtol=1e-12)
    ce = c_eps if c_eps is not None else TOL_EPS[dtype] * torch.finfo(dtype).eps
    return lambda e: dict(atol=ce * max(1.0, e.abs().max().item() if e.numel() else 0.0), rtol=ce)


def rounded_randn(dtype, seed):
    """f(*shape): float64 normal values that are exact in `dtype`, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def f(*s):
        return torch.randn(*s, dtype=torch.float64, generator=g).to(dtype).double()

    return f


def ragged_rows(c, L):
    """The ragged layout of lengths L: (seq_index, sorted_indices or None, t, b) with
    row i of the values holding the padded position (t[i], b[i])."""
    B = len(L)
    if c["layout"] == "offsets":
        pos = [(t, b) for b in range(B) for t in range(L[b])]
        seq_index = torch.tensor([0] + torch.tensor(L).cumsum(0).tolist(), dtype=torch.long)
        si = None
    else:
        packed = pack_padded_sequence(
            torch.zeros(max(L), B, 1), torch.tensor(L), enforce_sorted=bool(c.get("sorted"))
        )
        seq_index, si = packed.batch_sizes, packed.sorted_indices
        order = si.tolist() if si is not None else list(range(B))
        pos = [(t, order[i]) for t, n in enumerate(seq_index.tolist()) for i in range(n)]
    t, b = (
        (torch.tensor(v, dtype=torch.long) for v in zip(*pos))
        if pos
        else (torch.zeros(0, dtype=torch.long),) * 2
    )
    return seq_index, si, t, b


def launch_index(c, L, rows, persistent):
    """The emulated kernels' row and launch arguments for case c (lengths L, ragged_rows or
    None): layout, seq_index, sorted_indices, steps, batch_first, persistent, the pretend
    device (c's "sms" and "smem" where it names them, else SMS and SMEM) and the K-chunk cap."""
    if rows is None:
        layout, seq_index, si, steps = PADDED, L, None, c["T"]
    else:
        layout, seq_index, si = LAYOUTS[c["layout"]], rows[0], rows[1]
        steps = c.get("max_len", c["T"])
    si = torch.zeros(0, dtype=torch.long) if si is None else si
    bf = c.get("bf", False)
    sms, smem = c.get("sms", SMS), c.get("smem", SMEM)
    return (layout, seq_index, si, steps, bf, persistent, sms, smem, c.get("kc", 0))


def input_gemm(x, w_ih, b_ih):
    """The launchers' input projection before the kernels, in x's dtype: (x2d [N, I],
    w2d [D*G*H, I], gx [N, D*G*H] = x2d w2d^T + b_ih)."""
    I = x.shape[-1]
    x2d, w2d = x.reshape(-1, I), w_ih.reshape(-1, I)
    gx = x2d @ w2d.T if b_ih is None else torch.addmm(b_ih.reshape(-1), x2d, w2d.T)
    return x2d, w2d, gx.contiguous()


def weight_grads(dgx, dghn, hprev, x2d, w2d, x_shape):
    """The launchers' GEMMs after the backward kernel: grad input (x_shape), grad w_ih, grad w_hh,
    grad b_ih, grad b_hh, from dgx [N, D*G*H], dghn [D, N, H] (a GRU's; empty otherwise) and
    hprev [D, N, H] (the bias sums accumulate in float32 below float64). The hidden-side
    gradients dgh [D, N, G*H] are dgx's but for a GRU's last gate, which is dghn. The input's
    gradient adds the directions' products one after the other, as the launcher does."""
    D, N = hprev.shape[:2]
    dgh = dgx.view(N, D, dgx.shape[1] // D).transpose(0, 1)
    if dghn.numel():
        dgh = torch.cat([dgh[..., : -dghn.shape[2]], dghn], 2)
    dgh = dgh.contiguous()  # the CPU's bmm sums a strided operand in another order
    acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    GH = dgx.shape[1] // D
    grad_x = dgx[:, :GH] @ w2d[:GH]
    for d in range(1, D):
        grad_x = torch.addmm(grad_x, dgx[:, d * GH : (d + 1) * GH], w2d[d * GH : (d + 1) * GH])
    return [
        grad_x.view(x_shape),
        (dgx.T @ x2d).view(D, -1, x2d.shape[1]),
        torch.bmm(dgh.transpose(1, 2), hprev),
        dgx.sum(0, dtype=acc).view(D, -1),
        dgh.sum(1, dtype=acc),
    ]


@contextlib.contextmanager
def cut_knobs(emu_mod, c):
    """Within: the persistent tiles of case c hold at most c["rows"] rows, where it names them
    (VARLEN_RNN_PERSISTENT_MAX_ROWS: a case that needs several tiles), else plan.h's own limit,
    and its rows are split between c["slices"] blocks per unit slice, where it names them
    (VARLEN_RNN_PERSISTENT_ROW_SLICES; 1: every row in each block), else as the model picks."""
    rows_before = emu_mod.set_max_tile_rows(c.get("rows", 0))
    slices_before = emu_mod.set_row_slices(c.get("slices", 0))
    try:
        yield
    finally:
        emu_mod.set_max_tile_rows(rows_before)
        emu_mod.set_row_slices(slices_before)


def assert_case_reaches(name, c, G, cuts):
    """Case `name` still reaches the code paths its "expect" names in plan.h's persistent cut of
    the pretend device: "chunks" (the backward walks K = G*H in chunks), "tail" (the last block
    owns units past H), "tiles" (several row tiles of a block), "wide" (a forward tile of more
    than 32 rows, which only the CUDA-core kernels take), "sliced" (the rows split between
    blocks, forward and backward). cuts: (forward, backward), each
    [J, blocks_per_dir, tile_rows, kc, blocks, row_slices]."""
    (J, bpd, rows_f, _, _, slices_f), cut_b = cuts
    reached = {
        "chunks": cut_b[3] < G * c["H"],
        "tail": J * (bpd // slices_f) > c["H"],
        "tiles": rows_f < -(-c["B"] // slices_f),
        "wide": rows_f > 32,
        "sliced": slices_f > 1 and cut_b[5] > 1,
    }
    for what in c.get("expect", []):
        assert reached[what], f"{name} no longer reaches '{what}': cuts {cuts[0]} / {cut_b}"


BACKEND_OPS = [
    f"{cell}_layer{ragged}_{kind}"
    for cell in ("gru", "lstm", "rnn")
    for ragged in ("", "_ragged")
    for kind in ("forward", "backward")
]


@contextlib.contextmanager
def cuda_backend_on_cpu(emu_mod):
    """Within: the ops' CPU kernels are the CUDA backend's entries on the emulation (its
    `backend`: ops_cuda.cu's code, its kernels on CPU threads, the device a pretend one), so the
    modules, autograd and every input form run through the CUDA backend on CPU tensors. The CPU
    kernels are back on leaving."""
    lib = torch.library.Library("varlen_rnn", "IMPL")

    def kernel(name):
        entry = getattr(emu_mod.backend, name)
        schema = getattr(torch.ops.varlen_rnn, name).default._schema
        names = [a.name for a in schema.arguments]
        ws_at = names.index("workspace") if name.endswith("_backward") else None

        def call(*args):  # the schema's defaults (output_mask) where the caller left them out
            args = (*args, *(a.default_value for a in schema.arguments[len(args) :]))
            # Where the node autograd runs lets the backward write over the workspace
            # (csrc/layer.h ConsumableWorkspace), the emulation's own copy of that setting
            # says so too, as the CUDA backend in the real extension would read it.
            if ws_at is not None and torch.ops.varlen_rnn._workspace_consumable(args[ws_at]):
                return emu_mod.backend.consuming(args[ws_at], lambda: entry(*args))
            return entry(*args)

        return call

    with warnings.catch_warnings():  # "Overriding a previously registered kernel"
        warnings.simplefilter("ignore")
        for name in BACKEND_OPS:
            lib.impl(name, kernel(name), "CPU")
    try:
        yield
    finally:
        lib._destroy()

"""The CUDA kernels' logic on a machine without a GPU: tests/cuda_emulation/emu.cpp runs the real
kernel code of csrc/cuda/*.cuh on CPU threads, in every dtype the CUDA build dispatches, and must
agree with the CPU kernels.

What it checks: indexing through every row layout (padded time- and batch-major, and the ragged
ops' offsets and packed rows with N rows per buffer), padding zeros, h_n, the length sort, the
offsets and permutation checks, the tiling and K chunks as csrc/cuda/plan.h cuts them, the warp
reduction, the half-type loads and stores, and the persistent kernels' one-barrier-per-step
exchange. What it cannot: anything about the GPU itself (memory model, occupancy, cooperative
launch), which tests/test_cuda.py covers on a GPU. Compiles a small extension (~60 s);
VARLEN_RNN_SKIP_EMULATION=1 skips it.

The reference is always a CPU op in float64 (the padded op for padded cases, the ragged op for
ragged ones). For float64 the kernels must match it to rounding (1e-12). For float32, float16
and bfloat16 the reference runs on the same inputs rounded to the dtype, so the only differences
left are the kernels' own roundings: gx, the outputs, dgx, dghn and hprev are stored in the
dtype (relative error eps/2 each), the fallback's gh is a GEMM rounded to the dtype, and the
backward reads the rounded outputs as its previous state. Each is a few eps relative to the
values involved, propagated through T steps of a contracting recurrence and summed over all rows
by the weight-gradient GEMMs. The bound is
C * eps * (|ref| + max(1, max|ref|)) with C = TOL_EPS (tests/emulation.py), about five times
the largest C these cases need (float32 1.7, float16 0.7, bfloat16 0.6: for the half types the
storage roundings dominate, for float32 its own sums over up to 3H terms in the kernels and all
rows in the GEMMs). A wrong bit-cast, index or missing term gives errors of order max|ref|, far above
the bound for every dtype (bfloat16: 4 * 2^-7 ~ 0.03 of max|ref|)."""

import emulation
import pytest
import torch
from cuda_testing import GRU_RESULTS, assert_each_close
from emulation import (
    DTYPE_IDS,
    LAYOUTS,
    OPERAND_EPS,
    assert_case_reaches,
    cut_knobs,
    input_gemm,
    launch_index,
    ragged_rows,
    rounded_randn,
    rounding_tol,
    weight_grads,
)

pytestmark = emulation.needs_emulation
emu = emulation.emu

# layout: "padded" (bf: batch-major), "offsets" or "packed" (sorted: no sorted_indices, the
# lengths are already longest first); max_len: the ragged ops' step bound (default: T).
# kc: the K-chunk cap (VARLEN_RNN_PERSISTENT_MAX_KC). expect: what the persistent cut must
# show, so that a case keeps reaching the code path it names: "chunks" (the backward walks K in
# chunks), "tail" (the last block owns units past H), "tiles" (several row tiles of a block),
# "wide" (a tile of more than 32 rows), "sliced" (the rows split between blocks). rows: the tiles'
# cap (VARLEN_RNN_PERSISTENT_MAX_ROWS), for several tiles; slices: the row slices
# (VARLEN_RNN_PERSISTENT_ROW_SLICES; 1 in the cases that name what the cut must show, so that
# they keep their cut; else the model's); sms: the pretend device's SMs (emulation.SMS).
CASES = {
    "uni-basic": dict(
        T=5, B=3, I=2, H=4, D=1, bias=True, layout="padded", bf=False, lengths=[5, 2, 0]
    ),
    "bi-bf-zeros": dict(
        T=6,
        B=11,
        I=3,
        H=5,
        D=2,
        bias=True,
        layout="padded",
        bf=True,
        lengths=[6, 0, 3, 1, 6, 2, 5, 4, 0, 6, 1],
    ),
    "wide-tile-nobias": dict(
        T=4,
        B=40,
        I=3,
        H=7,
        D=2,
        bias=False,
        layout="padded",
        bf=False,
        lengths=[(i * 7) % 5 for i in range(40)],
        slices=1,
        expect=["wide"],
    ),
    "K-chunks-tail-block": dict(
        T=7,
        B=9,
        I=4,
        H=37,
        D=2,
        bias=True,
        layout="padded",
        bf=False,
        lengths=[7, 6, 5, 4, 3, 2, 1, 0, 7],
        kc=32,
        slices=1,
        expect=["chunks", "tail"],
    ),
    "K-chunks-small": dict(
        T=3,
        B=9,
        I=2,
        H=13,
        D=2,
        bias=True,
        layout="padded",
        bf=True,
        lengths=[3, 2, 0, 1, 3, 1, 2, 0, 3],
        kc=32,
        slices=1,
        expect=["chunks"],
    ),
    "all-zero": dict(T=3, B=2, I=2, H=3, D=2, bias=True, layout="padded", bf=False, lengths=[0, 0]),
    "T1-B1-H1": dict(T=1, B=1, I=1, H=1, D=1, bias=True, layout="padded", bf=False, lengths=[1]),
    "offsets-uni": dict(T=5, B=3, I=2, H=4, D=1, bias=True, layout="offsets", lengths=[5, 2, 0]),
    "offsets-bi-zeros-loose-bound": dict(
        T=6,
        B=11,
        I=3,
        H=5,
        D=2,
        bias=True,
        layout="offsets",
        max_len=9,
        lengths=[6, 0, 3, 1, 6, 2, 5, 4, 0, 6, 1],
    ),
    "offsets-K-chunks-tiles-nobias": dict(
        T=5,
        B=40,
        I=3,
        H=37,
        D=2,
        bias=False,
        layout="offsets",
        kc=32,
        rows=16,
        lengths=[(i * 7) % 6 for i in range(40)],
        slices=1,
        expect=["chunks", "tail", "tiles"],
    ),
    "offsets-all-zero": dict(T=3, B=2, I=2, H=3, D=2, bias=True, layout="offsets", lengths=[0, 0]),
    "packed-bi-K-chunks": dict(
        T=7,
        B=9,
        I=4,
        H=13,
        D=2,
        bias=True,
        layout="packed",
        kc=32,
        lengths=[7, 6, 5, 4, 3, 2, 1, 1, 7],
        slices=1,
        expect=["chunks"],
    ),
    "packed-tiles-loose-bound": dict(
        T=4,
        B=40,
        I=3,
        H=7,
        D=2,
        bias=False,
        layout="packed",
        max_len=6,
        rows=32,
        lengths=[(i * 7) % 4 + 1 for i in range(40)],
        slices=1,
        expect=["tiles"],
    ),
    "packed-sorted-uni": dict(
        T=5, B=4, I=2, H=4, D=1, bias=True, layout="packed", sorted=True, lengths=[5, 3, 3, 1]
    ),
    # More slices than rows run: the model's choice on 16 SMs at B = 3 (one block of each unit
    # slice without a row).
    "sliced-model-packed-few-rows": dict(
        T=4,
        B=3,
        I=2,
        H=4,
        D=1,
        bias=True,
        layout="packed",
        lengths=[4, 1, 2],
        sms=16,
        expect=["sliced"],
    ),
}
# Rows split between blocks, on cases above: three slices of 4, 4 and 3 rows (zero lengths among
# them) times two unit slices, the second past H; two slices, each walking its rows in two tiles
# with K in chunks.
CASES["sliced-3-bi-bf-zeros-tail"] = dict(
    CASES["bi-bf-zeros"], sms=12, slices=3, expect=["sliced", "tail"]
)
CASES["sliced-offsets-K-chunks-tiles"] = dict(
    CASES["offsets-K-chunks-tiles-nobias"],
    rows=8,
    sms=8,
    slices=2,
    expect=["sliced", "chunks", "tail", "tiles"],
)
# The lower-precision dtypes run the cases that reach every code path between them (D=1 and 2,
# zero lengths, batch_first, several row tiles, K chunks with a tail, a block past H, each row
# layout), to keep the emulation's run time down.
HALF_CASES = [
    "uni-basic",
    "wide-tile-nobias",
    "K-chunks-small",
    "offsets-K-chunks-tiles-nobias",
    "packed-bi-K-chunks",
    "sliced-offsets-K-chunks-tiles",
]
F32_CASES = HALF_CASES + [
    "offsets-bi-zeros-loose-bound",
    "packed-tiles-loose-bound",
    "sliced-3-bi-bf-zeros-tail",
]
PARAMS = (
    [(n, torch.float64) for n in sorted(CASES)]
    + [(n, torch.float32) for n in F32_CASES]
    + [(n, dt) for dt in (torch.float16, torch.bfloat16) for n in HALF_CASES]
)


def reference(c, x, L, hx, w_ih, w_hh, b_ih, b_hh, go, ghn, rows):
    """The CPU op's output, h_n and six gradients in float64 (grad input in x's layout)."""
    ops = torch.ops.varlen_rnn
    if c["layout"] == "padded":
        out, hn, ws = ops.gru_layer_forward(x, L, hx, w_ih, w_hh, b_ih, b_hh, c["bf"], True)
        return [out, hn, *ops.gru_layer_backward(go, ghn, x, L, hx, w_ih, w_hh, out, ws, c["bf"])]
    seq_index, si, _, _ = rows
    index = (seq_index, si, LAYOUTS[c["layout"]], c.get("max_len", c["T"]))
    out, hn, ws = ops.gru_layer_ragged_forward(x, *index, hx, w_ih, w_hh, b_ih, b_hh, True)
    return [out, hn, *ops.gru_layer_ragged_backward(go, ghn, x, *index, hx, w_ih, w_hh, out, ws)]


def run_case(emu, c, dtype, persistent, mma=False, hx_offset=0):
    """(got, ref, cuts): the emulated kernels' results in `dtype` with the launchers' GEMMs
    around them, the CPU op's in float64 on the same (rounded) inputs, and the persistent
    cuts (forward, backward) as [J, blocks_per_dir, tile_rows, kc, blocks, row_slices]. mma: the
    persistent kernels' tensor-core path. hx_offset > 0: hx is a contiguous view that many
    elements into its storage (a user's slice: its rows are not 16-byte aligned)."""
    T, B, I, H, D, bias = (c[k] for k in ("T", "B", "I", "H", "D", "bias"))
    bf = c.get("bf", False)
    f = rounded_randn(dtype, seed=0)
    L = torch.tensor(c["lengths"], dtype=torch.long)
    rows = None if c["layout"] == "padded" else ragged_rows(c, c["lengths"])
    x = (f(B, T, I) if bf else f(T, B, I)) if rows is None else f(len(rows[2]), I)
    hx, w_ih, w_hh = f(D, B, H), f(D, 3 * H, I) * 0.5, f(D, 3 * H, H) * 0.5
    b_ih, b_hh = (f(D, 3 * H), f(D, 3 * H)) if bias else (None, None)
    out_shape = (*x.shape[:-1], D * H)
    go, ghn = f(*out_shape), f(D, B, H)
    ref = reference(c, x, L, hx, w_ih, w_hh, b_ih, b_hh, go, ghn, rows)

    # The launchers' GEMMs (ops_cuda.cu), in the storage dtype around the emulated kernels.
    x, hx, w_ih, w_hh, go, ghn = (t.to(dtype) for t in (x, hx, w_ih, w_hh, go, ghn))
    b_ih, b_hh = (None, None) if not bias else (b_ih.to(dtype), b_hh.to(dtype))
    if hx_offset:
        storage = torch.zeros(hx_offset + hx.numel(), dtype=dtype)
        hx = storage[hx_offset:].copy_(hx.flatten()).view(hx.shape)
    index = launch_index(c, L, rows, persistent)
    x2d, w2d, gx = input_gemm(x, w_ih, b_ih)
    with cut_knobs(emu, c):
        out, hn, ws, cut_f = emu.forward(gx, w_hh, b_hh, hx, *index, mma)
        out = out.view(out_shape)
        dgx, dghn, hprev, ghx, cut_b = emu.backward(
            go.reshape(-1, D * H), ghn, out.reshape(-1, D * H), hx, ws, w_hh, *index, mma
        )
    grad_x, *grad_w = weight_grads(dgx, dghn, hprev, x2d, w2d, x.shape)
    got = [out, hn, grad_x, ghx, *grad_w]
    return [t.double() for t in got], ref, (cut_f.tolist(), cut_b.tolist())


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fallback"])
@pytest.mark.parametrize("name,dtype", PARAMS, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in PARAMS])
def test_emulated_cuda_kernels_match_cpu_kernels(emu, name, dtype, persistent):
    c = CASES[name]
    got, ref, cuts = run_case(emu, c, dtype, persistent)
    # Every element is written: the kernels' outputs start at 777. The bound: see top.
    assert_each_close(GRU_RESULTS, got, ref, rounding_tol(dtype))
    if persistent:
        assert_case_reaches(name, c, 3, cuts)


# Cases whose cut keeps its K chunk whatever the row slices (K in one chunk, or capped by kc), on
# a pretend device of 12 SMs (6 a direction): bi-directional, batch-major with zero lengths;
# offsets rows in tiles of 16 and K chunks with a tail block; packed rows in tiles of 32.
SLICE_CASES = ["bi-bf-zeros", "offsets-K-chunks-tiles-nobias", "packed-tiles-loose-bound"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SLICE_CASES)
def test_row_slices_change_no_bit(emu, name, dtype):
    """Splitting the rows between blocks (VARLEN_RNN_PERSISTENT_ROW_SLICES) changes which block
    computes a row on the exact kernels, not how: every row's sums keep their order, so 2, 3 and
    6 slices give the bits of one, forward and backward. (On tensor cores a block splits K among
    its idle warps by how many tasks its cut gives it, so their bits follow the cut, slices and
    tile rows alike.)"""
    one = run_case(emu, dict(CASES[name], sms=12, slices=1), dtype, True)
    assert one[2][0][5] == one[2][1][5] == 1
    for slices in (2, 3, 6):
        got = run_case(emu, dict(CASES[name], sms=12, slices=slices), dtype, True)
        assert got[2][0][5] == got[2][1][5] == slices, got[2]
        assert got[2][0][3] == one[2][0][3] and got[2][1][3] == one[2][1][3]  # the same K chunks
        for i, (x, y) in enumerate(zip(one[0], got[0])):
            assert torch.equal(x, y), f"{slices} slices: result {i} differs"


def test_row_slices_stage_only_each_blocks_rows(emu):
    """What row slices are for: a block stages only its own rows. The rows staged over a call
    (stage_row's count, forward and backward, every step, tile and K chunk) are the rows each
    block owns summed over blocks, so with every row in each block they are the unit slices
    times the running rows, and with Q slices the (fewer) unit slices times them: 3 slices on 12
    SMs (two directions) take the unit slices from 6 to 2, the rows staged likewise. A kernel
    that staged every row in every block, slices or not, gives the same bits but not this."""
    c = dict(CASES["offsets-K-chunks-tiles-nobias"], sms=12)
    staged, unit_slices = [], []
    for slices in (1, 3):
        emu.stats(True)
        cuts = run_case(emu, dict(c, slices=slices), torch.float32, True)[2]
        st = emu.stats(True)
        staged.append(st["vector_rows"] + st["scalar_rows"])
        (_, bpd, _, kc, _, q), cut_b = cuts
        assert q == cut_b[5] == slices and bpd == cut_b[1] and kc == 32 and cut_b[3] == 32
        unit_slices.append(bpd // slices)
    assert unit_slices == [6, 2], unit_slices
    assert staged[0] > 0 and staged[0] * unit_slices[1] == staged[1] * unit_slices[0], staged


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_emulated_persistent_kernels_are_deterministic(emu, dtype):
    # The emulated threads interleave differently every run, so equal bits show that no sum
    # (the warp reduction, the K chunks, the dh updates) depends on timing.
    for name in ("wide-tile-nobias", "offsets-K-chunks-tiles-nobias"):
        runs = [run_case(emu, CASES[name], dtype, True)[0] for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)


# The persistent kernels' tensor-core path (kMma): the recurrent products on the emulated
# mma.sync, with h (forward) rounded to the operand type - TF32 for float32 (the policy that
# torch.backends.cudnn.allow_tf32 allows), the storage type for the half types, as the
# fallback's cuBLAS GEMMs do - and fp32 sums. The bound is the one above with the operand
# type's eps (TF32: 2^-10) and C about five times the largest these cases need (TF32 0.45,
# float16 0.64, bfloat16 0.44).
MMA_CASES = ["uni-basic", "bi-bf-zeros", "wide-tile-nobias", "K-chunks-small", "offsets-uni"]
MMA_TOL_EPS = {torch.float32: 2, torch.float16: 4, torch.bfloat16: 4}
MMA_PARAMS = [(n, dt) for dt in OPERAND_EPS for n in MMA_CASES]


@pytest.mark.parametrize(
    "name,dtype", MMA_PARAMS, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in MMA_PARAMS]
)
def test_emulated_tensor_core_path_matches_cpu_kernels(emu, name, dtype):
    got, ref, _ = run_case(emu, CASES[name], dtype, True, mma=True)
    c_eps = MMA_TOL_EPS[dtype] * OPERAND_EPS[dtype]
    assert_each_close(GRU_RESULTS, got, ref, rounding_tol(dtype, c_eps))


def test_emulated_tensor_core_path_rounds_float32_to_tf32(emu):
    # The TF32 path is not the exact one: its results differ from the exact kernels' by far
    # more than float32 rounding (and by less than bfloat16's).
    exact = run_case(emu, CASES["wide-tile-nobias"], torch.float32, True)[0]
    tf32 = run_case(emu, CASES["wide-tile-nobias"], torch.float32, True, mma=True)[0]
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(tf32, exact))
    assert 2.0**-20 < rel < 2.0**-7, rel

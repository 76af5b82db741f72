"""The persistent kernels' exchange between blocks and their shared-memory layout, on the CPU
emulation of the CUDA kernels (tests/cuda_emulation/emu.cpp; see test_cuda_emulated.py for what
the emulation covers and how the bounds are set).

What these cases add:
- the 16-bit tensor-core kernels publish h in the storage type (each block keeps its own units'
  exact fp32 state) and stage tiles in it; float32 on TF32 keeps fp32. Checked for every cell,
  forward and backward, padded and ragged rows, against the CPU op / torch.nn in float64;
- stage_row's two ways: 16-byte vector copies where the row length (H, or the backward's dgh
  row segments: G*H columns of dgx, a GRU's 2H of dgx and H of dghn) fills whole vectors, one
  element per load otherwise. The emulation
  counts the rows staged each way (emu.stats), so each case shows which way it ran;
- the padded row strides of plan.h (padded_stride): the emulation computes the worst bank
  conflict of every fragment load from the kernel's own address helpers (mma_matvec.cuh:
  fragment_load_ways) and must see none; the unpadded layout must show conflicts and give
  the same bits."""

import emulation
import pytest
import test_cuda_emulated as gru
import test_cuda_emulated_cells as cells
import torch
from cuda_testing import GRU_RESULTS, assert_each_close
from emulation import DTYPE_IDS, OPERAND_EPS, rounding_tol

pytestmark = emulation.needs_emulation
emu = emulation.emu


CASES = {
    # H = 16: every h row and every backward dgh row segment is whole 16-byte vectors in every
    # dtype; batch-major, zero lengths, both directions.
    "vec-padded-bf": dict(
        T=5,
        B=11,
        I=3,
        H=16,
        D=2,
        bias=True,
        layout="padded",
        bf=True,
        lengths=[5, 0, 3, 1, 5, 2, 4, 4, 0, 5, 1],
    ),
    # H = 24 over packed rows, the backward's K = G*H in 32-column chunks (a tail of 8 or 24).
    "vec-packed-chunks": dict(
        T=6,
        B=20,
        I=3,
        H=24,
        D=2,
        bias=False,
        layout="packed",
        kc=32,
        lengths=[(i * 5) % 6 + 1 for i in range(20)],
    ),
    # H = 13: no row fills whole vectors; offsets rows, several row tiles.
    "scalar-offsets-tiles": dict(
        T=4,
        B=40,
        I=3,
        H=13,
        D=1,
        bias=True,
        layout="offsets",
        rows=32,
        lengths=[(i * 7) % 5 for i in range(40)],
    ),
}
VECTOR = {"vec-padded-bf": True, "vec-packed-chunks": True, "scalar-offsets-tiles": False}
# (dtype, mma): the tensor-core kernels in their three kinds, the exact kernels where they
# stage differently (float64; bfloat16 widened to fp32 tiles).
KINDS = [
    (torch.float32, True),
    (torch.bfloat16, True),
    (torch.float16, True),
    (torch.float64, False),
    (torch.bfloat16, False),
]
# The tensor-core kernels' dtypes (TF32 operands for float32).
MMA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ok_cell(cell, dtype, mma):
    # relu's kink: a pre-activation within a rounding of 0 (half types, or TF32 operands) takes
    # the other side of it than the float64 oracle's, a difference of order 1 in its gradient
    # (see test_cuda_emulated_cells._params); these cases hit it. The relu RNN runs the exact
    # float64 kernels here; its 16-bit and TF32 code is the tanh RNN's.
    return not (cell == "rnn-relu" and (mma or dtype != torch.float64))


PARAMS = [
    (cell, name, dt, mma)
    for cell in ["gru", *cells.CELLS]
    for name in CASES
    for dt, mma in KINDS
    if _ok_cell(cell, dt, mma)
]


def _id(p):
    cell, name, dt, mma = p
    return f"{cell}-{name}-{DTYPE_IDS[dt]}-{'mma' if mma else 'exact'}"


def run(emu, cell, c, dtype, mma):
    """(got, ref) of one persistent case for `cell` ('gru' or a cells.CELLS key)."""
    if cell == "gru":
        got, ref, _ = gru.run_case(emu, c, dtype, True, mma=mma)
    else:
        got, ref, _ = cells.run_case(emu, cells.CELLS[cell], c, dtype, True, mma=mma)
    return got, ref


def check(cell, got, ref, dtype, mma):
    """Within test_cuda_emulated's bounds: the operand type's eps on the tensor-core path."""
    names = GRU_RESULTS if cell == "gru" else cells.NAMES
    c_eps = 4 * OPERAND_EPS[dtype] if mma else None
    assert_each_close(names, got, ref, rounding_tol(dtype, c_eps))


@pytest.mark.parametrize("cell,name,dtype,mma", PARAMS, ids=[_id(p) for p in PARAMS])
def test_emulated_exchange_and_staging_match_cpu(emu, cell, name, dtype, mma):
    emu.stats(True)
    got, ref = run(emu, cell, CASES[name], dtype, mma)
    st = emu.stats(True)
    check(cell, got, ref, dtype, mma)
    if VECTOR[name]:
        assert st["vector_rows"] > 0 and st["scalar_rows"] == 0, st
        # rows in the tile's own type went by copy_async_16 (at least the forward's exchange of
        # h in acc_t or, on 16-bit tensor cores, in the storage type)
        assert st["async_copies"] > 0, st
    else:  # h rows of 13 never fill vectors. The backward stages a dgh row in segments
        # (dgx's G*H columns; a GRU's first 2H there, then its last gate's H from dghn:
        # csrc/cuda/pointwise.cuh), and a segment of whole 16-byte vectors goes in vectors at
        # the rows where it is aligned: the LSTM's 52 in float32 and float64, the GRU's 26 in
        # float64 (at even rows: 39 doubles apart)
        H = CASES[name]["H"]
        segments = [2 * H, H] if cell == "gru" else [cells.GATES[cells.CELLS[cell]] * H]
        bwd_vector = any(n * dtype.itemsize % 16 == 0 for n in segments)
        assert st["scalar_rows"] > 0 and (st["vector_rows"] > 0) == bwd_vector, st
    if mma:  # plan.h's padded strides: no fragment load waits on a bank
        assert st["fragment_ways"] == 1, st
    assert st["misaligned"] == 0, st  # each would fault on a GPU


@pytest.mark.parametrize("dtype,mma", KINDS, ids=[_id(("gru", "", d, m))[5:] for d, m in KINDS])
def test_emulated_misaligned_hx_is_staged_per_element_with_the_same_bits(emu, dtype, mma):
    """hx a view one element into its storage (contiguous, rows not 16-byte aligned, as a slice
    of a larger tensor is): step 0 stages it one element per load, since a 16-byte load of it
    would fault on a GPU; later steps stage the aligned exchange in vectors. Same bits as an
    aligned hx."""
    c = CASES["vec-padded-bf"]
    emu.stats(True)
    aligned, _, _ = gru.run_case(emu, c, dtype, True, mma=mma)
    st_aligned = emu.stats(True)
    shifted, _, _ = gru.run_case(emu, c, dtype, True, mma=mma, hx_offset=1)
    st_shifted = emu.stats(True)
    for name, a, b in zip(GRU_RESULTS, aligned, shifted, strict=True):
        assert torch.equal(a, b), name
    assert st_aligned["scalar_rows"] == 0 and st_aligned["vector_rows"] > 0, st_aligned
    assert st_shifted["scalar_rows"] > 0 and st_shifted["vector_rows"] > 0, st_shifted
    assert st_aligned["misaligned"] == 0 and st_shifted["misaligned"] == 0


# H = 32: unpadded, the weight rows are 32 (TF32) or 16 (16-bit) words apart and so are the
# staged tile's rows (a 32-column chunk), which puts the 8 row groups of a fragment in 4 or 8
# banks. One row slice: the padding changes the shared memory a cut needs, which may move the
# model's row slices, and with them (on tensor cores) how K is split among warps.
CONFLICT_CASE = dict(
    T=4,
    B=8,
    I=2,
    H=32,
    D=1,
    bias=True,
    layout="padded",
    bf=False,
    lengths=[4, 3, 4, 1, 2, 4, 0, 3],
    slices=1,
)


@pytest.mark.parametrize("dtype", MMA_DTYPES, ids=[DTYPE_IDS[d] for d in MMA_DTYPES])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_emulated_padded_layout_is_conflict_free_and_changes_no_bit(emu, cell, dtype):
    emu.stats(True)
    padded, ref = run(emu, cell, CONFLICT_CASE, dtype, True)
    ways_padded = emu.stats(True)["fragment_ways"]
    before = emu.set_smem_padding(False)
    try:
        unpadded, _ = run(emu, cell, CONFLICT_CASE, dtype, True)
        ways_unpadded = emu.stats(True)["fragment_ways"]
    finally:
        emu.set_smem_padding(before)
    assert ways_padded == 1
    assert ways_unpadded >= 4, "the unpadded layout must show the conflicts padding removes"
    for a, b in zip(padded, unpadded):
        assert (a is None and b is None) or torch.equal(a, b)
    check(cell, padded, ref, dtype, True)


# The tagged exchange (csrc/cuda/tagged_exchange.cuh, VARLEN_RNN_EXCHANGE=tagged): the exact
# forward's blocks poll words of value and step instead of meeting at a grid barrier each step.
# It changes how h travels, not what is computed: every output and gradient must keep the
# barrier's bits. The cases cover both directions, zero lengths, several row tiles (tiles whose
# staging polls while others compute), K in chunks (h_prev read from the tagged words rather
# than the tile), a block past H, ragged rows; the fibers' shuffled order interleaves the blocks
# differently on every launch, and a poll lets the others run.
TAGGED_GRU = [
    "uni-basic",
    "bi-bf-zeros",
    "wide-tile-nobias",
    "K-chunks-tail-block",
    "K-chunks-small",
    "offsets-K-chunks-tiles-nobias",
    "packed-bi-K-chunks",
    "all-zero",
    "sliced-3-bi-bf-zeros-tail",
    "sliced-offsets-K-chunks-tiles",
]
TAGGED_CELLS = [("lstm", "K-chunks-tail-block"), ("rnn-tanh", "offsets-tiles-nobias")]
TAGGED_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _barrier_and_tagged(emu, run):
    """run() with the barrier, then with the tagged exchange: (results, results, tagged loads)."""
    barrier = run()
    before = emu.set_tagged_exchange(True)
    try:
        emu.stats(True)
        tagged = run()
        loads = emu.stats(True)["tagged_loads"]
    finally:
        emu.set_tagged_exchange(before)
    return barrier, tagged, loads


def _assert_same_bits(barrier, tagged, what):
    for i, (x, y) in enumerate(zip(barrier, tagged)):
        if x is None:
            assert y is None
            continue
        assert torch.equal(x, y), f"{what}: result {i} differs, max {(x - y).abs().max().item()}"


def _expect_tagged(lengths, dtype):
    """The tagged exchange runs for a float state (not float64), and polls once a step follows
    another (the first step reads hx)."""
    return dtype != torch.float64 and max(lengths) >= 2


@pytest.mark.parametrize("dtype", TAGGED_DTYPES, ids=[DTYPE_IDS[d] for d in TAGGED_DTYPES])
@pytest.mark.parametrize("name", TAGGED_GRU)
def test_tagged_exchange_keeps_the_barriers_bits(emu, name, dtype):
    c = gru.CASES[name]
    barrier, tagged, loads = _barrier_and_tagged(emu, lambda: gru.run_case(emu, c, dtype, True)[0])
    assert (loads > 0) == _expect_tagged(c["lengths"], dtype), loads
    _assert_same_bits(barrier, tagged, name)


@pytest.mark.parametrize("dtype", TAGGED_DTYPES[:2], ids=[DTYPE_IDS[d] for d in TAGGED_DTYPES[:2]])
@pytest.mark.parametrize("cell,name", TAGGED_CELLS)
def test_tagged_exchange_keeps_the_barriers_bits_for_each_cell(emu, cell, name, dtype):
    c = cells.CASES[name]
    barrier, tagged, loads = _barrier_and_tagged(
        emu, lambda: cells.run_case(emu, cells.CELLS[cell], c, dtype, True)[0]
    )
    assert loads > 0
    _assert_same_bits(barrier, tagged, f"{cell} {name}")

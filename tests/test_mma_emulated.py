"""The tensor-core wrapper csrc/cuda/mma.cuh on a machine without a GPU: a warp-level GEMM kernel
written with it (tests/cuda_emulation/mma_tile.cuh) runs on CPU threads through the emulated
mma.sync of tests/cuda_emulation/mma_emu.h, against float64 products of the inputs rounded to
TF32 / bfloat16 / float16. The fragment layouts are checked against the PTX ISA's figures, and
deliberately wrong layouts must fail. The same kernel runs on a GPU in test_mma_gpu.py.
Compiles a small extension (~30 s); VARLEN_RNN_SKIP_EMULATION=1 skips it."""

import os

import emulation
import pytest
import torch
from emulation import CSRC, EMU_SRC
from mma_testing import (
    GEMM_CASES,
    ISA_TABLES,
    KINDS,
    MATVEC_CASES,
    WRONG_VARIANTS,
    assert_matvec_within_bound,
    assert_tile_gemm_within_bound,
    assert_wrong_layout_fails,
    conversion_values,
    element_bits,
    element_round,
    fp32_accumulation_bound,
    matvec_emulated_order,
    parse_table,
    sequential_fp32,
    tf32_round,
)

pytestmark = emulation.needs_emulation


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("mma_emu_build")
    return load(
        name="varlen_rnn_mma_emulation",
        sources=[os.path.join(EMU_SRC, "mma_emu_test.cpp")],
        build_directory=str(build),
        extra_include_paths=[CSRC, EMU_SRC],
        extra_cflags=["-O1", "-std=c++20"],
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fragment_layouts_are_the_ptx_isa_figures(emu, kind):
    got = emu.layout(KINDS[kind])
    for operand, table in ISA_TABLES[kind].items():
        t = got[operand]
        ours = {
            (lane, i): tuple(t[lane, i].tolist()) for lane in range(32) for i in range(t.shape[1])
        }
        assert ours == parse_table(table), f"{kind} {operand} fragment layout"


def test_tf32_reference_rounds_ties_away_from_zero():
    # The test's own reference, on values whose answer is known by hand.
    x = torch.tensor(
        [
            1 + 2**-11,
            -(1 + 2**-11),
            1 + 2**-11 - 2**-23,
            1 + 3 * 2**-11,
            2 - 2**-23,
            3.4028234663852886e38,
            2**-130 + 2**-137,
        ]
    )
    want = torch.tensor(
        [1 + 2**-10, -(1 + 2**-10), 1.0, 1 + 2**-9, 2.0, float("inf"), 2**-130 + 2**-136],
        dtype=torch.float64,
    )
    assert torch.equal(tf32_round(x).double(), want)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_element_conversions_match_the_ptx_roundings(emu, kind):
    x = conversion_values()
    assert torch.equal(emu.to_bits(KINDS[kind], x), element_bits(kind, x))


def test_tf32_conversion_edge_values(emu):
    # Overflow by rounding, infinities, float32 subnormals (the GPU test leaves these out).
    x = torch.tensor(
        [
            3.4028234663852886e38,
            -3.4028234663852886e38,
            float("inf"),
            -float("inf"),
            2**-140 + 2**-147,
            -(2**-149),
            2**-126 - 2**-149,
        ]
    )
    assert torch.equal(emu.to_bits(0, x), element_bits("tf32", x))
    nan_bits = int(emu.to_bits(0, torch.tensor([float("nan")]))[0])
    assert (nan_bits & 0x7F800000) == 0x7F800000 and (nan_bits & 0x7FFFFF) != 0


@pytest.mark.parametrize("M,N,steps", GEMM_CASES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tile_gemm_matches_float64_within_fp32_accumulation(emu, kind, M, N, steps):
    d, (a, b, c) = assert_tile_gemm_within_bound(emu, kind, M, N, steps)
    ar, br = element_round(kind, a), element_round(kind, b)
    # The emulation's own model, bit for bit: exact products added in fp32 in k order.
    assert torch.equal(d, sequential_fp32(ar, br, c))
    # The inputs really are rounded: against the unrounded inputs the result leaves the bound
    # (for short K; the bound grows with K faster than the rounding's random walk).
    if steps <= 8:
        want_raw, bound_raw = fp32_accumulation_bound(a, b, c)
        assert ((d.double() - want_raw).abs() > bound_raw).any()


@pytest.mark.parametrize("variant", sorted(WRONG_VARIANTS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_wrong_fragment_layout_fails_the_check(emu, kind, variant):
    assert_wrong_layout_fails(emu, kind, variant)


@pytest.mark.parametrize("g_major", [True, False], ids=["forward-order", "backward-order"])
@pytest.mark.parametrize("U,K,rows,kc_max", MATVEC_CASES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tile_matvec_mma_matches_float64(emu, kind, U, K, rows, kc_max, g_major):
    emu.misaligned()  # reset
    got, w, x = assert_matvec_within_bound(emu, kind, U, K, rows, kc_max, g_major)
    # Every 16-bit pair was one aligned 32-bit load (a GPU faults on a misaligned one).
    assert emu.misaligned() == 0
    # Bit for bit the emulation's order (matvec_emulated_order: the split of K among warps,
    # two accumulators a warp, the chunk sums added in fp32).
    total = matvec_emulated_order(kind, element_round(kind, x), w, kc_max)
    exact = torch.empty_like(got)
    for row in range(3 * U):
        g, u = divmod(row, U) if g_major else (row % 3, row // 3)
        exact[:, u, g, :] = total[:, row].view(-1, 8)
    assert torch.equal(got, exact)

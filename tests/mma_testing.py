"""References for the tensor-core wrapper's tests (test_mma_emulated.py on CPU threads,
test_mma_gpu.py on a GPU): the element roundings written independently of csrc/cuda/mma.cuh,
the accuracy bound of an fp32-accumulated product, the PTX ISA's fragment tables as data, and
the test cases both files run."""

from __future__ import annotations

import torch

KINDS = {"tf32": 0, "bf16": 1, "f16": 2}
K_STEP = {"tf32": 8, "bf16": 16, "f16": 16}
# Wrong layouts the test kernel can be built with (tests/cuda_emulation/mma_tile.cuh Variant).
WRONG_VARIANTS = {"A-rows-swapped": 1, "B-other-kind": 2, "C-pairs-transposed": 3}
# (M, N, K / k-step): one warp, several K chunks, and several blocks x warps.
GEMM_CASES = [(16, 8, 1), (16, 8, 3), (16, 8, 8), (32, 16, 2), (16, 8, 32)]


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 by arithmetic: 11 significant bits, ties away from zero (float32 in/out).
    Below 2^-126 the step stays 2^-136, as TF32 shares float32's exponent range."""
    x64 = x.double()
    _, e = torch.frexp(x64)  # |x| in [2^(e-1), 2^e)
    step_exp = torch.clamp(e, min=-125) - 11
    q = torch.ldexp(x64.abs(), -step_exp)
    r = torch.copysign(torch.ldexp(torch.floor(q + 0.5), step_exp), x64)
    return torch.where(torch.isfinite(x64), r, x64).float()  # past float32's range: inf


def element_round(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The float32 value of each element after conversion to kind's input type."""
    if kind == "tf32":
        return tf32_round(x)
    return x.to(torch.bfloat16 if kind == "bf16" else torch.float16).float()


def element_bits(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The bits of each element in kind's type, as non-negative int64."""
    if kind == "tf32":
        return tf32_round(x).view(torch.int32).long() & 0xFFFFFFFF
    half = x.to(torch.bfloat16 if kind == "bf16" else torch.float16)
    return half.view(torch.int16).long() & 0xFFFF


def conversion_values() -> torch.Tensor:
    """float32 values whose rounding tells ties-away from ties-to-even and covers signs,
    binade carries and random values (no NaN, infinity or float32 subnormals)."""
    u = 2.0**-23
    special = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1 + 2**-11,
        -(1 + 2**-11),
        1 + 2**-11 - u,
        1 + 2**-11 + 2 * u,
        1 + 2**-9,
        1 + 2**-8,
        1 + 2**-8 + 2**-9,
        2 - u,
        -(2 - u),
        3 * 2**-40,
        65504.0,
        65520.0,
        1e30,
        -3.3e-20,
        2**-14,
        2**-14 * (1 + 2**-11),
    ]
    g = torch.Generator().manual_seed(7)
    rand = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-20, 20, (4000,), generator=g))
    return torch.cat([torch.tensor(special, dtype=torch.float32), rand.float()])


def gemm_inputs(kind: str, M: int, N: int, K: int, seed: int = 0):
    """float32 a [M, K], b [K, N], c [M, N]: random, not yet rounded to kind's type."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(M, K, generator=g),
        torch.randn(K, N, generator=g),
        torch.randn(M, N, generator=g),
    )


def fp32_accumulation_bound(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """(a @ b + c in float64, elementwise bound) for exact products summed in fp32: each of the
    K additions errs by at most one unit of 2^-23 relative (2^-24 rounded to nearest; 2^-23
    covers truncating adders) of a partial sum no larger than sum |a_k b_k| + |c|."""
    a, b, c = a.double(), b.double(), c.double()
    bound = (a.shape[1] + 1) * 2.0**-23 * (a.abs() @ b.abs() + c.abs())
    return a @ b + c, bound


def sequential_fp32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c + sum_k a[:, k] b[k, :] added in float32 in k order (the emulation's exact order)."""
    acc = c.float().clone()
    for k in range(a.shape[1]):
        acc = acc + a[:, k : k + 1].float() * b[k : k + 1, :].float()
    return acc


# tile_matvec_mma cases: (U, K, staged rows, kc_max) - K tails that are not a multiple of the
# mma's K, K in several chunks, one and several sub-tiles of 8 rows, 3U not a multiple of 16,
# fewer tasks than warps (K steps split among 2 and 4 warps; a chunk with fewer steps than
# warps, so one part is empty).
MATVEC_CASES = [
    (5, 16, 8, 16),
    (6, 37, 16, 64),
    (11, 70, 24, 32),
    (3, 8, 8, 8),
    (16, 48, 8, 32),
    (4, 100, 8, 64),
    (2, 200, 16, 256),
]
# Warps of the matvec test kernel's block (tests/cuda_emulation/mma_tile.cuh: kMatvecWarps).
MATVEC_WARPS = 4


def matvec_emulated_order(kind: str, xr: torch.Tensor, w: torch.Tensor, kc_max: int):
    """tile_matvec_mma's sums [rows, 3U] in the emulation's order, bit for bit, from the rounded
    staged rows xr [rows, K] and weight values w [3U, K]: per K chunk, the K steps of each task
    split among `splits` warps (mma_matvec.cuh's mma_splits), each warp's even and odd steps in
    two accumulators (each mma adding its K products in fp32 in k order) added at the end, the
    parts added in order, the chunk sums added in fp32."""
    rows, K = xr.shape
    step = K_STEP[kind]
    tasks = -(-w.shape[0] // 16) * (rows // 8)
    max_steps = -(-kc_max // step)
    splits = 1 if tasks >= MATVEC_WARPS else min(MATVEC_WARPS // tasks, max_steps)
    total = None
    for k0 in range(0, K, kc_max):
        kc = min(kc_max, K - k0)
        steps = -(-kc // step)
        chunk = None
        for part in range(splits):
            acc = [torch.zeros(rows, w.shape[0]), torch.zeros(rows, w.shape[0])]
            s0, s1 = part * steps // splits, (part + 1) * steps // splits
            for s in range(s0, s1):
                cols = slice(k0 + s * step, k0 + min((s + 1) * step, kc))
                acc[(s - s0) & 1] = sequential_fp32(xr[:, cols], w[:, cols].T, acc[(s - s0) & 1])
            summed = acc[0] + acc[1]
            chunk = summed if chunk is None else chunk + summed
        total = chunk if total is None else total + chunk
    return total


def matvec_inputs(kind: str, U: int, K: int, rows: int, seed: int = 0):
    """(w for the extension, w's float32 element values, x float32): w [3U, K] as float32
    rounded to TF32 for TF32 (the kernels round their weights once, as they put them in shared
    memory), as int16 bits of bfloat16/float16 otherwise (the kernel takes 2-byte weights raw)."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(3 * U, K, generator=g), torch.randn(rows, K, generator=g)
    if kind == "tf32":
        return tf32_round(w), tf32_round(w), x
    half = w.to(torch.bfloat16 if kind == "bf16" else torch.float16)
    return half.view(torch.int16), half.float(), x


def matvec_reference(kind: str, w: torch.Tensor, x: torch.Tensor, U: int, g_major: bool):
    """(acc [rows/8, U, 3, 8] in float64, bound) for weight values w [3U, K] and staged rows x
    [rows, K] rounded to kind's type; weight row g*U + u (g_major) or u*3 + g."""
    xr = element_round(kind, x).double()
    p = xr @ w.double().T  # [rows, 3U]
    bound_p = (xr.abs() @ w.double().abs().T) * (w.shape[1] + 2) * 2.0**-23
    want = torch.empty(x.shape[0] // 8, U, 3, 8, dtype=torch.float64)
    bound = torch.empty_like(want)
    for row in range(3 * U):
        g, u = divmod(row, U) if g_major else (row % 3, row // 3)
        want[:, u, g, :] = p[:, row].view(-1, 8)
        bound[:, u, g, :] = bound_p[:, row].view(-1, 8)
    return want, bound


# The checks both test files run, on `lib`: the emulation's extension or the GPU library, each
# with tile_gemm(kind, variant, a, b, c) and matvec(kind, w, x, U, g_major, kc_max).
def assert_tile_gemm_within_bound(lib, kind: str, M: int, N: int, steps: int):
    """lib's warp GEMM (the right fragment layout) within the fp32-accumulation bound of float64
    products of the rounded inputs; returns (d, (a, b, c)) for the caller's own checks."""
    K = steps * K_STEP[kind]
    a, b, c = gemm_inputs(kind, M, N, K)
    d = lib.tile_gemm(KINDS[kind], 0, a, b, c)
    want, bound = fp32_accumulation_bound(element_round(kind, a), element_round(kind, b), c)
    err = (d.double() - want).abs()
    worst = divmod(int(err.argmax()), N)
    assert (err <= bound).all(), f"max error {err.max():.3g} at {worst}, bound {bound[worst]:.3g}"
    return d, (a, b, c)


def assert_wrong_layout_fails(lib, kind: str, variant: str):
    """A deliberately wrong fragment layout leaves the bound somewhere."""
    M, N, K = 32, 16, 2 * K_STEP[kind]
    a, b, c = gemm_inputs(kind, M, N, K, seed=1)
    want, bound = fp32_accumulation_bound(element_round(kind, a), element_round(kind, b), c)
    d = lib.tile_gemm(KINDS[kind], WRONG_VARIANTS[variant], a, b, c)
    assert ((d.double() - want).abs() > bound).any()


def assert_matvec_within_bound(lib, kind: str, U: int, K: int, rows: int, kc_max: int, g_major):
    """lib's tile_matvec_mma within the bound of matvec_reference; returns (got, w, x) for the
    caller's own checks."""
    w_arg, w, x = matvec_inputs(kind, U, K, rows)
    got = lib.matvec(KINDS[kind], w_arg, x, U, g_major, kc_max)
    want, bound = matvec_reference(kind, w, x, U, g_major)
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}"
    return got, w, x


def parse_table(table: str) -> dict:
    """A fragment figure as text (cell 'lane.i' at row r, column c) -> {(lane, i): (r, c)}."""
    cells = {}
    for r, line in enumerate(table.strip().splitlines()):
        for c, cell in enumerate(line.split()):
            lane, i = (int(v) for v in cell.split("."))
            assert (lane, i) not in cells, f"cell {cell} twice"
            cells[(lane, i)] = (r, c)
    return cells


# The PTX ISA's "Matrix Fragments for mma.m16n8k8" (.tf32) and "for mma.m16n8k16 with floating
# point type" (.f16/.bf16) figures: which lane holds which element, ai/bi/ci -> 'lane.i'.
TF32_A = """
 0.0  1.0  2.0  3.0  0.2  1.2  2.2  3.2
 4.0  5.0  6.0  7.0  4.2  5.2  6.2  7.2
 8.0  9.0 10.0 11.0  8.2  9.2 10.2 11.2
12.0 13.0 14.0 15.0 12.2 13.2 14.2 15.2
16.0 17.0 18.0 19.0 16.2 17.2 18.2 19.2
20.0 21.0 22.0 23.0 20.2 21.2 22.2 23.2
24.0 25.0 26.0 27.0 24.2 25.2 26.2 27.2
28.0 29.0 30.0 31.0 28.2 29.2 30.2 31.2
 0.1  1.1  2.1  3.1  0.3  1.3  2.3  3.3
 4.1  5.1  6.1  7.1  4.3  5.3  6.3  7.3
 8.1  9.1 10.1 11.1  8.3  9.3 10.3 11.3
12.1 13.1 14.1 15.1 12.3 13.3 14.3 15.3
16.1 17.1 18.1 19.1 16.3 17.3 18.3 19.3
20.1 21.1 22.1 23.1 20.3 21.3 22.3 23.3
24.1 25.1 26.1 27.1 24.3 25.3 26.3 27.3
28.1 29.1 30.1 31.1 28.3 29.3 30.3 31.3
"""
TF32_B = """
 0.0  4.0  8.0 12.0 16.0 20.0 24.0 28.0
 1.0  5.0  9.0 13.0 17.0 21.0 25.0 29.0
 2.0  6.0 10.0 14.0 18.0 22.0 26.0 30.0
 3.0  7.0 11.0 15.0 19.0 23.0 27.0 31.0
 0.1  4.1  8.1 12.1 16.1 20.1 24.1 28.1
 1.1  5.1  9.1 13.1 17.1 21.1 25.1 29.1
 2.1  6.1 10.1 14.1 18.1 22.1 26.1 30.1
 3.1  7.1 11.1 15.1 19.1 23.1 27.1 31.1
"""
HALF_A = """
 0.0  0.1  1.0  1.1  2.0  2.1  3.0  3.1  0.4  0.5  1.4  1.5  2.4  2.5  3.4  3.5
 4.0  4.1  5.0  5.1  6.0  6.1  7.0  7.1  4.4  4.5  5.4  5.5  6.4  6.5  7.4  7.5
 8.0  8.1  9.0  9.1 10.0 10.1 11.0 11.1  8.4  8.5  9.4  9.5 10.4 10.5 11.4 11.5
12.0 12.1 13.0 13.1 14.0 14.1 15.0 15.1 12.4 12.5 13.4 13.5 14.4 14.5 15.4 15.5
16.0 16.1 17.0 17.1 18.0 18.1 19.0 19.1 16.4 16.5 17.4 17.5 18.4 18.5 19.4 19.5
20.0 20.1 21.0 21.1 22.0 22.1 23.0 23.1 20.4 20.5 21.4 21.5 22.4 22.5 23.4 23.5
24.0 24.1 25.0 25.1 26.0 26.1 27.0 27.1 24.4 24.5 25.4 25.5 26.4 26.5 27.4 27.5
28.0 28.1 29.0 29.1 30.0 30.1 31.0 31.1 28.4 28.5 29.4 29.5 30.4 30.5 31.4 31.5
 0.2  0.3  1.2  1.3  2.2  2.3  3.2  3.3  0.6  0.7  1.6  1.7  2.6  2.7  3.6  3.7
 4.2  4.3  5.2  5.3  6.2  6.3  7.2  7.3  4.6  4.7  5.6  5.7  6.6  6.7  7.6  7.7
 8.2  8.3  9.2  9.3 10.2 10.3 11.2 11.3  8.6  8.7  9.6  9.7 10.6 10.7 11.6 11.7
12.2 12.3 13.2 13.3 14.2 14.3 15.2 15.3 12.6 12.7 13.6 13.7 14.6 14.7 15.6 15.7
16.2 16.3 17.2 17.3 18.2 18.3 19.2 19.3 16.6 16.7 17.6 17.7 18.6 18.7 19.6 19.7
20.2 20.3 21.2 21.3 22.2 22.3 23.2 23.3 20.6 20.7 21.6 21.7 22.6 22.7 23.6 23.7
24.2 24.3 25.2 25.3 26.2 26.3 27.2 27.3 24.6 24.7 25.6 25.7 26.6 26.7 27.6 27.7
28.2 28.3 29.2 29.3 30.2 30.3 31.2 31.3 28.6 28.7 29.6 29.7 30.6 30.7 31.6 31.7
"""
HALF_B = """
 0.0  4.0  8.0 12.0 16.0 20.0 24.0 28.0
 0.1  4.1  8.1 12.1 16.1 20.1 24.1 28.1
 1.0  5.0  9.0 13.0 17.0 21.0 25.0 29.0
 1.1  5.1  9.1 13.1 17.1 21.1 25.1 29.1
 2.0  6.0 10.0 14.0 18.0 22.0 26.0 30.0
 2.1  6.1 10.1 14.1 18.1 22.1 26.1 30.1
 3.0  7.0 11.0 15.0 19.0 23.0 27.0 31.0
 3.1  7.1 11.1 15.1 19.1 23.1 27.1 31.1
 0.2  4.2  8.2 12.2 16.2 20.2 24.2 28.2
 0.3  4.3  8.3 12.3 16.3 20.3 24.3 28.3
 1.2  5.2  9.2 13.2 17.2 21.2 25.2 29.2
 1.3  5.3  9.3 13.3 17.3 21.3 25.3 29.3
 2.2  6.2 10.2 14.2 18.2 22.2 26.2 30.2
 2.3  6.3 10.3 14.3 18.3 22.3 26.3 30.3
 3.2  7.2 11.2 15.2 19.2 23.2 27.2 31.2
 3.3  7.3 11.3 15.3 19.3 23.3 27.3 31.3
"""
# The accumulators C/D: the same figure for every kind here.
ACC_C = """
 0.0  0.1  1.0  1.1  2.0  2.1  3.0  3.1
 4.0  4.1  5.0  5.1  6.0  6.1  7.0  7.1
 8.0  8.1  9.0  9.1 10.0 10.1 11.0 11.1
12.0 12.1 13.0 13.1 14.0 14.1 15.0 15.1
16.0 16.1 17.0 17.1 18.0 18.1 19.0 19.1
20.0 20.1 21.0 21.1 22.0 22.1 23.0 23.1
24.0 24.1 25.0 25.1 26.0 26.1 27.0 27.1
28.0 28.1 29.0 29.1 30.0 30.1 31.0 31.1
 0.2  0.3  1.2  1.3  2.2  2.3  3.2  3.3
 4.2  4.3  5.2  5.3  6.2  6.3  7.2  7.3
 8.2  8.3  9.2  9.3 10.2 10.3 11.2 11.3
12.2 12.3 13.2 13.3 14.2 14.3 15.2 15.3
16.2 16.3 17.2 17.3 18.2 18.3 19.2 19.3
20.2 20.3 21.2 21.3 22.2 22.3 23.2 23.3
24.2 24.3 25.2 25.3 26.2 26.3 27.2 27.3
28.2 28.3 29.2 29.3 30.2 30.3 31.2 31.3
"""
ISA_TABLES = {
    "tf32": {"A": TF32_A, "B": TF32_B, "C": ACC_C},
    "bf16": {"A": HALF_A, "B": HALF_B, "C": ACC_C},
    "f16": {"A": HALF_A, "B": HALF_B, "C": ACC_C},
}

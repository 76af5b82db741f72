"""The CPU step loops' float32 micro-kernel (csrc/cpu/small_gemm.h): directly through the test op
_small_gemm against an exact float64 product, for every kernel this CPU runs, shapes with row
and column tails; then whole float32 layers of every cell through the split step loop with
VARLEN_RNN_CPU_GEMM=kernel and =mkl against the float64 reference. The same for the products of
few-step calls on the weights as stored (f32_dot_rows and f32_rows_times, cpu/dot_rows.h: AVX-512
or AVX2; f32_weight_grad: AVX-512)."""

import dataclasses

import pytest
import torch
from cell_ops_testing import make_batch, make_layer, op_forward, ref_forward
from test_cpu_split_steps import gru_forward, gru_layer

import varlen_rnn
from varlen_rnn import reference

ops = torch.ops.varlen_rnn
KERNELS = ["auto", "avx512", "avx2", "portable"]


def runs(kernel: str) -> bool:
    try:
        ops._small_gemm(torch.ones(1, 1), torch.ones(1, 1), None, kernel)
    except RuntimeError as e:
        assert "does not run kernel" in str(e)
        return False
    return True


@pytest.fixture(params=KERNELS)
def kernel(request):
    if not runs(request.param):
        pytest.skip(f"this CPU does not run the {request.param} kernel")
    return request.param


def product(a, b, c=None, kernel="auto"):
    """(a @ b (+ c), the whole padded buffer the op computed in)."""
    full = ops._small_gemm(a, b, c, kernel)
    return full[: a.shape[0], : b.shape[1]], full


def bound(a, b, K):
    """A float32 rounding bound for a @ b: K ulps of |a| @ |b|, plus a floor for K = 0."""
    return (a.double().abs() @ b.double().abs()) * (K + 2) * 2.0**-24 + 1e-30


# Row counts around the tiles (AVX-512 8, AVX2/portable 6), column counts around the strips
# (48, 16, 8 floats), inner sizes from 0 up to the split loop's 512.
SHAPES = [
    (1, 1, 1),
    (1, 48, 256),
    (2, 5, 3),
    (5, 47, 17),
    (6, 16, 64),
    (7, 49, 33),
    (8, 48, 512),
    (9, 96, 40),
    (13, 100, 19),
    (16, 384, 256),
    (17, 24, 128),
    (33, 130, 7),
    (64, 768, 64),
    (128, 9, 300),
    (3, 7, 0),
    (0, 12, 5),
]


@pytest.mark.parametrize("m,N,K", SHAPES, ids=[f"m{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_product_matches_an_exact_one(kernel, m, N, K):
    g = torch.Generator().manual_seed(m * 1000 + N * 10 + K)
    a, b = torch.randn(m, K, generator=g), torch.randn(K, N, generator=g)
    got, full = product(a, b, kernel=kernel)
    exact = a.double() @ b.double()
    assert ((got.double() - exact).abs() <= bound(a, b, K)).all()
    # Nothing written past the [m, N] result (the op's buffer is NaN there).
    assert full[m:].isnan().all() and full[:, N:].isnan().all()


@pytest.mark.parametrize("m,N,K", [(1, 5, 3), (11, 50, 70), (8, 96, 256)])
def test_accumulate_adds_to_c(kernel, m, N, K):
    g = torch.Generator().manual_seed(7)
    a, b, c = torch.randn(m, K, generator=g), torch.randn(K, N, generator=g), torch.randn(m, N)
    got, full = product(a, b, c, kernel)
    exact = c.double() + a.double() @ b.double()
    assert ((got.double() - exact).abs() <= bound(a, b, K) + c.abs().double() * 2.0**-23).all()
    assert full[m:].isnan().all() and full[:, N:].isnan().all()


def test_strided_operands(kernel):
    """a with a row stride past K (a column slice of a wider buffer, as h_cur's own columns
    would be); b transposed (the split loop packs W_hh's rows: stride_k = 1)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(10, 70, generator=g)
    a = wide[:, 3:53]  # [10, 50], lda 70
    w = torch.randn(37, 50, generator=g)  # [N, K], b = w.t()
    got, _ = product(a, w.t(), kernel=kernel)
    assert ((got.double() - a.double() @ w.t().double()).abs() <= bound(a, w.t(), 50)).all()


# Units [u0, u1) of every gate of W [G*H, K]: the split step loops' slices (cut at multiples of
# 16), a last slice's ragged width, one gate, a slice whose columns cross strips.
GATE_SLICES = [(3, 40, 33, 16, 40), (4, 64, 50, 0, 16), (1, 20, 7, 3, 20), (3, 100, 64, 48, 96)]


def slice_ids(cases):
    return [f"G{c[0]}-H{c[1]}-K{c[2]}-u{c[3]}:{c[4]}" for c in cases]


def gate_slices(w, G, H, K, u0, u1):
    """Units [u0, u1) of every gate of w [G*H, K] as a product's b: [G, K, Hs] read where w is
    (a view), and the same [K, G*Hs] with the rows copied out (read transposed)."""
    slices = w.view(G, H, K)[:, u0:u1]  # [G, Hs, K]
    return slices.transpose(1, 2), slices.reshape(-1, K).t()


@pytest.mark.parametrize("G,H,K,u0,u1", GATE_SLICES, ids=slice_ids(GATE_SLICES))
def test_gate_slices_read_where_the_weight_is(kernel, G, H, K, u0, u1):
    """The split loops pack units [u0, u1) of every gate of W_ih/W_hh [G*H, K] in place (b given
    as [G, K, Hs], its groups H*K apart): the same bits as the product on those rows copied out
    (the packing before), and within float32 rounding of an exact product."""
    g = torch.Generator().manual_seed(G * 100 + H + K)
    w, a = torch.randn(G * H, K, generator=g), torch.randn(13, K, generator=g)
    N = G * (u1 - u0)
    in_place, copied = gate_slices(w, G, H, K, u0, u1)
    got = ops._small_gemm(a, in_place, None, kernel)
    want, _ = product(a, copied, kernel=kernel)
    assert torch.equal(got[:13, :N], want)
    exact = a.double() @ copied.double()
    assert ((got[:13, :N].double() - exact).abs() <= bound(a, copied, K)).all()
    assert got[13:].isnan().all() and got[:, N:].isnan().all()
    # Groups of row-major [K, Hs] panels (b's columns read along k's rows, the other packing loop).
    panels = torch.randn(G, K, u1 - u0, generator=g)
    got = ops._small_gemm(a, panels, None, kernel)
    want, _ = product(a, torch.cat(list(panels), dim=1), kernel=kernel)
    assert torch.equal(got[:13, :N], want)


def test_rows_do_not_depend_on_each_other(kernel):
    """Each result row is one FMA chain over k in order, whatever its tile: computing a row alone
    or among others gives the same bits (what makes the step loop deterministic)."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(21, 200, generator=g), torch.randn(200, 61, generator=g)
    together, _ = product(a, b, kernel=kernel)
    for i in (0, 7, 8, 15, 20):
        alone, _ = product(a[i : i + 1], b, kernel=kernel)
        assert torch.equal(together[i], alone[0])
    again, _ = product(a, b, kernel=kernel)
    assert torch.equal(together, again)


def test_bad_arguments_name_themselves():
    with pytest.raises(
        RuntimeError, match="kernel must be auto, avx512, avx2, portable, blas, dots or rows"
    ):
        ops._small_gemm(torch.ones(2, 3), torch.ones(3, 4), None, "sse9")
    with pytest.raises(
        RuntimeError,
        match="b must be a float32 \\[K, N\\] or \\[groups, K, n\\] with K = a.size\\(1\\)",
    ):
        ops._small_gemm(torch.ones(2, 3), torch.ones(4, 4), None, "auto")
    with pytest.raises(RuntimeError, match="kernel 'blas' takes a 2-D b"):
        ops._small_gemm(torch.ones(2, 3), torch.ones(2, 3, 4), None, "blas")
    with pytest.raises(RuntimeError, match="a must be a 2-D float32"):
        ops._small_gemm(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 4), None, "auto")
    with pytest.raises(RuntimeError, match="c must be float32 \\[m, N\\]"):
        ops._small_gemm(torch.ones(2, 3), torch.ones(3, 4), torch.ones(2, 5), "auto")


def test_blas_entry_agrees():
    """The benchmark's other side (the step loops' BLAS call) computes the same product."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(13, 300, generator=g), torch.randn(300, 100, generator=g)
    got, full = product(a, b, kernel="blas")
    assert ((got.double() - a.double() @ b.double()).abs() <= bound(a, b, 300)).all()
    assert full[13:].isnan().all() and full[:, 100:].isnan().all()


# -- whole layers through the split step loop ------------------------------------------------

I = 6
# H = 40: at 2 threads slices of 32 + 8 units, so GRU panels of 96 and 24 columns (a full
# and a partial 48-column strip); 40 rows of lengths 1..11, so the running rows go from 40 down
# to 1: full row tiles, tails, and more than one 16-row chunk.
H, P = 40, 19
LENGTHS = [(7 * b) % 11 + 1 for b in range(40)]


@pytest.fixture(params=["kernel", "mkl"])
def gemm(request, monkeypatch):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", request.param)
    return request.param


def double(t):
    return None if t is None else t.double()


def float32_layer(cell, D, batch):
    """(run, want): run() is the float32 op's forward without a workspace, (output, h_n[, c_n]);
    want is the float64 reference's on the same values (None where the cell has no c_n)."""
    batch64 = dataclasses.replace(batch, x=batch.x.double())
    B = len(batch.lengths)
    if cell == "gru":
        w = gru_layer(D, B, dtype=torch.float32)
        f = (ops.gru_layer_forward, ops.gru_layer_ragged_forward)
        w64 = {k: v.double() for k, v in w.items()}
        r = (reference.gru_layer_reference, reference.gru_layer_ragged_reference)
        return (lambda: gru_forward(w, batch, *f, False)[:2]), gru_forward(w64, batch64, *r)
    layer = make_layer(cell, D, B, I, H, P=P, dtype=torch.float32)
    layer64 = layer.replace(**{k: double(v) for k, v in layer.tensors().items()})
    return (lambda: op_forward(layer, batch, need_workspace=False)[:3]), ref_forward(
        layer64, batch64
    )


def assert_float32_rounding(got, want):
    for g, r in zip(got, want, strict=True):
        if r is not None:  # float32 rounding, relative to the scale (ReLU's states grow)
            scale = float(r.abs().max())
            torch.testing.assert_close(g.double(), r, atol=2e-5 * max(scale, 1.0), rtol=1e-4)


@pytest.mark.parametrize("layout", ["padded", "offsets", "packed"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh", "rnn_relu"])
def test_float32_layer_matches_the_float64_reference(gemm, threads, cell, D, layout):
    run, want = float32_layer(cell, D, make_batch(layout, LENGTHS, I, dtype=torch.float32))
    assert_float32_rounding(run(), want)


def test_kernel_loop_repeats_exactly_and_saves_the_same_workspace(threads, monkeypatch):
    """Deterministic, and training (the workspace) takes the same path as inference."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", "kernel")
    batch = make_batch("padded", LENGTHS, I, dtype=torch.float32)
    layer = make_layer("lstm", 2, len(LENGTHS), I, H, dtype=torch.float32)
    a = op_forward(layer, batch, need_workspace=True)
    b = op_forward(layer, batch, need_workspace=True)
    c = op_forward(layer, batch, need_workspace=False)
    for x, y, z in zip(a[:3], b[:3], c[:3]):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(a[3], b[3]) and a[3].numel() > 0


# -- few-step calls: the products on the weights as stored (f32_dot_rows) --------------------

# f32_dot_rows and f32_rows_times run on AVX-512 or AVX2 (a CPU with AVX-512 runs both: "avx2"
# holds there too); f32_weight_grad on AVX-512 only.
DOTS = pytest.mark.skipif(not runs("avx2"), reason="this CPU has neither AVX-512 nor AVX2")
GRAD = pytest.mark.skipif(not runs("avx512"), reason="this CPU has no AVX-512 (f32_weight_grad)")
# Row counts around the 8-row groups of w (the task) and the call's limit (kF32DotRows = 256),
# K around the 16-lane vectors (masked tails) and past them.
DOT_SHAPES = [(1, 1, 1), (1, 8, 16), (2, 9, 17), (3, 15, 31), (8, 64, 256), (16, 100, 33)]
DOT_SHAPES += [(32, 768, 256), (5, 7, 0), (0, 9, 8), (33, 130, 512), (256, 77, 40), (257, 9, 33)]


@DOTS
@pytest.mark.parametrize("m,N,K", DOT_SHAPES, ids=[f"m{m}-N{n}-K{k}" for m, n, k in DOT_SHAPES])
def test_dots_match_an_exact_one(m, N, K):
    g = torch.Generator().manual_seed(m * 1000 + N * 10 + K)
    a, w = torch.randn(m, K, generator=g), torch.randn(N, K, generator=g)
    got, full = product(a, w.t(), kernel="dots")
    exact = a.double() @ w.t().double()
    assert ((got.double() - exact).abs() <= bound(a, w.t(), K)).all()
    assert full[m:].isnan().all() and full[:, N:].isnan().all()


# The backward's dh = dG W_hh on W_hh as stored (f32_rows_times): rows around its 6-row tiles,
# columns around its 64-column tasks and AVX2's 8-column vectors (masked tails).
ROWS_SHAPES = [(1, 1, 1), (1, 64, 16), (5, 65, 17), (6, 63, 100), (7, 130, 768), (32, 256, 33)]
ROWS_SHAPES += [(3, 5, 0), (0, 9, 8), (256, 70, 21), (257, 3, 40)]
# Past one tile of rows with more than 256 KiB of w a task (K > 1024): k in pieces of 256.
ROWS_SHAPES += [(7, 70, 1100), (13, 64, 1537)]


@DOTS
@pytest.mark.parametrize("m,N,K", ROWS_SHAPES, ids=[f"m{m}-N{n}-K{k}" for m, n, k in ROWS_SHAPES])
def test_rows_times_a_stored_weight_matches_an_exact_one(m, N, K):
    g = torch.Generator().manual_seed(m * 1000 + N * 10 + K)
    a, w, c = torch.randn(m, K, generator=g), torch.randn(K, N, generator=g), torch.randn(m, N)
    got, full = product(a, w, kernel="rows")
    assert ((got.double() - a.double() @ w.double()).abs() <= bound(a, w, K)).all()
    assert full[m:].isnan().all() and full[:, N:].isnan().all()
    got, _ = product(a, w, c, kernel="rows")  # accumulate
    exact = c.double() + a.double() @ w.double()
    assert ((got.double() - exact).abs() <= bound(a, w, K) + c.abs().double() * 2.0**-23).all()


# A weight's gradient over few positions (f32_weight_grad, n <= kF32GradRows = 16): rows of c
# around the 4-row tiles, columns around the 16-column vectors and 64-column tiles.
GRAD_SHAPES = [(1, 1, 1), (2, 5, 15), (3, 4, 16), (7, 17, 17), (16, 768, 256), (15, 13, 130)]
GRAD_SHAPES += [(4, 3, 65), (9, 64, 63), (1, 1536, 512), (0, 5, 7)]


@GRAD
@pytest.mark.parametrize("n,G,P", GRAD_SHAPES, ids=[f"n{n}-G{g}-P{p}" for n, g, p in GRAD_SHAPES])
def test_weight_grad_matches_an_exact_one(n, G, P):
    """a^T b to float32 accumulation of the exact one, a's rows strided as a slice of the
    backward's [N, D*G*H] buffer is; nothing written past [G, P]; over no positions, zeros."""
    g = torch.Generator().manual_seed(n * 1000 + G + P)
    a = torch.randn(n, G + 7, generator=g)[:, 3 : 3 + G]  # lda G + 7
    b = torch.randn(n, P, generator=g)
    full = ops._weight_grad(a, b)
    exact = a.double().t() @ b.double()
    assert ((full[:G, :P].double() - exact).abs() <= bound(a.t(), b, n)).all()
    assert full[G:].isnan().all() and full[:, P:].isnan().all()


@GRAD
def test_weight_grad_refuses_more_rows():
    with pytest.raises(RuntimeError, match="takes at most 16 float32 rows"):
        ops._weight_grad(torch.ones(17, 4), torch.ones(17, 4))


@DOTS
@pytest.mark.parametrize("m,K", [(8, 300), (13, 1300)], ids=["one-piece", "pieces-of-k"])
def test_rows_times_rows_do_not_depend_on_each_other(m, K):
    """Each result is one chain over k in order: rows in tiles, over k in pieces (13 rows, K =
    1300: resumed from c at every 256 values of k) or alone, the same bits."""
    g = torch.Generator().manual_seed(K)
    a, w = torch.randn(m, K, generator=g), torch.randn(K, 70, generator=g)
    together, _ = product(a, w, kernel="rows")
    for i in (0, 6, m - 1):
        assert torch.equal(together[i], product(a[i : i + 1], w, kernel="rows")[0][0])


@DOTS
def test_dots_rows_do_not_depend_on_each_other():
    """Each result is one sum in a fixed order: a row alone or among others, the same bits."""
    g = torch.Generator().manual_seed(5)
    a, w = torch.randn(21, 200, generator=g), torch.randn(61, 200, generator=g)
    together, _ = product(a, w.t(), kernel="dots")
    for i in (0, 7, 20):
        assert torch.equal(together[i], product(a[i : i + 1], w.t(), kernel="dots")[0][0])


# Few steps (csrc/cpu/team.h few_steps): the per-step GEMM loop, whose products for at most
# kF32DotRows (256, AVX-512) or kF32DotRowsAvx2 (16) rows take f32_dot_rows. At the limit: every
# product on the dots. Past it by 8 rows: the input projection and the first step on the BLAS,
# the later steps (half the limit) on the dots.
DOT_LIMIT = 256 if runs("avx512") else 16
FEW_LENGTHS = {
    "one-row": [3],
    "eight": [4, 1, 3, 2, 4, 4, 1, 2],
    "at-the-limit": [(3 * b) % 4 + 1 for b in range(DOT_LIMIT)],
    "past-the-limit": [1] * (DOT_LIMIT // 2 + 8) + [(7 * b) % 3 + 2 for b in range(DOT_LIMIT // 2)],
}


@DOTS
@pytest.mark.parametrize("steps_rows", list(FEW_LENGTHS))
@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_proj", "rnn_tanh", "rnn_relu"])
def test_few_step_float32_layer_matches_the_float64_reference(
    cell, steps_rows, threads, monkeypatch
):
    """On the weights as stored (auto) and on the BLAS (VARLEN_RNN_CPU_GEMM=mkl), both to float32
    rounding of the reference."""
    lengths = [min(n, 4) for n in FEW_LENGTHS[steps_rows]]
    run, want = float32_layer(cell, 2, make_batch("padded", lengths, I, dtype=torch.float32))
    runs_ = {}
    for setting in ("auto", "mkl"):
        monkeypatch.setenv("VARLEN_RNN_CPU_GEMM", setting)
        runs_[setting] = run()
        assert_float32_rounding(runs_[setting], want)
    # The two settings took different products (their roundings differ somewhere).
    assert any(not torch.equal(a, b) for a, b in zip(runs_["auto"], runs_["mkl"]) if a is not None)


# A float32 inference call (no workspace) whose layer's recurrent weights pass 1 MiB a direction
# takes the per-step loop, on the dot products, for longer (csrc/cpu/team.h few_steps): up to
# twice the steps at 2 MiB. (cell, H, B, the first step count that takes the split loops):
# GRU H=512 (3 MiB) and LSTM H=384 (2.25 MiB) twice the old limits, the RNN at H=512 (1 MiB) and
# the GRU at H=256 (0.75 MiB) the old ones (160 / (B + 4), at least 6, at most 32).
LONGER = [("GRU", 512, 1, 64), ("LSTM", 384, 8, 26), ("RNN", 512, 1, 32), ("GRU", 256, 1, 32)]


@DOTS
@pytest.mark.parametrize("cell,H,B,limit", LONGER, ids=[f"{c}-H{h}-B{b}" for c, h, b, _ in LONGER])
def test_float32_inference_takes_the_per_step_loop_up_to_its_limit(
    cell, H, B, limit, threads, monkeypatch
):
    """Below the limit a call's outputs are the bits of the per-step loop forced
    (VARLEN_RNN_CPU_STEPS=gemm), which there differ from the split loops' (its products are dot
    products on the weights as stored), so the equality names the loop; at the limit they are
    the bits of the split loops forced. There the per-step loop, forced, no longer takes the dot
    products, and its GEMMs may give the split loops' bits (on a Sapphire Rapids Xeon MKL's
    sgemm and our kernel do, for the LSTM at B=8): so the call at the limit is checked against
    the per-step loop of few steps through its first limit - 1 steps, which that loop would have
    given the bits it gives the shorter call (a step depends only on the steps before it)."""
    monkeypatch.delenv("VARLEN_RNN_CPU_GEMM", raising=False)
    torch.manual_seed(0)
    layer = getattr(varlen_rnn, cell)(16, H)
    x = torch.randn(limit, B, 16)  # the shorter call's input: its first limit - 1 steps

    def run(T, steps):
        if steps is None:
            monkeypatch.delenv("VARLEN_RNN_CPU_STEPS", raising=False)
        else:
            monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
        with torch.inference_mode():
            out, state = layer(x[:T], lengths=torch.full((B,), T))
        return [out, *(state if isinstance(state, tuple) else (state,))]  # the LSTM's (h, c)

    below = {steps: run(limit - 1, steps) for steps in (None, "gemm", "split")}
    assert all(torch.equal(a, b) for a, b in zip(below[None], below["gemm"]))
    assert not torch.equal(below["gemm"][0], below["split"][0])
    at = {steps: run(limit, steps) for steps in (None, "split")}
    assert all(torch.equal(a, b) for a, b in zip(at[None], at["split"]))
    assert not torch.equal(at[None][0][: limit - 1], below["gemm"][0])

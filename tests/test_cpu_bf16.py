"""bfloat16 layers on the CPU's bfloat16 units (csrc/cpu/bf16_gemm.h), each test on each unit the
CPU has (the matrix unit, AMX; AVX512-BF16's dot products in our own kernel, which AMX CPUs run
too; a unit the CPU lacks is skipped, saying so): the product itself through the test op
_bf16_gemm against an exact float64 one (row and column tails, accumulate, bias, one thread and
all), then whole bfloat16 modules of every cell and input kind, run with the products in
bfloat16 (VARLEN_RNN_CPU_BF16=amx or avx512) and in float32 throughout (=float), against
float64 references:
- the plain reference on the bfloat16 weights and input: both runs agree with it to bfloat16
  precision, forward and every gradient;
- a mirror of the bfloat16 products (the reference with each product's state operand rounded
  to bfloat16, as the kernel rounds h): the bfloat16 run agrees with it to one bfloat16
  rounding of the result, its own definition, whichever step loop runs. At these sizes the
  mirror tells the two runs apart for the RNN (the float32 run fails it); for the GRU and LSTM
  the rounding of h stays inside the tolerance, and the runs are told apart by their bits.
The backward's own buffers are checked too: none holds float32 gate gradients over the
positions (torch.profiler's memory trace)."""

import copy
import os
import types

import pytest
import torch
import torch.nn.functional as F
from test_cpu_small_gemm import gate_slices, slice_ids

import varlen_rnn
from varlen_rnn import reference

ops = torch.ops.varlen_rnn
BF16 = torch.bfloat16


# The two units (csrc/cpu/bf16_gemm.h bf16_unit): the matrix unit, and AVX512-BF16's dot
# products of pairs in a kernel of our own (which every CPU with the matrix unit runs too).
UNITS = {"amx": "bfloat16 matrix unit (AMX) with oneDNN enabled", "avx512": "AVX512-BF16"}


def _available(unit) -> bool:
    old = os.environ.get("VARLEN_RNN_CPU_BF16")
    os.environ["VARLEN_RNN_CPU_BF16"] = unit
    try:
        ops._bf16_gemm(torch.ones(1, 2, dtype=BF16), torch.ones(2, 1), None, None, False)
    except RuntimeError as e:
        assert f"VARLEN_RNN_CPU_BF16={unit}: this CPU or build has no" in str(e)
        return False
    finally:
        if old is None:
            del os.environ["VARLEN_RNN_CPU_BF16"]
        else:
            os.environ["VARLEN_RNN_CPU_BF16"] = old
    return True


@pytest.fixture(autouse=True, params=list(UNITS))
def unit(request, monkeypatch):
    """Every test on each unit this CPU has (VARLEN_RNN_CPU_BF16 set to it)."""
    if not _available(request.param):
        pytest.skip(f"this CPU has no {UNITS[request.param]}")
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", request.param)
    return request.param


def bound(a, b, K):
    """float32 accumulation of K bfloat16 products: K ulps of |a| @ |b|, plus a floor."""
    return (a.double().abs() @ b.double().abs()) * (K + 2) * 2.0**-24 + 1e-30


# Row counts around AMX's 16-row tiles and the parallel product's 256-row blocks, column counts
# around the 64-column strips, K even from 0 to 512.
SHAPES = [(1, 1, 2), (3, 5, 16), (16, 64, 256), (17, 65, 34), (64, 100, 256), (7, 130, 512)]
SHAPES += [(300, 200, 128), (600, 65, 64), (5, 3, 0), (0, 9, 8), (257, 128, 2)]


# b's source: float32 (rounded by the packing, k-major), bfloat16 as a row-major [K, N] (the
# backward's W_hh as stored: its rows interleaved in pairs) and bfloat16 as a weight's transpose
# (the forward's panels).
B_KINDS = ["float32", "bfloat16_rows", "bfloat16_transposed"]


@pytest.mark.parametrize("b_kind", B_KINDS)
@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "parallel"])
@pytest.mark.parametrize("m,N,K", SHAPES, ids=[f"m{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_product_matches_an_exact_one(m, N, K, parallel, b_kind):
    g = torch.Generator().manual_seed(m * 1000 + N * 10 + K)
    a, b = torch.randn(m, K, generator=g).to(BF16), torch.randn(K, N, generator=g)
    if b_kind == "bfloat16_rows":
        b = b.to(BF16)
    elif b_kind == "bfloat16_transposed":
        b = b.t().contiguous().to(BF16).t()
    full = ops._bf16_gemm(a, b, None, None, parallel)
    b16 = b.to(BF16)
    exact = a.double() @ b16.double()
    assert ((full[:m, :N].double() - exact).abs() <= bound(a, b16, K)).all()
    assert full[m:].isnan().all() and full[:, N:].isnan().all()  # nothing written past [m, N]


@pytest.mark.parametrize("m,N,K", [(1, 5, 4), (11, 70, 64), (40, 130, 256)])
def test_accumulate_and_bias(m, N, K):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(m, K, generator=g).to(BF16), torch.randn(K, N, generator=g)
    c, bias = torch.randn(m, N, generator=g), torch.randn(N, generator=g)
    exact = a.double() @ b.to(BF16).double()
    tol = bound(a, b.to(BF16), K) + 2.0**-22 * (c.abs() + bias.abs()).double()
    got = ops._bf16_gemm(a, b, c, None, False)[:m, :N]
    assert ((got.double() - exact - c.double()).abs() <= tol).all()
    got = ops._bf16_gemm(a, b, None, bias, True)[:m, :N]
    assert ((got.double() - exact - bias.double()).abs() <= tol).all()


# (m, N, K per term): one term and two (a bidirectional layer's dx), rows around the 256-row
# blocks, columns around the 64-column strips, K = D*G not a multiple of 32, and an empty sum.
SUM_SHAPES = [
    (1, 3, [2]),
    (300, 70, [54, 54]),
    (257, 65, [400, 400]),
    (40, 129, [516]),
    (17, 64, [0, 6]),
    (5, 8, [0]),
]


@pytest.mark.parametrize(
    "m,N,Ks", SUM_SHAPES, ids=[f"m{m}-N{n}-K{'+'.join(map(str, k))}" for m, n, k in SUM_SHAPES]
)
def test_sum_of_products_rounded_once(m, N, Ks):
    """_bf16_gemm_sum_rounded (a bfloat16 layer's dx over its directions): the terms' float32
    sums rounded to bfloat16 once, so within half a bfloat16 ulp of the float32 sum, itself
    within bound of the exact one; each a read in place from a wider buffer whose values past
    K are NaN (oneDNN's matmul read those: csrc/cpu/backward_bf16.h), which no result shows;
    nothing written past [m, N]."""
    g = torch.Generator().manual_seed(m + N)
    a, b = [], []
    for K in Ks:
        wide = torch.full((m, K + 40), float("nan"), dtype=BF16)
        wide[:, :K] = torch.randn(m, K, generator=g).to(BF16)
        a.append(wide[:, :K])
        b.append(torch.randn(K, N, generator=g).to(BF16))
    full = ops._bf16_gemm_sum_rounded(a, b)
    assert full.dtype == BF16
    got = full[:m, :N].double()
    exact = sum(x.double() @ w.double() for x, w in zip(a, b))
    tol = sum(bound(x, w, K) for x, w, K in zip(a, b, Ks)) + 2.0**-8 * exact.abs()
    assert ((got - exact).abs() <= tol).all()
    assert full[m:].isnan().all() and full[:, N:].isnan().all()  # nothing written past [m, N]


def test_strided_operands():
    """a's rows with a stride past K (a slice of a wider buffer); b a transposed weight."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10, 70, generator=g).to(BF16)[:, 4:54]  # [10, 50], lda 70
    w = torch.randn(37, 50, generator=g)  # [N, K]
    got = ops._bf16_gemm(a, w.t(), None, None, False)[:10, :37]
    exact = a.double() @ w.t().to(BF16).double()
    assert ((got.double() - exact).abs() <= bound(a, w.t().to(BF16), 50)).all()


# Units [u0, u1) of every gate of W [G*H, K]: the split step loops' slices (cut at multiples of
# 16), a last slice's ragged width, one gate, a slice whose columns cross a 64-column strip.
GATE_SLICES = [(3, 40, 34, 16, 40), (4, 64, 50, 0, 16), (1, 20, 8, 3, 20), (3, 100, 64, 48, 96)]


@pytest.mark.parametrize("source", ["float32", "bfloat16"])
@pytest.mark.parametrize("G,H,K,u0,u1", GATE_SLICES, ids=slice_ids(GATE_SLICES))
def test_gate_slices_read_where_the_weight_is(G, H, K, u0, u1, source):
    """The split loops pack units [u0, u1) of every gate of W_ih/W_hh [G*H, K] in place (b given
    as [G, K, Hs], its groups H*K apart): the same bits as the product on those rows copied out
    (the packing before), and within bfloat16 accumulation of an exact product."""
    g = torch.Generator().manual_seed(G * 100 + H + K)
    w = torch.randn(G * H, K, generator=g).to(torch.float32 if source == "float32" else BF16)
    a = torch.randn(21, K, generator=g).to(BF16)
    N = G * (u1 - u0)
    in_place, copied = gate_slices(w, G, H, K, u0, u1)
    got = ops._bf16_gemm(a, in_place, None, None, False)
    want = ops._bf16_gemm(a, copied, None, None, False)
    assert torch.equal(got[:21, :N], want[:21, :N])
    exact = a.double() @ copied.to(BF16).double()
    assert ((got[:21, :N].double() - exact).abs() <= bound(a, copied.to(BF16), K)).all()
    assert got[21:].isnan().all() and got[:, N:].isnan().all()
    # Groups of row-major [K, Hs] panels (b's rows read along k).
    panels = torch.randn(G, K, u1 - u0, generator=g).to(w.dtype)
    got = ops._bf16_gemm(a, panels, None, None, False)
    want = ops._bf16_gemm(a, torch.cat(list(panels), dim=1), None, None, False)
    assert torch.equal(got[:21, :N], want[:21, :N])


# The product on a weight as stored (bf16_weight_product): rows of a around the dot products'
# limits (kDotRows = 3 on the matrix unit, kDotRowsAvx512 = 12) and the swapped product's
# 64-position strips, weight rows around its 64-row blocks and 16-row (AMX) or 6-row (AVX512-BF16)
# tiles, K even from 0 to 512 (past the AVX512-BF16 kernel's 96-pair blocks).
WEIGHT_SHAPES = [(1, 8, 2), (3, 17, 10), (4, 64, 256), (5, 65, 34), (16, 100, 64), (63, 129, 128)]
WEIGHT_SHAPES += [(12, 13, 200), (13, 31, 194)]
WEIGHT_SHAPES += [(64, 768, 256), (65, 7, 16), (130, 200, 512), (3, 5, 0), (70, 5, 0), (0, 9, 8)]


@pytest.mark.parametrize("method", [0, 1, 2], ids=["auto", "dots", "swapped"])
@pytest.mark.parametrize(
    "m,J,K", WEIGHT_SHAPES, ids=[f"m{m}-J{j}-K{k}" for m, j, k in WEIGHT_SHAPES]
)
def test_product_on_a_stored_weight_matches_an_exact_one(m, J, K, method):
    g = torch.Generator().manual_seed(m * 1000 + J * 10 + K)
    a, w = torch.randn(m, K, generator=g).to(BF16), torch.randn(J, K, generator=g).to(BF16)
    full = ops._bf16_weight_product(a, w, method)
    exact = a.double() @ w.double().t()
    assert ((full[:m, :J].double() - exact).abs() <= bound(a, w.t(), K)).all()
    assert full[m:].isnan().all() and full[:, J:].isnan().all()  # nothing written past [m, J]


@pytest.mark.parametrize("method", [1, 2], ids=["dots", "swapped"])
def test_product_on_a_stored_weight_reads_strided_rows(method):
    """a's rows with a stride past K (a slice of a wider buffer, as the step loop's h)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(70, 90, generator=g).to(BF16)[:, 6:70]  # [70, 64], lda 90
    w = torch.randn(97, 64, generator=g).to(BF16)
    for rows in (2, 70):
        got = ops._bf16_weight_product(a[:rows], w, method)[:rows, :97]
        exact = a[:rows].double() @ w.double().t()
        assert ((got.double() - exact).abs() <= bound(a[:rows], w.t(), 64)).all()


# A weight's gradient over few positions (bf16_weight_grad, n <= kGradRows = 16): n odd and even
# (pairs of rows, a zero row past n), rows of c around the 4-row tiles, columns around the
# 16-column vectors and 64-column tiles.
GRAD_SHAPES = [(1, 1, 1), (2, 5, 15), (3, 4, 16), (7, 17, 17), (16, 768, 256), (15, 13, 130)]
GRAD_SHAPES += [(4, 3, 65), (9, 64, 63), (1, 1536, 512), (0, 5, 7)]


@pytest.mark.parametrize("n,G,P", GRAD_SHAPES, ids=[f"n{n}-G{g}-P{p}" for n, g, p in GRAD_SHAPES])
def test_weight_grad_matches_an_exact_one(n, G, P):
    """a^T b rounded once to bfloat16: within half a bfloat16 ulp (2^-8 relative) of the float32 sum, which is
    within float32 accumulation of the exact one; a's rows strided as the backward's rounded
    buffers are (a slice of wider rows); nothing written past [G, P]."""
    g = torch.Generator().manual_seed(n * 1000 + G + P)
    a = torch.randn(n, G + 7, generator=g).to(BF16)[:, 3 : 3 + G]  # lda G + 7
    b = torch.randn(n, P, generator=g).to(BF16)
    full = ops._weight_grad(a, b)
    exact = a.double().t() @ b.double()
    tol = 2.0**-8 * exact.abs() + bound(a.t(), b, n) * (1 + 2.0**-8)
    assert ((full[:G, :P].double() - exact).abs() <= tol).all()
    assert full[G:].isnan().all() and full[:, P:].isnan().all()


def test_bad_arguments_name_themselves():
    with pytest.raises(RuntimeError, match="K must be even"):
        ops._bf16_gemm(torch.ones(2, 3, dtype=BF16), torch.ones(3, 4), None, None, False)
    with pytest.raises(RuntimeError, match="a must be a 2-D bfloat16"):
        ops._bf16_gemm(torch.ones(2, 4), torch.ones(4, 4), None, None, False)
    with pytest.raises(RuntimeError, match="b must be a float32 or bfloat16 \\[K, N\\]"):
        ops._bf16_gemm(torch.ones(2, 4, dtype=BF16), torch.ones(6, 4), None, None, False)
    with pytest.raises(RuntimeError, match="w must be a bfloat16 \\[J, K\\]"):
        ops._bf16_weight_product(torch.ones(2, 4, dtype=BF16), torch.ones(3, 4), 0)
    with pytest.raises(RuntimeError, match="method must be 0"):
        ops._bf16_weight_product(torch.ones(2, 4, dtype=BF16), torch.ones(3, 4, dtype=BF16), 3)
    with pytest.raises(
        RuntimeError, match="b must be a BFloat16 \\[n, P\\] with n = a.size\\(0\\)"
    ):
        ops._weight_grad(torch.ones(2, 4, dtype=BF16), torch.ones(3, 4, dtype=BF16))
    with pytest.raises(RuntimeError, match="takes at most 16 bfloat16 rows"):
        ops._weight_grad(torch.ones(17, 4, dtype=BF16), torch.ones(17, 4, dtype=BF16))


# -- whole modules ---------------------------------------------------------------------------

# (class, constructor extras, reference)
CELLS = {
    "gru": (varlen_rnn.GRU, {}, reference.gru_reference),
    "lstm": (varlen_rnn.LSTM, {}, reference.lstm_reference),
    "lstm_proj": (varlen_rnn.LSTM, {"proj_size": 6}, reference.lstm_reference),
    "rnn_tanh": (varlen_rnn.RNN, {}, reference.rnn_reference),
    "rnn_relu": (varlen_rnn.RNN, {"nonlinearity": "relu"}, reference.rnn_reference),
}
I, H, T = 12, 40, 9
LENGTHS = [9, 0, 3, 7, 1, 9, 5, 2, 8, 4, 6, 9]  # unsorted, ties, a zero length
# Few steps for 5 rows (csrc/cpu/team.h few_steps): the per-step GEMM loop then takes its
# products on the weights as stored instead of packing them (see BATCH_STEP).
FEW = [4, 0, 2, 3, 1]
# A call of few steps takes its products on the bfloat16 weights as stored (cpu/bf16_gemm.h
# bf16_weight_product): dot products for at most kDotRows (3; 12 on AVX512-BF16) rows, the unit
# with the operands' roles swapped for more (FEW's steps take both on the matrix unit). One
# decoding step: of 8 rows; of 70 rows (the swapped product on either unit), past one
# 64-position strip, its 3H and 4H gate rows past one 64-row block.
ONE_STEP = [1] * 8
BATCH_STEP = [1] * 70


def model(cell, batch_first=False, seed=0):
    cls, extra, _ = CELLS[cell]
    torch.manual_seed(seed)
    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first, **extra)
    return cls(I, H, **kw).to(BF16)


def run_ref(cell, m, x, lengths, mirror, monkeypatch):
    """The float64 reference on m's (bfloat16) weights and x (x may require grad); mirror: with
    every product's left operand rounded to bfloat16 (the state, and a layer's input: a no-op on
    bfloat16 values), except the LSTM projection's ([P, H] weight), which the kernel computes in
    float32. The rounding is autograd's .to(bfloat16), whose backward rounds the gradient that
    reaches the rounded operand to bfloat16 too (run_backward_mirror's does not)."""
    if mirror:
        projection = (m.proj_size, m.hidden_size)

        def linear(inp, w, b=None):
            if m.proj_size == 0 or tuple(w.shape) != projection:
                inp = inp.to(BF16).to(inp.dtype)
            return F.linear(inp, w, b)

        monkeypatch.setattr(reference, "F", types.SimpleNamespace(linear=linear))
    m64 = copy.deepcopy(m).double()
    out = CELLS[cell][2](m64, x if x.dtype == torch.float64 else x.double(), None, lengths)
    monkeypatch.setattr(reference, "F", F)
    return out, m64


def flat(out):
    o, s = out
    return [o, *(s if isinstance(s, tuple) else (s,))]


# The per-step GEMM loop always projects before it (VARLEN_RNN_CPU_PROJECTION is the split
# loop's choice), so it has one case, not two.
LOOPS = [("split", "chunked"), ("split", "whole"), ("gemm", "whole")]


@pytest.mark.parametrize("steps,projection", LOOPS, ids=[f"{s}-{p}" for s, p in LOOPS])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize(
    "lengths", [LENGTHS, FEW, ONE_STEP, BATCH_STEP], ids=["many", "few", "one_step", "batch_step"]
)
def test_padded_forward_matches_the_mirror(cell, steps, projection, lengths, monkeypatch, unit):
    """Every step loop and input projection (the split loop's chunks or one product before it:
    with few steps, on W_ih as stored) on the weights as they are."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", projection)
    m = model(cell)
    lengths = torch.tensor(lengths)
    x = torch.randn(T, len(lengths), I).to(BF16)
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    with torch.no_grad():
        bf16 = flat(m(x, lengths=lengths))
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "float")
    with torch.no_grad():
        plain = flat(m(x, lengths=lengths))
    mirror = flat(run_ref(cell, m, x, lengths, True, monkeypatch)[0])
    truth = flat(run_ref(cell, m, x, lengths, False, monkeypatch)[0])
    for got, want in zip(bf16, mirror):
        assert got.dtype == BF16
        # One bfloat16 rounding of the result (2^-8 relative), plus the rare state that float32
        # and float64 round to neighbouring bfloat16 values (seen: 4 of 8640 outputs off by
        # 1.3e-4; the unmirrored reference is up to 3.5e-3 away).
        torch.testing.assert_close(got.double(), want, rtol=2.0**-8, atol=5e-4)
    for got, want in zip(bf16 + plain, truth + truth):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    # The bfloat16 run is not the float32 one: its h was rounded for each product (not
    # in one step from h0 = 0, where the products' operands are the same).
    if lengths.max() > 1:
        assert any(not torch.equal(a, p) for a, p in zip(bf16, plain))


@pytest.mark.parametrize("cell", list(CELLS))
def test_training_gradients(cell, monkeypatch, unit):
    """The products in bfloat16, forward and backward: every gradient agrees with the float64
    mirror's (whose rounded state decides the same ReLU branches) to bfloat16 precision. This
    mirror leaves the backward's roundings out; test_backward_matches_its_mirror has them."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    m = model(cell, batch_first=True)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(len(LENGTHS), T, I).to(BF16).requires_grad_()
    w_out = torch.randn(len(LENGTHS), T, m.num_directions * (m.proj_size or H))
    out = m(x, lengths=lengths)[0]
    (out.float() * w_out).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (ref, _), m64 = run_ref(cell, m, x64, lengths, True, monkeypatch)
    (ref * w_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2)
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().item() + 1e-3
        err = (p.grad.double() - p64.grad).abs().max().item()
        assert err <= 5e-2 * scale, f"{name}: {err} vs scale {scale}"


@pytest.mark.parametrize("kind", ["packed", "nested"])
def test_ragged_input(kind, monkeypatch, unit):
    """PackedSequence and nested-tensor input take the same products as padded input."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    m = model("gru")
    lengths = [n for n in LENGTHS if n > 0]
    seqs = [torch.randn(n, I).to(BF16) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(seqs)  # [T, B, I]
    with torch.no_grad():
        want, h_want = m(padded, lengths=torch.tensor(lengths))
        if kind == "packed":
            packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
            out, h = m(packed)
            got = torch.nn.utils.rnn.pad_packed_sequence(out)[0]
        else:
            nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
            out, h = m(nt)
            got = torch.nn.utils.rnn.pad_sequence(out.unbind())
    torch.testing.assert_close(got, want, rtol=2.0**-8, atol=1e-5)
    torch.testing.assert_close(h, h_want, rtol=2.0**-8, atol=1e-5)


def test_deterministic_and_odd_sizes(monkeypatch, unit):
    """Repeated calls give the same bits; an odd inner size (I = 13) keeps the layer in float32
    throughout (both units multiply pairs), equal to the =float run."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    m = model("lstm")
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(T, len(LENGTHS), I).to(BF16)
    with torch.no_grad():
        a, b = flat(m(x, lengths=lengths)), flat(m(x, lengths=lengths))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    odd = varlen_rnn.GRU(13, H).to(BF16)
    x13 = torch.randn(T, len(LENGTHS), 13).to(BF16)
    with torch.no_grad():
        got = odd(x13, lengths=lengths)[0]
        monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "float")
        assert torch.equal(got, odd(x13, lengths=lengths)[0])


def test_bad_setting_names_itself(monkeypatch):
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "fast")
    m = varlen_rnn.GRU(4, 8).to(BF16)
    with pytest.raises(
        RuntimeError, match="VARLEN_RNN_CPU_BF16 must be auto, amx, avx512 or float"
    ):
        m(torch.ones(3, 2, 4, dtype=BF16), lengths=torch.tensor([3, 2]))


# -- the backward's products in bfloat16 -----------------------------------------------------
# A bfloat16 layer's backward rounds dG (the gate gradients) to bfloat16 where it is a product's
# operand: the per-step dh_prev (+)= dG W_hh, and dW_ih = dgx^T x, dW_hh = dG^T h_prev,
# dx = dgx W_ih (float32 accumulation; the bias gradients sum the float32 dG). And it reads the
# values the forward saved as the workspace keeps them: bfloat16 (csrc/cpu/rows.h Workspace).
# The mirror below rounds the same operands in float64, reads each cell's saved values rounded
# in its backward, and reads h_prev as the kernel's backward does: from the bfloat16 output
# (the GRU's dz = dh (h_prev - n) z (1 - z)).


def _r(t, rounded=True):
    """t rounded to bfloat16 (kept in its dtype), or t itself."""
    return t.to(BF16).to(t.dtype) if rounded else t


class _MirrorLinear(torch.autograd.Function):
    """F.linear(x, w, b) with x rounded to bfloat16 (when round_x), whose backward rounds the
    output's gradient g to bfloat16 for the two products (dx = g w, dw = g^T x) but not for the
    bias's sum (when round_g). Gradients pass the rounding of x unchanged. x_w: what dw reads
    in place of x (the LSTM projection's h', which the kernel recomputes from its saved
    values), or None."""

    @staticmethod
    def forward(ctx, x, w, b, round_x, round_g, x_w=None):
        x = _r(x, round_x)
        ctx.save_for_backward(x if x_w is None else x_w, w)
        ctx.round_g, ctx.has_b = round_g, b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g16 = _r(g, ctx.round_g)
        gw = g16.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_b else None
        return g16 @ w, gw, gb, None, None, None


# Each cell's step (csrc/cells/) in float64, whose backward reads the saved values rounded to
# bfloat16 when `rounded` (and, the GRU, h_prev). Their backward formulas are checked against
# autograd's with rounded=False (test_mirror_cells_match_autograd).
class _MirrorGru(torch.autograd.Function):
    """h' from gx = W_ih x + b_ih and gh = W_hh h + b_hh ([B, 3H] each) and h [B, H]."""

    @staticmethod
    def forward(ctx, gx, gh, h, rounded):
        H = h.shape[1]
        r = torch.sigmoid(gx[:, :H] + gh[:, :H])
        z = torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
        n = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
        ctx.save_for_backward(*(_r(v, rounded) for v in (r, z, n, gh[:, 2 * H :], h)))
        return n + z * (h - n)

    @staticmethod
    def backward(ctx, dh):
        r, z, n, ghn, h = ctx.saved_tensors
        dn = dh * (1 - z) * (1 - n * n)
        dz = dh * (h - n) * z * (1 - z)
        dr = dn * ghn * r * (1 - r)
        return torch.cat([dr, dz, dn], 1), torch.cat([dr, dz, dn * r], 1), dh * z, None


class _MirrorLstm(torch.autograd.Function):
    """(h', c') from the gates' pre-activations a = gx + gh [B, 4H] and c [B, H]."""

    @staticmethod
    def forward(ctx, a, c, rounded):
        i, f, g, o = a.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c2 = f * c + i * g
        ctx.save_for_backward(*(_r(v, rounded) for v in (i, f, g, o, c)))
        return o * torch.tanh(c2), c2

    @staticmethod
    def backward(ctx, dh, dc2):
        i, f, g, o, c = ctx.saved_tensors
        tc = torch.tanh(f * c + i * g)  # tanh(c') from the saved values, as the kernel
        dc = dc2 + dh * o * (1 - tc * tc)
        da = [dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g)]
        da.append(dh * tc * o * (1 - o))
        return torch.cat(da, 1), dc * f, None


class _MirrorRnn(torch.autograd.Function):
    """h' = act(a) from a = gx + gh [B, H]."""

    @staticmethod
    def forward(ctx, a, relu, rounded):
        h = torch.relu(a) if relu else torch.tanh(a)
        ctx.relu = relu
        ctx.save_for_backward(_r(h, rounded))
        return h

    @staticmethod
    def backward(ctx, dh):
        (h,) = ctx.saved_tensors
        return (torch.where(h > 0, dh, 0) if ctx.relu else dh * (1 - h * h)), None, None


def _mirror_steps(rounded=True):
    """reference's step builders for the three cells, on the mirror cells (the products are
    reference.F.linear's: the mirror's when patched)."""

    def gru_step(w_hh, b_hh):
        def step(d, gx, state):
            gh = reference.F.linear(state[0], w_hh[d], None if b_hh is None else b_hh[d])
            return (_MirrorGru.apply(gx, gh, state[0], rounded),)

        return step

    def lstm_step(w_hh, b_hh, w_hr):
        def step(d, gx, state):
            h, c = state
            a = gx + reference.F.linear(h, w_hh[d], None if b_hh is None else b_hh[d])
            h, c = _MirrorLstm.apply(a, c, rounded)
            if w_hr is None:
                return h, c
            # dW_hr reads h' recomputed from the saved values (float32 products: no rounding)
            with torch.no_grad():
                i, f, g, o = a.chunk(4, 1)
                i, f, o = (_r(torch.sigmoid(v), rounded) for v in (i, f, o))
                g = _r(torch.tanh(g), rounded)
                h_w = o * torch.tanh(f * _r(state[1], rounded) + i * g)
            return _MirrorLinear.apply(h, w_hr[d], None, False, False, h_w), c

        return step

    def rnn_step(w_hh, b_hh, nonlinearity):
        def step(d, gx, state):
            a = gx + reference.F.linear(state[0], w_hh[d], None if b_hh is None else b_hh[d])
            return (_MirrorRnn.apply(a, nonlinearity == "relu", rounded),)

        return step

    return {"_gru_step": gru_step, "_lstm_step": lstm_step, "_rnn_step": rnn_step}


def test_mirror_cells_match_autograd():
    """The mirror cells without rounding are the plain reference: the same outputs and, by
    gradcheck against finite differences, the same gradients (their backward formulas hold)."""
    torch.manual_seed(0)
    B, Hm = 3, 4

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    gx, gh, a = leaf(B, 3 * Hm), leaf(B, 3 * Hm), leaf(B, 4 * Hm)  # GRU's gx, gh; LSTM's gates
    h, c, a1 = leaf(B, Hm), leaf(B, Hm), leaf(B, Hm)  # states; the RNN's pre-activation
    assert torch.autograd.gradcheck(lambda *t: _MirrorGru.apply(*t, False), (gx, gh, h))
    assert torch.autograd.gradcheck(lambda *t: _MirrorLstm.apply(*t, False), (a, c))
    for relu in (False, True):
        assert torch.autograd.gradcheck(lambda t, r=relu: _MirrorRnn.apply(t, r, False), (a1,))
    w_hh = torch.randn(1, 3 * Hm, Hm, dtype=torch.float64)
    want = reference._gru_step(w_hh, None)(0, gx, (h,))[0]
    torch.testing.assert_close(_mirror_steps(False)["_gru_step"](w_hh, None)(0, gx, (h,))[0], want)
    w_hh, w_hr = torch.randn(1, 4 * Hm, 2, dtype=torch.float64), torch.randn(1, 2, Hm).double()
    want = reference._lstm_step(w_hh, None, w_hr)(0, a, (h[:, :2], c))
    got = _mirror_steps(False)["_lstm_step"](w_hh, None, w_hr)(0, a, (h[:, :2], c))
    torch.testing.assert_close(got, want)
    w_hh = torch.randn(1, Hm, Hm, dtype=torch.float64)
    for act in ("tanh", "relu"):
        want = reference._rnn_step(w_hh, None, act)(0, a1, (h,))
        torch.testing.assert_close(
            _mirror_steps(False)["_rnn_step"](w_hh, None, act)(0, a1, (h,)), want
        )


def run_backward_mirror(cell, m, x, lengths, backward, monkeypatch):
    """The float64 reference on m's weights: forward products' left operands rounded to
    bfloat16 (not the LSTM projection's, which the kernel runs in float32), and with backward
    also the products' gradient operands, the cells' saved values and the GRU's h_prev in dz.
    Returns (out, m64)."""
    projection = (m.proj_size, m.hidden_size)

    def linear(inp, w, b=None):
        fp32 = m.proj_size > 0 and tuple(w.shape) == projection
        return _MirrorLinear.apply(inp, w, b, not fp32, backward and not fp32)

    with monkeypatch.context() as patch:
        patch.setattr(reference, "F", types.SimpleNamespace(linear=linear))
        if backward:
            for name, step in _mirror_steps().items():
                patch.setattr(reference, name, step)
        m64 = copy.deepcopy(m).double()
        out = CELLS[cell][2](m64, x, None, lengths)
    return out, m64


# (VARLEN_RNN_CPU_STEPS, VARLEN_RNN_CPU_DIRECTIONS): the split loops with the directions in turn
# and at once, and the per-step GEMM loop (directions in turn).
LOOPS = [("split", "serial"), ("split", "concurrent"), ("gemm", "serial")]
LAYOUTS = ["padded", "batch_first", "packed", "nested"]
RAGGED_LENGTHS = [9, 3, 7, 1, 9, 5, 2, 8, 4, 6, 9]  # packing takes no zero length


def train_once(cell, layout, seed=0, lengths=None):
    """One bidirectional one-layer bfloat16 module's gradients for a loss on every output and
    final state, with input in the given layout (lengths: LENGTHS or RAGGED_LENGTHS unless
    given). Returns (module, x [B, T, I] padded, lengths, loss weights, [x.grad, *parameter
    grads]). The loss weights are bfloat16 values, so the gradients reaching the kernel are
    exact."""
    cls, extra, _ = CELLS[cell]
    # P = 18: the split loop's second thread owns dh columns [16, 18) (slices are cut at 16).
    extra = {"proj_size": 18} if extra.get("proj_size") else extra
    torch.manual_seed(seed)
    m = cls(I, H, bidirectional=True, batch_first=layout != "padded", **extra).to(BF16)
    if lengths is None:
        lengths = LENGTHS if layout in ("padded", "batch_first") else RAGGED_LENGTHS
    lengths = torch.tensor(lengths)
    B, P = len(lengths), m.proj_size or H
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, I, generator=g).to(BF16).requires_grad_()  # [B, T, I]
    w_out = torch.randn(B, T, 2 * P, generator=g).to(BF16).float()
    w_states = [torch.randn(2, B, n, generator=g).to(BF16).float() for n in (P, H)]
    if layout == "padded":
        out, states = m(x.transpose(0, 1), lengths=lengths)
        out = out.transpose(0, 1)
    elif layout == "batch_first":
        out, states = m(x, lengths=lengths)
    elif layout == "packed":
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, True, enforce_sorted=False)
        out, states = m(packed)
        out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
    else:
        nt = torch.nested.as_nested_tensor(
            [x[i, :n] for i, n in enumerate(lengths.tolist())], layout=torch.jagged
        )
        out, states = m(nt)
        out = torch.nn.utils.rnn.pad_sequence(list(out.unbind()), batch_first=True)
        out = F.pad(out, (0, 0, 0, T - out.shape[1]))
    states = states if isinstance(states, tuple) else (states,)
    loss = (out.float() * w_out).sum()
    loss = loss + sum((s.float() * w).sum() for s, w in zip(states, w_states))
    loss.backward()
    return m, x, lengths, (w_out, w_states), [x.grad] + [p.grad for p in m.parameters()]


def mirror_grads(cell, m, x, lengths, weights, backward, monkeypatch):
    """The mirror's [x.grad, *parameter grads] for train_once's loss (x: [B, T, I])."""
    x64 = x.detach().double().requires_grad_()
    inp = x64 if m.batch_first else x64.transpose(0, 1)
    (out, states), m64 = run_backward_mirror(cell, m, inp, lengths, backward, monkeypatch)
    out = out if m.batch_first else out.transpose(0, 1)
    states = states if isinstance(states, tuple) else (states,)
    w_out, w_states = weights
    loss = (out * w_out.double()).sum()
    loss = loss + sum((s * w.double()).sum() for s, w in zip(states, w_states))
    loss.backward()
    return [x64.grad] + [p.grad for p in m64.parameters()]


def mirror_excess(got, want):
    """The largest amount by which any gradient misses the tolerance, relative to its scale:
    one bfloat16 rounding of the result (rtol 2^-8, twice the half ulp each gradient gets when
    returned in bfloat16) plus 2e-4 of the gradient's largest magnitude. The absolute part is
    for the rare dG, state or saved value that float32 and float64 round to neighbouring
    bfloat16 values: a saved r or z one ulp apart moves a weight gradient's element by about
    2^-8 of one position's term (seen, without the absolute part: up to 1.44e-4 of the scale,
    the GRU on the matrix unit with ragged input; 3.2e-5 on AVX512-BF16; 0 for the LSTM and
    RNN). Without the absolute part the float32 backward misses it by more than 1.3e-3 of the
    scale, and so does this run against the mirror without the backward's roundings."""
    worst = -1.0
    for a, b in zip(got, want):
        scale = b.abs().max().item() + 1e-6
        miss = (a.double() - b).abs() - 2.0**-8 * b.abs() - 2e-4 * scale
        worst = max(worst, miss.nan_to_num(nan=float("inf")).max().item() / scale)
    return worst


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("steps,directions", LOOPS, ids=["split", "concurrent", "gemm"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_matches_its_mirror(cell, steps, directions, layout, monkeypatch, unit):
    """Every gradient of the bfloat16 run agrees with the float64 mirror of the forward's
    and the backward's roundings (mirror_excess says how closely, and why); the mirror without
    the backward's roundings is further off than that, and the =float run differs bitwise: the
    backward's bfloat16 path is the one taken."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    m, x, lengths, weights, bf16 = train_once(cell, layout)
    mirror = mirror_grads(cell, m, x, lengths, weights, True, monkeypatch)
    assert all(a.dtype == BF16 for a in bf16)
    assert mirror_excess(bf16, mirror) <= 0
    forward_only = mirror_grads(cell, m, x, lengths, weights, False, monkeypatch)
    assert mirror_excess(bf16, forward_only) > 5e-4
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "float")
    plain = train_once(cell, layout)[4]
    assert mirror_excess(plain, mirror) > 5e-4
    assert any(not torch.equal(a, p) for a, p in zip(bf16, plain))


@pytest.mark.parametrize("ones", [ONE_STEP, [1] * 40], ids=["8_positions", "40_positions"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_decoding_step_backward_matches_its_mirror(cell, ones, monkeypatch, unit):
    """A call of one step (a decoder's, at 8 and 40 rows): its weight gradients over at most
    kGradRows (16) positions are our own kernel's (bf16_weight_grad), over more ATen's GEMM;
    either agrees with the mirror as the longer calls do, and =float differs bitwise."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m, x, lengths, weights, bf16 = train_once(cell, "batch_first", lengths=ones)
    ours = sum(e.count for e in prof.key_averages() if e.key == "varlen_rnn::bf16_weight_grad")
    # dW_hh and dW_ih per direction, the GRU's dW_hh in two parts (its n gate's apart)
    assert ours == ((6 if cell == "gru" else 4) if len(ones) <= 16 else 0)
    mirror = mirror_grads(cell, m, x, lengths, weights, True, monkeypatch)
    assert all(a.dtype == BF16 for a in bf16)
    assert mirror_excess(bf16, mirror) <= 0
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "float")
    plain = train_once(cell, "batch_first", lengths=ones)[4]
    assert any(not torch.equal(a, p) for a, p in zip(bf16, plain))


@pytest.mark.parametrize("steps,directions", LOOPS, ids=["split", "concurrent", "gemm"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_repeats_bitwise(cell, steps, directions, monkeypatch, unit):
    """A second training step on the same input gives the same bits (every product's rows are
    summed by one thread in a fixed order), and the step loops agree with each other to the
    mirror's tolerance."""
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    monkeypatch.setenv("VARLEN_RNN_CPU_DIRECTIONS", directions)
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    first = train_once(cell, "batch_first")[4]
    second = train_once(cell, "batch_first")[4]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "gemm")
    gemm = train_once(cell, "batch_first")[4]
    assert mirror_excess(first, [g.double() for g in gemm]) <= 0


@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
def test_backward_odd_sizes_stay_float(cell, monkeypatch, unit):
    """An odd state width (H = 41, or P = 5 with a projection) keeps the whole layer, backward
    included, in float32: its gradients equal the =float run's bit for bit."""
    cls, extra, _ = CELLS[cell]
    extra = {"proj_size": 5} if extra else {}
    torch.manual_seed(0)
    m = cls(I, 41, bidirectional=True, **extra).to(BF16)
    x = torch.randn(T, len(LENGTHS), I).to(BF16)
    lengths = torch.tensor(LENGTHS)

    def grads(mode):
        monkeypatch.setenv("VARLEN_RNN_CPU_BF16", mode)
        m.zero_grad()
        xg = x.clone().requires_grad_()
        m(xg, lengths=lengths)[0].float().sum().backward()
        return [xg.grad] + [p.grad.clone() for p in m.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(grads(unit), grads("float")))


# (cell, H): G*H = 400, 54, 54 and 516 gate columns per direction, none a multiple of 32.
ODD_GATES = [("lstm", 100), ("gru", 18), ("rnn_tanh", 54), ("lstm_proj", 129)]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("graph", ["kept", "consumed"])
@pytest.mark.parametrize("cell,H", ODD_GATES, ids=[f"{c}-H{h}" for c, h in ODD_GATES])
def test_input_gradient_with_gate_columns_not_a_multiple_of_32(
    cell, H, graph, bidirectional, monkeypatch, unit
):
    """dx = dG W_ih over hundreds of positions. Handed dG's rows strided past their G*H values
    (bfloat16 rounded in place over the float32 dG), oneDNN's bfloat16 GEMM on a Xeon with AMX
    read past each row's end for such G*H, and rows of dx came out NaN where the float32 bits
    there decoded to NaN or inf. Now (csrc/cpu/backward_bf16.h) one direction's dx is ATen's
    product on rows it may read that far (dG's own buffer padded with zeros, a kept graph's; or
    the workspace, the last backward's, where the position's own saved values follow dG), two
    directions' our own, which reads no row past its end. Every gradient finite and within
    bfloat16 precision of =float's."""
    cls, extra, _ = CELLS[cell]
    torch.manual_seed(0)
    m = cls(16, H, bidirectional=bidirectional, **extra).to(BF16)
    lengths = torch.randint(1, 41, (24,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(40, 24, 16).to(BF16)

    def grads(mode):
        monkeypatch.setenv("VARLEN_RNN_CPU_BF16", mode)
        m.zero_grad()
        xg = x.clone().requires_grad_()
        out, states = m(xg, lengths=lengths)
        states = states if isinstance(states, tuple) else (states,)
        loss = out.float().sum() + sum(s.float().sum() for s in states)
        loss.backward(retain_graph=graph == "kept")
        return [xg.grad] + [p.grad.clone() for p in m.parameters()]

    got, plain = grads(unit), grads("float")
    assert int(lengths.sum()) >= 400
    for a, b in zip(got, plain):
        assert torch.isfinite(a).all()
        a, b = a.double(), b.double()
        assert ((a - b).abs() <= 2.0**-6 * b.abs() + 0.02 * b.abs().max()).all()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("graph", ["kept", "consumed"])
@pytest.mark.parametrize("cell,H", ODD_GATES, ids=[f"{c}-H{h}" for c, h in ODD_GATES])
def test_a_nan_gradient_stays_in_its_sequence(cell, H, graph, bidirectional, monkeypatch, unit):
    """A NaN in one sequence's output gradient makes that sequence's input gradient NaN, and
    no other's: the input gradient's NaN positions are =float's. (Handed the positions' dG as
    contiguous rows, oneDNN's AMX matmul let a row's NaN into its neighbour's dx, oneDNN issue
    5717: as above, it now reads only a row's own position's values or zeros, or our product
    runs.)"""
    cls, extra, _ = CELLS[cell]
    torch.manual_seed(0)
    m = cls(16, H, bidirectional=bidirectional, **extra).to(BF16)
    lengths = torch.randint(1, 41, (24,), generator=torch.Generator().manual_seed(1))
    lengths[5] = 40
    x = torch.randn(40, 24, 16).to(BF16)

    def input_grad(mode):
        monkeypatch.setenv("VARLEN_RNN_CPU_BF16", mode)
        xg = x.clone().requires_grad_()
        out = m(xg, lengths=lengths)[0]
        g = torch.ones_like(out)
        g[30, 5, 0] = float("nan")  # sequence 5 at step 30
        out.backward(g, retain_graph=graph == "kept")
        return xg.grad

    got, plain = input_grad(unit), input_grad("float")
    assert plain[:31, 5].isnan().all() and plain[31:, 5].isfinite().all()
    assert torch.equal(got.isnan(), plain.isnan())


@pytest.mark.parametrize("cell", list(CELLS))
def test_decoding_step_with_gate_rows_not_a_multiple_of_8(cell, monkeypatch, unit):
    """One decoding step (kDotRows positions or fewer) at H=6, I=10: the dot products take the
    weights' rows 8 at a time, and the last G*H % 8 rows one by one (K = 10 and 6: the masked
    tail of a 32-value chunk only)."""
    cls, extra, _ = CELLS[cell]
    extra = {"proj_size": 4} if "proj_size" in extra else extra
    torch.manual_seed(3)
    m = cls(10, 6, num_layers=2, **extra).to(BF16)
    lengths = torch.tensor([1, 1, 1])
    x = torch.randn(1, 3, 10).to(BF16)
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", unit)
    with torch.no_grad():
        got = flat(m(x, lengths=lengths))
    mirror = flat(run_ref(cell, m, x, lengths, True, monkeypatch)[0])
    for a, b in zip(got, mirror):
        torch.testing.assert_close(a.double(), b, rtol=2.0**-8, atol=5e-4)


def backward_buffers(outputs, inputs, grads, tmp_path, retain_graph=False):
    """The sizes in bytes of the buffers torch.autograd.grad(outputs, inputs, grads) allocates
    (torch.profiler's memory trace: the allocations made by aten::empty, so not the scratch a
    GEMM library allocates inside aten::mm)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(outputs, inputs, grads, retain_graph=retain_graph)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]

    def innermost(ts):
        around = [o for o in ops if o["ts"] <= ts <= o["ts"] + o["dur"]]
        return min(around, key=lambda o: o["dur"])["name"] if around else None

    allocations = [
        e
        for e in events
        if e.get("name") == "[memory]"
        and e["args"].get("Device Type", 0) == 0
        and e["args"]["Bytes"] > 0
    ]
    return [
        e["args"]["Bytes"]
        for e in allocations
        if innermost(e["ts"]) in ("aten::empty", "aten::empty_strided")
    ]


@pytest.mark.parametrize("graph", ["kept", "consumed"])
@pytest.mark.parametrize("steps", ["split", "gemm"])
@pytest.mark.parametrize("cell,gates", [("gru", 3), ("lstm", 4), ("rnn_tanh", 1)])
def test_the_backward_holds_no_float32_gate_gradients_over_positions(
    cell, gates, steps, graph, monkeypatch, tmp_path
):
    """A bfloat16 layer's backward keeps the gate gradients dG over the N valid positions as
    bfloat16 (csrc/cpu/backward_bf16.h), the float32 values only a row or a step at a time:
    none of the buffers it allocates comes near the bytes of a float32 dG over the positions of
    both directions ([N, 2*G*H], which it held until 4014367). A kept graph's backward
    (retain_graph) allocates the bfloat16 one (half that); the last backward writes it over the
    forward's workspace, so its largest buffer is under one direction's bfloat16 dG. Both step
    loops, both directions. (The RNN keeps no workspace: its dG is its own either way.)"""
    cls, extra, _ = CELLS[cell]
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    torch.manual_seed(0)
    H, B, T = 64, 16, 20
    m = cls(H, H, bidirectional=True, **extra).to(BF16)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(T, B, H).to(BF16).requires_grad_()
    out = m(x, lengths=lengths)[0]
    grad_out = torch.randn(out.shape).to(BF16)
    kept = graph == "kept"
    sizes = backward_buffers(out, [x, *m.parameters()], grad_out, tmp_path, retain_graph=kept)
    f32_dg = int(lengths.sum()) * 2 * gates * H * 4
    assert max(sizes) < 0.75 * f32_dg, sorted(sizes)[-5:]
    if kept or cell == "rnn_tanh":
        assert max(sizes) >= 0.45 * f32_dg, sorted(sizes)[-5:]
    else:
        assert max(sizes) < 0.25 * f32_dg, sorted(sizes)[-5:]

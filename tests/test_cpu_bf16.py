"""bfloat16 layers on the CPU's matrix units (csrc/cpu/bf16_gemm.h): the product itself through
the test op _bf16_gemm against an exact float64 one (row and column tails, accumulate, bias,
one thread and all), then whole bfloat16 modules of every cell and input kind, run with the
products in bfloat16 (VARLEN_RNN_CPU_BF16=amx) and in float32 throughout (=float), against
float64 references:
- the plain reference on the bfloat16 weights and input: both runs agree with it to bfloat16
  precision, forward and every gradient;
- a mirror of the bfloat16 products (the reference with each product's state operand rounded
  to bfloat16, as the kernel rounds h): the matrix-unit run agrees with it to one bfloat16
  rounding of the result, its own definition, whichever step loop runs. At these sizes the
  mirror tells the two runs apart for the RNN (the float32 run fails it); for the GRU and LSTM
  the rounding of h stays inside the tolerance, and the runs are told apart by their bits.
Skipped where the CPU has no bfloat16 matrix unit (no AMX, or torch.backends.mkldnn off)."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

import varlen_rnn
from varlen_rnn import reference

ops = torch.ops.varlen_rnn
BF16 = torch.bfloat16


def _available() -> bool:
    try:
        ops._bf16_gemm(torch.ones(1, 2, dtype=BF16), torch.ones(2, 1), None, None, False)
    except RuntimeError as e:
        assert "no bfloat16 matrix unit" in str(e)
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _available(), reason="this CPU has no bfloat16 matrix unit (AMX) with oneDNN enabled"
)


def bound(a, b, K):
    """float32 accumulation of K bfloat16 products: K ulps of |a| @ |b|, plus a floor."""
    return (a.double().abs() @ b.double().abs()) * (K + 2) * 2.0**-24 + 1e-30


# Row counts around AMX's 16-row tiles and the parallel product's 256-row blocks, column counts
# around the 64-column strips, K even from 0 to 512.
SHAPES = [(1, 1, 2), (3, 5, 16), (16, 64, 256), (17, 65, 34), (64, 100, 256), (7, 130, 512)]
SHAPES += [(300, 200, 128), (600, 65, 64), (5, 3, 0), (0, 9, 8), (257, 128, 2)]


@pytest.mark.parametrize("parallel", [False, True], ids=["one-thread", "parallel"])
@pytest.mark.parametrize("m,N,K", SHAPES, ids=[f"m{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_product_matches_an_exact_one(m, N, K, parallel):
    g = torch.Generator().manual_seed(m * 1000 + N * 10 + K)
    a, b = torch.randn(m, K, generator=g).to(BF16), torch.randn(K, N, generator=g)
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


def test_strided_operands():
    """a's rows with a stride past K (a slice of a wider buffer); b a transposed weight."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10, 70, generator=g).to(BF16)[:, 4:54]  # [10, 50], lda 70
    w = torch.randn(37, 50, generator=g)  # [N, K]
    got = ops._bf16_gemm(a, w.t(), None, None, False)[:10, :37]
    exact = a.double() @ w.t().to(BF16).double()
    assert ((got.double() - exact).abs() <= bound(a, w.t().to(BF16), 50)).all()


def test_bad_arguments_name_themselves():
    with pytest.raises(RuntimeError, match="K must be even"):
        ops._bf16_gemm(torch.ones(2, 3, dtype=BF16), torch.ones(3, 4), None, None, False)
    with pytest.raises(RuntimeError, match="a must be a 2-D bfloat16"):
        ops._bf16_gemm(torch.ones(2, 4), torch.ones(4, 4), None, None, False)
    with pytest.raises(RuntimeError, match="b must be a float32 \\[K, N\\]"):
        ops._bf16_gemm(torch.ones(2, 4, dtype=BF16), torch.ones(6, 4), None, None, False)


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


def model(cell, batch_first=False, seed=0):
    cls, extra, _ = CELLS[cell]
    torch.manual_seed(seed)
    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first, **extra)
    return cls(I, H, **kw).to(BF16)


def run_ref(cell, m, x, lengths, mirror, monkeypatch):
    """The float64 reference on m's (bfloat16) weights and x (x may require grad); mirror: with
    every product's left operand rounded to bfloat16 (the state, and a layer's input: a no-op on
    bfloat16 values), except the LSTM projection's ([P, H] weight), which the kernel computes in
    float32. The rounding passes gradients through unchanged."""
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


@pytest.mark.parametrize("steps", ["split", "gemm"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_padded_forward_matches_the_mirror(cell, steps, monkeypatch):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    m = model(cell)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(T, len(LENGTHS), I).to(BF16)
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "amx")
    with torch.no_grad():
        amx = flat(m(x, lengths=lengths))
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "float")
    with torch.no_grad():
        plain = flat(m(x, lengths=lengths))
    mirror = flat(run_ref(cell, m, x, lengths, True, monkeypatch)[0])
    truth = flat(run_ref(cell, m, x, lengths, False, monkeypatch)[0])
    for got, want in zip(amx, mirror):
        assert got.dtype == BF16
        # One bfloat16 rounding of the result (2^-8 relative), plus the rare state that float32
        # and float64 round to neighbouring bfloat16 values (seen: 4 of 8640 outputs off by
        # 1.3e-4; the unmirrored reference is up to 3.5e-3 away).
        torch.testing.assert_close(got.double(), want, rtol=2.0**-8, atol=5e-4)
    for got, want in zip(amx + plain, truth + truth):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    # The matrix-unit run is not the float32 one: its h was rounded for each product.
    assert any(not torch.equal(a, p) for a, p in zip(amx, plain))


@pytest.mark.parametrize("cell", list(CELLS))
def test_training_gradients(cell, monkeypatch):
    """The forward's products in bfloat16, the backward in float32: every gradient agrees with
    the float64 mirror's (whose rounded state decides the same ReLU branches) to bfloat16
    precision."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "amx")
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
def test_ragged_input(kind, monkeypatch):
    """PackedSequence and nested-tensor input take the same products as padded input."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "amx")
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


def test_deterministic_and_odd_sizes(monkeypatch):
    """Repeated calls give the same bits; an odd inner size (I = 13) keeps the layer in float32
    throughout (the matrix unit multiplies pairs), equal to the =float run."""
    monkeypatch.setenv("VARLEN_RNN_CPU_BF16", "amx")
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
    with pytest.raises(RuntimeError, match="VARLEN_RNN_CPU_BF16 must be auto, amx or float"):
        m(torch.ones(3, 2, 4, dtype=BF16), lengths=torch.tensor([3, 2]))

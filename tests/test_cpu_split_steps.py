"""The CPU forward's two step loops (csrc/cpu/recurrence.h), each chosen on purpose through
VARLEN_RNN_CPU_STEPS: "split" (hidden units split across a thread team, cpu/split_steps.h) and
"gemm" (one BLAS call and one gate pass per step). Both against the plain-PyTorch reference in
float64 to 1e-10 for every cell, padded and ragged, both directions; the backward reads the
workspace the split loop saved. float32: the two loops agree, and the split loop is
deterministic."""

import pytest
import torch
from cell_ops_testing import make_batch, make_layer
from test_cell_ops import check_against_reference

from varlen_rnn import reference

ops = torch.ops.varlen_rnn
TIGHT = dict(atol=1e-10, rtol=1e-10)
I = 6
# H = 40: three 16-unit blocks, so two threads get uneven slices (32 + 8 units); P = 19 splits
# the projection's columns unevenly too.
H, P = 40, 19
LENGTHS = [5, 1, 3, 7, 2, 7, 4]  # unsorted, ties, no zero length (the packed layout has none)
# Few steps, and enough that the GEMM loop copies W_hh^T instead of reading it as a view
# (cpu/team.h few_steps: under 24 steps at B <= 1, under 6 from B = 17).
SHORT, LONG = LENGTHS, [26, 3, 30, 11]


@pytest.fixture(params=["split", "gemm"])
def steps(request, monkeypatch):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", request.param)
    return request.param


def gru_layer(D, B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.6).to(dtype)

    return dict(
        hx=rnd(D, B, H),
        w_ih=rnd(D, 3 * H, I),
        w_hh=rnd(D, 3 * H, H),
        b_ih=rnd(D, 3 * H),
        b_hh=rnd(D, 3 * H),
    )


def gru_forward(w, batch, fn_padded, fn_ragged, *tail):
    args = (w["hx"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    if batch.padded:
        return fn_padded(batch.x, batch.lengths, *args, batch.batch_first, *tail)
    code = 0 if batch.layout == "offsets" else 1
    index = (batch.seq_index, batch.sorted_indices, code, batch.max_len)
    return fn_ragged(batch.x, *index, *args, *tail)


@pytest.mark.parametrize("lengths", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("layout", ["padded", "padded_bf", "offsets", "packed"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
def test_gru_steps_match_the_reference(steps, threads, D, layout, lengths):
    ws = check_gru_against_reference(gru_layer(D, len(lengths)), make_batch(layout, lengths, I))
    assert ws.numel() > 0


def check_gru_against_reference(w, batch):
    """The GRU op's output and h_n against the float64 reference to 1e-10; its workspace."""
    out, h_n, ws = gru_forward(w, batch, ops.gru_layer_forward, ops.gru_layer_ragged_forward, True)
    r_out, r_h = gru_forward(
        w, batch, reference.gru_layer_reference, reference.gru_layer_ragged_reference
    )
    torch.testing.assert_close(out, r_out, **TIGHT)
    torch.testing.assert_close(h_n, r_h, **TIGHT)
    return ws


@pytest.mark.parametrize("layout", ["padded", "offsets", "packed"])
@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("lengths", [SHORT, LONG], ids=["short", "long"])
def test_cell_steps_match_the_reference(steps, threads, cell, D, layout, lengths):
    """Forward and, through the saved workspace, every gradient of the backward op."""
    layer = make_layer(cell, D, len(lengths), I, H, P=P)
    check_against_reference(layer, make_batch(layout, lengths, I))


def run_gru_f32(monkeypatch, steps):
    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", steps)
    w = gru_layer(2, len(LENGTHS), dtype=torch.float32)
    batch = make_batch("padded", LENGTHS, I, dtype=torch.float32)
    return gru_forward(w, batch, ops.gru_layer_forward, ops.gru_layer_ragged_forward, False)


def test_float32_split_agrees_with_gemm_and_repeats_exactly(threads, monkeypatch):
    split_a = run_gru_f32(monkeypatch, "split")
    split_b = run_gru_f32(monkeypatch, "split")
    gemm = run_gru_f32(monkeypatch, "gemm")
    for a, b, g in zip(split_a[:2], split_b[:2], gemm[:2]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("projection", ["chunked", "whole"])
@pytest.mark.parametrize("cell", ["GRU", "LSTM", "LSTM_proj", "RNN"])
def test_a_slice_of_one_unit(threads, monkeypatch, cell, projection, dtype):
    """H = 16 (threads - 1) + 1: the team's last slice of the hidden units is one unit. The
    float32 micro-kernel and the bfloat16 products pack each slice's rows of W_hh and W_ih
    (gates x units); a slice of one unit once packed a view with W's gate stride as if it were
    contiguous (wrong outputs, GRU and LSTM). The layer against itself in float64."""
    import varlen_rnn

    monkeypatch.setenv("VARLEN_RNN_CPU_STEPS", "split")
    monkeypatch.setenv("VARLEN_RNN_CPU_ROW_GROUPS", "1")  # one team: the units are split
    monkeypatch.setenv("VARLEN_RNN_CPU_PROJECTION", projection)
    Hs = 16 * (threads - 1) + 1
    kw = dict(proj_size=7) if cell == "LSTM_proj" else {}
    torch.manual_seed(0)
    ref = getattr(varlen_rnn, cell.split("_")[0])(9, Hs, dtype=torch.float64, **kw)
    mod = getattr(varlen_rnn, cell.split("_")[0])(9, Hs, dtype=dtype, **kw)
    mod.load_state_dict(ref.state_dict())
    lengths = torch.tensor([12, 3, 12, 7, 1])  # T = 12: past the few-step calls
    x = torch.randn(12, 5, 9, dtype=torch.float64)
    outs = []
    for m in (ref, mod):
        xi = x.to(m.weight_ih_l0.dtype).requires_grad_()
        out, h = m(xi, lengths=lengths)
        h = h if isinstance(h, torch.Tensor) else torch.cat([h[0].flatten(), h[1].flatten()])
        loss = (out.double() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        (gx,) = torch.autograd.grad(loss + h.double().sum(), xi)
        outs.append((out.double(), h.double(), gx.double()))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for name, a, b in zip(["output", "h_n", "grad_input"], outs[1], outs[0]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")

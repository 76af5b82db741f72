"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) of the module."""

import pytest
import torch
from testing import ALL_DEVICES, OPCHECK_DTYPES, assert_close, gru_op_args

import varlen_rnn

ops = torch.ops.varlen_rnn


def _forward_args(device, dtype, D=2, bias=True, batch_first=False, need_workspace=True, **kw):
    return (*gru_op_args(device, D, bias, batch_first, dtype=dtype, **kw), need_workspace)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_opcheck_forward(device, dtype, D, bias, batch_first):
    args = _forward_args(device, dtype, D, bias, batch_first)
    torch.library.opcheck(ops.gru_layer_forward.default, args)
    no_ws = _forward_args(
        device, dtype, D, bias, batch_first, need_workspace=False, requires_grad=False
    )
    torch.library.opcheck(ops.gru_layer_forward.default, no_ws)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_op_deciding_workspace(device, batch_first):
    """gru_layer (what jit traces record): opcheck, its gradients (gradcheck), and the forward
    op's results without the workspace."""
    for grad in (True, False):
        *args, _ = _forward_args(device, torch.float64, batch_first=batch_first, requires_grad=grad)
        torch.library.opcheck(ops.gru_layer.default, args)
        expected = ops.gru_layer_forward(*args, grad)[:-1]
        for g, e in zip(ops.gru_layer(*args), expected, strict=True):
            torch.testing.assert_close(g, e, atol=0, rtol=0)
    *args, _ = _forward_args(device, torch.float64, batch_first=batch_first)
    assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a), args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_opcheck_backward(device, dtype, D, batch_first):
    x, lengths, hx, w_ih, w_hh, b_ih, b_hh, _, _ = _forward_args(
        device, dtype, D, True, batch_first, requires_grad=False
    )
    out, h_n, ws = ops.gru_layer_forward(x, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, True)
    args = (
        torch.randn_like(out),
        torch.randn_like(h_n),
        x,
        lengths,
        hx,
        w_ih,
        w_hh,
        out,
        ws,
        batch_first,
    )
    torch.library.opcheck(ops.gru_layer_backward.default, args)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("batch_first,backend", [(False, "inductor"), (True, "aot_eager")])
def test_compile_fullgraph_matches_eager(device, batch_first, backend):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(
        3,
        5,
        num_layers=2,
        bidirectional=True,
        batch_first=batch_first,
        device=device,
        dtype=torch.float64,
    )

    def step(x, lengths):
        out, h = gru(x, lengths=lengths)
        return out.sum() + (h * h).sum(), out, h

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for B, T in [(4, 6), (3, 9)]:
        shape = (B, T, 3) if batch_first else (T, B, 3)
        x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        lengths = torch.randint(0, T + 1, (B,), device=device)
        loss, out, h = step(x, lengths)
        (gx,) = torch.autograd.grad(loss, x)
        loss_c, out_c, h_c = compiled(x, lengths)
        (gx_c,) = torch.autograd.grad(loss_c, x)
        assert_close(out_c, out, torch.float64, "output")
        assert_close(h_c, h, torch.float64, "h_n")
        assert_close(gx_c, gx, torch.float64, "grad input")

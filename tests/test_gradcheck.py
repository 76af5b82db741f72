"""torch.autograd.gradcheck in float64 on the op and on the module path."""

import pytest
import torch
from testing import ALL_DEVICES, gru_op_args

import varlen_rnn

op = varlen_rnn.ops.gru_layer


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gradcheck_op(device, D, bias, batch_first):
    args = gru_op_args(device, D, bias, batch_first)
    assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_gradcheck_backward_op_against_finite_differences_of_outputs_only(device):
    """Gradient of h_n alone (grad_output zero) and of output alone (grad_h_n zero)."""
    args = gru_op_args(device, 2, True, False)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[1], args, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[0], args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_module(device, bidirectional):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(
        3, 4, num_layers=2, bidirectional=bidirectional, dtype=torch.float64, device=device
    )
    names = [n for n, _ in gru.named_parameters()]
    D = 2 if bidirectional else 1
    x = torch.randn(6, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(2 * D, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    lengths = torch.tensor([6, 0, 2, 5])

    def fn(x, hx, *ps):
        out, h = torch.func.functional_call(
            gru, dict(zip(names, ps)), (x, hx), {"lengths": lengths}
        )
        return out, h

    assert torch.autograd.gradcheck(fn, (x, hx, *params), eps=1e-6, atol=1e-8)

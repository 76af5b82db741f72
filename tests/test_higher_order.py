"""Beyond first-order reverse mode: refused with a clear error, never a wrong number.
Double backward (gradients of gradients) and forward-mode AD are not implemented; vmap is."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import varlen_rnn

F64 = torch.float64
LENGTHS = [5, 2, 0]


@pytest.fixture
def gru():
    torch.manual_seed(0)
    return varlen_rnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64)


def _functional(gru):
    params = dict(gru.named_parameters())
    return lambda x: torch.func.functional_call(gru, params, (x,), {"lengths": LENGTHS})[0]


def test_double_backward_through_the_module_is_refused(gru):
    x = torch.randn(5, 3, 3, dtype=F64, requires_grad=True)
    hx = torch.randn(4, 3, 4, dtype=F64, requires_grad=True)
    out, h = gru(x, hx, lengths=LENGTHS)
    gx, ghx = torch.autograd.grad(out.sum() + h.sum(), (x, hx), create_graph=True)
    for g in (gx, ghx):  # a gradient penalty on either
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum(), list(gru.parameters()), retain_graph=True)


@pytest.mark.parametrize("fn", ["jvp", "hessian"])
def test_autograd_functional_needing_double_backward_is_refused(gru, fn):
    f = _functional(gru)
    x = torch.randn(5, 3, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="double backward"):
        if fn == "jvp":  # implemented with the double-backward trick
            torch.autograd.functional.jvp(f, x, torch.ones_like(x))
        else:
            torch.autograd.functional.hessian(lambda x: f(x).sum(), x)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "hessian", "jvp_of_vmap"])
def test_functorch_forward_mode_is_refused_not_zero(gru, transform):
    """Without the guard in varlen_rnn.ops these returned all-zero tangents silently."""
    f = _functional(gru)
    x = torch.randn(5, 3, 3, dtype=F64)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        if transform == "jvp":
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        elif transform == "jacfwd":
            torch.func.jacfwd(f)(x)
        elif transform == "hessian":
            torch.func.hessian(lambda x: f(x).sum())(x)
        else:
            xb = torch.randn(2, 5, 3, 3, dtype=F64)
            torch.func.jvp(torch.vmap(f), (xb,), (torch.ones_like(xb),))


def test_forward_ad_dual_tensors_are_refused(gru):
    x = torch.randn(5, 3, 3, dtype=F64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        gru(fwAD.make_dual(x, torch.ones_like(x)), lengths=LENGTHS)


def test_functorch_reverse_mode_raises_rather_than_returning_wrong_numbers(gru):
    """torch.func.grad/jacrev refuse ops whose autograd is registered with
    torch.library.register_autograd (a torch limitation); plain autograd works."""
    f = _functional(gru)
    x = torch.randn(5, 3, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda x: f(x).sum())(x)


def test_vmap_matches_a_loop(gru):
    f = _functional(gru)
    xb = torch.randn(4, 5, 3, 3, dtype=F64)
    batched = torch.vmap(f)(xb)
    for i in range(xb.shape[0]):
        assert torch.equal(batched[i], f(xb[i]))

"""Beyond first-order reverse mode: gradients of gradients, forward-mode AD and torch.func,
each checked numerically (gradgradcheck, gradcheck's forward-AD check) and against
torch.nn.GRU. The first-order backward stays on the fused kernels."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from testing import ALL_DEVICES, assert_close, gru_op_args, make_pair, packed_baseline

import varlen_rnn

F64 = torch.float64
op = varlen_rnn.ops.gru_layer


def _module_fn(gru, lengths):
    """(x, hx, *params) -> (output, h_n): every input a differentiable argument."""
    names = [n for n, _ in gru.named_parameters()]

    def fn(x, hx, *params):
        return torch.func.functional_call(
            gru, dict(zip(names, params)), (x, hx), {"lengths": lengths}
        )

    return fn


def _module_args(gru, device, T, B):
    D = 2 if gru.bidirectional else 1
    f = lambda *s: torch.randn(*s, dtype=F64, device=device, requires_grad=True)
    x = f(B, T, gru.input_size) if gru.batch_first else f(T, B, gru.input_size)
    params = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    return (x, f(gru.num_layers * D, B, gru.hidden_size), *params)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,fast_mode",
    [(1, False, False, False), (1, True, True, False), (2, True, False, True)],
)
def test_gradgradcheck_module(device, num_layers, bidirectional, batch_first, fast_mode):
    """Input, hx and every weight; lengths T, 1, 0 and in between. fast_mode checks random
    projections of the second derivatives instead of every entry (the same math, cheaper)."""
    _, gru = make_pair(
        2, 2, num_layers, bidirectional=bidirectional, batch_first=batch_first, device=device
    )
    T, lengths = 3, torch.tensor([3, 1, 0, 2])
    args = _module_args(gru, device, T, len(lengths))
    assert torch.autograd.gradgradcheck(
        _module_fn(gru, lengths), args, eps=1e-6, atol=1e-6, fast_mode=fast_mode
    )


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("D,bias,batch_first", [(1, True, False), (2, False, True)])
def test_gradgradcheck_op(device, D, bias, batch_first):
    args = gru_op_args(device, D, bias, batch_first, lengths=(3, 1, 2), T=3, I=2, H=2)
    assert torch.autograd.gradgradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-6)


def _penalty_grads(fn, x, hx, params):
    """A gradient penalty: d/d(x, hx, params) of |d loss / d(x, hx)|^2."""
    out, h = fn(x, hx)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum() + (h * h).sum()
    gx, ghx = torch.autograd.grad(loss, (x, hx), create_graph=True)
    return torch.autograd.grad((gx * gx).sum() + (ghx * ghx).sum(), [x, hx, *params])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradient_penalty_matches_nn_gru(bidirectional):
    ref, ours = make_pair(3, 4, 2, bidirectional=bidirectional)
    lengths = [5, 1, 3]
    x = torch.randn(5, 3, 3, dtype=F64, requires_grad=True)
    hx = torch.randn(4 if bidirectional else 2, 3, 4, dtype=F64, requires_grad=True)
    got = _penalty_grads(lambda x, hx: ours(x, hx, lengths=lengths), x, hx, list(ours.parameters()))
    expected = _penalty_grads(
        lambda x, hx: packed_baseline(ref, x, lengths, hx), x, hx, list(ref.parameters())
    )
    for a, b in zip(got, expected):
        assert_close(a, b, F64, "penalty gradient")


def test_first_order_backward_never_recomputes(monkeypatch):
    """Only create_graph=True reaches the differentiable recomputation."""
    _, gru = make_pair(3, 4, 2, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=F64, requires_grad=True)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(varlen_rnn.reference, "gru_layer_reference", fail)
    out, h = gru(x, lengths=[5, 2, 0])
    torch.autograd.grad(out.sum() + h.sum(), [x, *gru.parameters()], retain_graph=True)
    for reentrant in (True, False):  # activation checkpointing backpropagates first-order too
        y = torch.utils.checkpoint.checkpoint(
            lambda x: gru(x, lengths=[5, 2, 0])[0], x, use_reentrant=reentrant
        )
        y.sum().backward()  # reentrant checkpointing refuses torch.autograd.grad
    with pytest.raises(AssertionError, match="recomputed"):
        torch.autograd.grad(out.sum() + h.sum(), x, create_graph=True)


def test_the_backward_op_itself_is_not_differentiable():
    T, B, D, I, H = 4, 2, 1, 3, 2
    f = lambda *s: torch.randn(*s, dtype=F64)
    x, lengths, hx, w_ih, w_hh = (
        f(T, B, I),
        torch.tensor([4, 2]),
        f(D, B, H),
        f(D, 3 * H, I),
        f(D, 3 * H, H),
    )
    out, h, ws = torch.ops.varlen_rnn.gru_layer_forward(
        x, lengths, hx, w_ih, w_hh, None, None, False, True
    )
    go = torch.randn_like(out, requires_grad=True)
    g = torch.ops.varlen_rnn.gru_layer_backward(
        go, torch.zeros_like(h), x, lengths, hx, w_ih, w_hh, out, ws, False
    )
    with pytest.raises(
        RuntimeError,
        match=r"^varlen_rnn::gru_layer_backward has no derivative of its own: for gradients of "
        r"gradients call varlen_rnn.ops.gru_layer \(or varlen_rnn.GRU\) and differentiate",
    ):
        g[0].sum().backward()


def _rows_alone(ref, x, tangent, lengths, hx, ht):
    """nn.GRU's jvp one sequence at a time, padded back: packing has no forward AD."""
    outs, hs = [], []
    for b, L in enumerate(lengths):
        _, (o, h) = torch.func.jvp(
            lambda x, hx: ref(x, hx),
            (x[:L, b : b + 1], hx[:, b : b + 1]),
            (tangent[:L, b : b + 1], ht[:, b : b + 1]),
        )
        outs.append(torch.cat([o, o.new_zeros(x.shape[0] - L, 1, o.shape[2])]))
        hs.append(h)
    return torch.cat(outs, 1), torch.cat(hs, 1)


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_mode_matches_nn_gru(api, bidirectional):
    ref, ours = make_pair(3, 4, 2, bidirectional=bidirectional)
    lengths = [5, 1, 3]
    x, t = torch.randn(5, 3, 3, dtype=F64), torch.randn(5, 3, 3, dtype=F64)
    hx, ht = torch.randn(2, 2 * (1 + bidirectional), 3, 4, dtype=F64)
    if api == "forward_ad":
        with fwAD.dual_level():
            out, h = ours(fwAD.make_dual(x, t), fwAD.make_dual(hx, ht), lengths=lengths)
            got = fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(h).tangent
    else:
        _, got = torch.func.jvp(lambda x, hx: ours(x, hx, lengths=lengths), (x, hx), (t, ht))
    expected = _rows_alone(ref, x, t, lengths, hx, ht)
    assert_close(got[0], expected[0], F64, "output tangent")
    assert_close(got[1], expected[1], F64, "h_n tangent")


def test_forward_ad_of_weights_passes_gradcheck():
    """gradcheck's forward-mode check: jvp of every input and weight against finite differences."""
    _, gru = make_pair(2, 2, 2, bidirectional=True)
    args = _module_args(gru, "cpu", 3, 3)
    assert torch.autograd.gradcheck(
        _module_fn(gru, [3, 1, 0]),
        args,
        eps=1e-6,
        atol=1e-7,
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
    )


@pytest.mark.parametrize(
    "transform",
    ["grad", "jacrev", "jacfwd", "hessian", "vmap_grad", "functional.jvp", "functional.hessian"],
)
def test_torch_func_transforms_match_nn_gru(transform):
    """One sequence (nn.GRU's own transforms cannot go through packing); a second row of
    length 0 rides along in ours and must not change a thing."""
    ref, ours = make_pair(2, 3, 2, bidirectional=True)
    x = torch.randn(4, 1, 2, dtype=F64)
    padded = torch.cat([x, torch.randn_like(x)], 1)  # row 1: length 0
    f_ref = lambda x: ref(x)[1].pow(2).sum()
    f_ours = lambda x: ours(torch.cat([x, padded[:, 1:]], 1), lengths=[4, 0])[1][:, :1].pow(2).sum()
    t = torch.randn_like(x)
    run = {
        "grad": lambda f: torch.func.grad(f)(x),
        "jacrev": lambda f: torch.func.jacrev(f)(x),
        "jacfwd": lambda f: torch.func.jacfwd(f)(x),
        "hessian": lambda f: torch.func.hessian(f)(x),
        "vmap_grad": lambda f: (
            torch.vmap(torch.func.grad(f))(torch.stack([x, t]))
            if f is f_ours
            else torch.stack([torch.func.grad(f)(x), torch.func.grad(f)(t)])
        ),
        "functional.jvp": lambda f: torch.autograd.functional.jvp(f, x, t)[1],
        "functional.hessian": lambda f: torch.autograd.functional.hessian(f, x),
    }[transform]
    assert_close(run(f_ours), run(f_ref), F64, transform)


def test_jvp_of_vmap_matches_a_loop():
    _, gru = make_pair(3, 4, 2, bidirectional=True)
    f = lambda x: gru(x, lengths=[5, 2, 0])[0]
    xb, tb = torch.randn(2, 2, 5, 3, 3, dtype=F64)
    _, batched = torch.func.jvp(torch.vmap(f), (xb,), (tb,))
    for i in range(2):
        assert_close(batched[i], torch.func.jvp(f, (xb[i],), (tb[i],))[1], F64, "tangent")


def test_vmap_matches_a_loop():
    _, gru = make_pair(3, 4, 2, bidirectional=True)
    f = lambda x: gru(x, lengths=[5, 2, 0])[0]
    xb = torch.randn(4, 5, 3, 3, dtype=F64)
    batched = torch.vmap(f)(xb)
    for i in range(xb.shape[0]):
        assert torch.equal(batched[i], f(xb[i]))


def test_bad_lengths_are_refused_on_the_differentiable_path_too():
    _, gru = make_pair(3, 4)
    x = torch.randn(5, 2, 3, dtype=F64)
    with pytest.raises(
        RuntimeError, match=r"lengths must be in \[0, T\] with T=5, got lengths\[1\]=6"
    ):
        torch.func.jvp(lambda x: gru(x, lengths=torch.tensor([2, 6])), (x,), (x,))

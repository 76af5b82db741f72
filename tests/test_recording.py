"""The node an eager call that records a graph puts in it (csrc/recording.cpp, a C++ node
calling the backward op): what users of autograd rely on beyond the gradients' values, each
checked the way autograd's own nodes behave, on every cell and device. The values are
test_small_calls.py's (the node against the registered autograd, bit for bit, gradients of
gradients included) and every module test's (against torch.nn + packing)."""

import gc
import weakref

import pytest
import torch
from testing import ALL_DEVICES, CELL_KINDS, TOL, make_kind_pair, random_state, tensors_of

KINDS = ["gru", *CELL_KINDS]
NODES = {"gru": "GRULayerBackward", "lstm": "LSTMLayerBackward", "lstm_proj": "LSTMLayerBackward"}


def setup(kind, device, B=3, T=5, H=4, seed=0, **kw):
    """The lengths on the input's device: a CUDA training call with CPU lengths runs on the
    valid rows (index ops around the ragged op's node: test_valid_rows.py), not the padded op
    whose node these tests are about."""
    ref, ours = make_kind_pair(kind, 3, H, device=device, **kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lengths = torch.tensor([T, 2, 0, T - 1, 1][:B], device=device)
    return ref, ours, x, lengths


def loss_of(result, seed=3):
    g = torch.Generator().manual_seed(seed)
    return sum(
        (t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
        for t in tensors_of(result)
    )


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_graph_holds_one_node_on_the_parameters(kind, device):
    """One node per layer call, named after its cell, whose edges go to the input and the
    module's parameters themselves (AccumulateGrad), and no node but it below the outputs."""
    _, ours, x, lengths = setup(kind, device)
    result = ours(x, lengths=lengths)
    node = result[0].grad_fn
    assert all(t.grad_fn is node for t in tensors_of(result))
    assert node.name() == NODES.get(kind, "RNNLayerBackward")
    leaves = [fn.variable for fn, _ in node.next_functions if fn is not None]
    assert any(v is x for v in leaves)
    for p in ours.parameters():
        assert any(v is p for v in leaves), "a parameter is not one of the node's inputs"


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_in_place_change_of_a_saved_tensor_is_an_error(kind, device):
    """Changing a tensor the backward reads, between the forward and the backward, raises
    autograd's own error (the version counter), for the input, a weight and the output."""
    for what in ("input", "weight", "output"):
        _, ours, x, lengths = setup(kind, device)
        x_in = x.clone()  # a non-leaf, so it may be changed in place
        result = ours(x_in, lengths=lengths)
        loss = loss_of(result)
        with torch.no_grad():
            if what == "input":
                x_in.add_(1)
            elif what == "weight":
                ours.weight_hh_l0.add_(1)
            else:
                result[0].mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_twice_needs_retain_graph(kind, device):
    """The node frees what it saved after a backward (autograd's error on a second one);
    with retain_graph=True a second backward gives the same gradients again."""
    _, ours, x, lengths = setup(kind, device)
    # (sums: nodes that save nothing, so only ours can refuse the second backward)
    loss = sum(t.sum() for t in tensors_of(ours(x, lengths=lengths)))
    loss.backward(retain_graph=True)
    first = [x.grad.clone(), *(p.grad.clone() for p in ours.parameters())]
    x.grad = None
    ours.zero_grad(set_to_none=True)
    loss.backward()
    again = [x.grad, *(p.grad for p in ours.parameters())]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_asked_for_some_inputs_only(kind, device):
    """autograd.grad for the input alone, or for one weight alone, gives what the full
    backward gives for it (the node computes only what the call asks for)."""
    _, ours, x, lengths = setup(kind, device)
    loss = loss_of(ours(x, lengths=lengths))
    params = list(ours.parameters())
    full = torch.autograd.grad(loss, [x, *params], retain_graph=True)
    (gx,) = torch.autograd.grad(loss, [x], retain_graph=True)
    (gw,) = torch.autograd.grad(loss, [ours.weight_ih_l0], retain_graph=True)
    assert torch.equal(gx, full[0])
    assert torch.equal(gw, full[1 + [p is ours.weight_ih_l0 for p in params].index(True)])


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_tensor_hooks_see_what_the_node_saves(kind, device):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading, checkpointing
    libraries) pack and unpack what the node saves, and the gradients stay the same."""
    _, ours, x, lengths = setup(kind, device)
    want = torch.autograd.grad(loss_of(ours(x, lengths=lengths)), [x, *ours.parameters()])
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_of(ours(x, lengths=lengths))
    # The input, lengths, states and weights (biases too), and the output.
    assert tuple(x.shape) in [tuple(s) for s in packed]
    assert len(packed) >= 4
    got = torch.autograd.grad(loss, [x, *ours.parameters()])
    assert len(unpacked) >= 4
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_hooks_and_anomaly_mode(kind, device):
    """A hook on an output sees its gradient and may replace it; anomaly mode runs the node
    as any other and names it in its traceback when its backward fails."""
    ref, ours, x, lengths = setup(kind, device)
    result = ours(x, lengths=lengths)
    seen = []
    # (An unused output's gradient reaches its hook as None, as for any node of several
    # outputs.)
    result[0].register_hook(lambda g: seen.append(g) or (None if g is None else g * 0))
    h_n = tensors_of(result)[1]
    (gx,) = torch.autograd.grad(h_n.sum(), [x], retain_graph=True)
    assert all(g is None for g in seen)  # the output is not on the path from h_n
    (gx0,) = torch.autograd.grad(result[0].sum() + h_n.sum(), [x])
    assert len([g for g in seen if g is not None]) == 1
    torch.testing.assert_close(gx0, gx, rtol=0, atol=1e-14)  # the output's part zeroed
    with torch.autograd.detect_anomaly(check_nan=False):
        loss = loss_of(ours(x, lengths=lengths))
        grads = torch.autograd.grad(loss, [x, *ours.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_a_long_chain_of_steps_is_freed(kind):
    """A decoder's graph of many one-step calls (one node each) is freed without recursion
    deep enough to overflow the stack, and frees what its nodes saved."""
    _, ours, _, _ = setup(kind, "cpu", H=2)
    x = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    state = None
    for _ in range(30000):
        out, state = ours(x, state)
    ref = weakref.ref(out)
    del out, state
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_decoder_loop_matches_nn_in_float64(kind):
    """Teacher forcing: 12 one-step calls carrying the state, one backward through them,
    the gradients of the input steps, the first state and every parameter against nn's."""
    ref, ours, _, _ = setup(kind, "cpu")
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(12, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    state0 = random_state(ours, 3, seed=6)
    grads = []
    for m in (ref, ours):
        state, outs = state0, []
        for t in range(xs.shape[0]):
            out, state = m(xs[t], state)
            outs.append(out)
        loss = loss_of((torch.stack(outs), state))
        s0 = list(state0) if isinstance(state0, tuple) else [state0]
        grads.append(torch.autograd.grad(loss, [xs, *s0, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["gru", "lstm_proj", "rnn_relu"])
def test_compiled_autograd(kind):
    """Compiled autograd (torch._dynamo.compiled_autograd), on at the forward call as its docs
    ask, compiles the backward of a graph holding our layer: the call then records the
    registered autograd's node, which it can compile (the C++ node it cannot), and the
    gradients are the eager ones. On only around the backward, it meets the C++ node, which
    refuses with an error that says what to do."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    _, ours, x, lengths = setup(kind, "cpu")
    params = [x, *ours.parameters()]
    want = torch.autograd.grad(loss_of(ours(x, lengths=lengths)), params)
    compiler = torch.compile(backend="eager")
    counters.clear()
    with compiled_autograd._enable(compiler):
        result = ours(x, lengths=lengths)
        assert result[0].grad_fn.name() != NODES.get(kind, "RNNLayerBackward")  # not ours
        loss_of(result).backward()
    assert counters["compiled_autograd"]["captures"] >= 1  # it did compile the backward
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, **TOL[torch.float64])
    loss = loss_of(ours(x, lengths=lengths))
    with compiled_autograd._enable(compiler):
        with pytest.raises(NotImplementedError, match="before the forward call as well"):
            loss.backward()

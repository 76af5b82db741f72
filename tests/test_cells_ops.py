"""The LSTM and RNN ops: gradcheck and torch.library.opcheck on every op (padded and ragged,
forward and backward), the higher-order routes through the reference, and the modules under
torch.compile(fullgraph=True) and torch.export (the GRU's are in test_gradcheck.py,
test_opcheck.py, test_higher_order.py and test_export.py)."""

import io

import pytest
import torch
from testing import (
    ALL_DEVICES,
    CELL_KINDS,
    OPCHECK_DTYPES,
    assert_close,
    make_cell_pair,
    tensors_of,
)
from torch import nn
from torch.optim.sgd import sgd

import varlen_rnn

ops = torch.ops.varlen_rnn
F64 = torch.float64
KINDS = sorted(CELL_KINDS)
LENGTHS = (3, 5, 0, 1)  # padded and offsets layouts: a zero length, unsorted
PACKED = dict(batch_sizes=[4, 3, 2, 1, 1], sorted_indices=[1, 0, 2, 3], lengths=(3, 5, 2, 1))


def _cell(kind):
    return kind.split("_")[0]


def op_args(
    kind, device, dtype=F64, D=2, bias=True, batch_first=False, layout=None, grad=True, H=4
):
    """The arguments of varlen_rnn.ops.{gru,lstm,rnn}_layer[_ragged] (the op's, without
    need_workspace) for kind ("gru" or one of KINDS): layout None = padded [T, B, I] + lengths,
    0 = offsets, 1 = packed."""
    T, B, I = 5, 4, 3
    P = H // 2 if kind == "lstm_proj" else H
    G = 4 if kind.startswith("lstm") else 3 if kind == "gru" else 1
    f = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=grad)  # noqa: E731
    if layout is None:
        x = f(B, T, I) if batch_first else f(T, B, I)
        index = (torch.tensor(LENGTHS, device=device),)
    elif layout == 0:
        x = f(sum(LENGTHS), I)
        offsets = torch.tensor([0, 3, 8, 8, 9], device=device)
        index = (offsets, None, 0, T)
    else:
        x = f(sum(PACKED["lengths"]), I)
        batch_sizes = torch.tensor(PACKED["batch_sizes"])  # on the CPU, as PackedSequence's
        index = (batch_sizes, torch.tensor(PACKED["sorted_indices"], device=device), 1, T)
    states = (f(D, B, P), f(D, B, H)) if G == 4 else (f(D, B, H),)
    weights = (f(D, G * H, I), f(D, G * H, P))
    weights += (f(D, G * H), f(D, G * H)) if bias else (None, None)
    if G == 4:
        weights += (f(D, P, H) if kind == "lstm_proj" else None,)
    options = (kind.split("_")[1],) if kind.startswith("rnn") else ()
    tail = (batch_first,) if layout is None else ()
    return (x, *index, *states, *weights, *options, *tail)


def wrapper(kind, ragged):
    return getattr(varlen_rnn.ops, f"{_cell(kind)}_layer{'_ragged' if ragged else ''}")


def op(kind, ragged, direction="forward"):
    return getattr(ops, f"{_cell(kind)}_layer{'_ragged' if ragged else ''}_{direction}").default


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gradcheck_padded_op(device, kind, D, bias, batch_first):
    args = op_args(kind, device, D=D, bias=bias, batch_first=batch_first)
    fn = wrapper(kind, False)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [0, 1])
def test_gradcheck_ragged_op(device, kind, layout):
    args = op_args(kind, device, layout=layout)
    fn = wrapper(kind, True)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_each_output_alone(device, kind):
    """The gradient of one output with the others' gradients unused (None in the backward)."""
    args = op_args(kind, device)
    fn = wrapper(kind, False)
    for k in range(len(fn(*args))):
        assert torch.autograd.gradcheck(lambda *a: fn(*a)[k], args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [None, 0, 1], ids=["padded", "offsets", "packed"])
@pytest.mark.parametrize("D,bias,batch_first", [(1, True, False), (2, False, True)])
def test_opcheck_forward(device, dtype, kind, layout, D, bias, batch_first):
    args = op_args(kind, device, dtype, D, bias, batch_first, layout)
    torch.library.opcheck(op(kind, layout is not None), (*args, True))
    no_ws = op_args(kind, device, dtype, D, bias, batch_first, layout, grad=False)
    torch.library.opcheck(op(kind, layout is not None), (*no_ws, False))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [None, 0, 1], ids=["padded", "offsets", "packed"])
def test_op_deciding_workspace(device, kind, layout):
    """{lstm,rnn}_layer[_ragged] (what jit traces record): opcheck, its gradients (gradcheck),
    and the forward op's results without the workspace."""
    ragged = layout is not None
    deciding = getattr(ops, f"{_cell(kind)}_layer{'_ragged' if ragged else ''}").default
    for grad in (True, False):
        args = op_args(kind, device, layout=layout, grad=grad)
        torch.library.opcheck(deciding, args)
        for g, e in zip(deciding(*args), op(kind, ragged)(*args, grad)[:-1], strict=True):
            torch.testing.assert_close(g, e, atol=0, rtol=0)
    args = op_args(kind, device, layout=layout)
    assert torch.autograd.gradcheck(lambda *a: deciding(*a), args, eps=1e-6, atol=1e-8)


def _backward_args(kind, layout, device, dtype):
    """A forward's results turned into its backward op's arguments."""
    cell = varlen_rnn._schema.CELLS[_cell(kind)]
    ragged = layout is not None
    args = op_args(kind, device, dtype, layout=layout, grad=False)
    a = varlen_rnn._schema._Args.split(cell, ragged, args)
    *outs, ws = op(kind, ragged)(*args, True)
    grads = [torch.randn_like(t) for t in outs]
    w = a.weights[:2] + a.weights[4:]
    return (*grads, a.input, *a.index, *a.states, *w, outs[0], ws, *a.options, *a.tail)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [None, 0, 1], ids=["padded", "offsets", "packed"])
def test_opcheck_backward(device, dtype, kind, layout):
    args = _backward_args(kind, layout, device, dtype)
    torch.library.opcheck(op(kind, layout is not None, "backward"), args)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [None, 0], ids=["padded", "offsets"])
def test_gradgradcheck_op(kind, layout):
    """Gradients of gradients go through the reference (the backward op has no derivative)."""
    args = op_args(kind, "cpu", D=1, layout=layout, H=2)
    fn = wrapper(kind, layout is not None)
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a), args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_matches_nn(kind):
    """torch.func.jvp through the module (the reference path) against nn's module on the
    same sequences, one at a time (nn has no lengths)."""
    ref, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True)
    lengths = [5, 2, 4]
    x, t = torch.randn(5, 3, 3, dtype=F64), torch.randn(5, 3, 3, dtype=F64)
    _, tangents = torch.func.jvp(lambda x: tensors_of(ours(x, lengths=lengths)), (x,), (t,))
    for b, L in enumerate(lengths):
        _, expected = torch.func.jvp(lambda x: tensors_of(ref(x)), (x[:L, b],), (t[:L, b],))
        assert_close(tangents[0][:L, b], expected[0], F64, "output tangent")
        for got, e in zip(tangents[1:], expected[1:]):
            assert_close(got[:, b], e, F64, "final state tangent")


@pytest.mark.parametrize("kind", ["lstm_proj", "rnn_relu"])
def test_backward_op_is_not_differentiable_and_needs_the_workspace(kind):
    cls = "LSTM" if kind.startswith("lstm") else "RNN"
    args = _backward_args(kind, None, "cpu", F64)
    go = args[0].clone().requires_grad_()
    g = op(kind, False, "backward")(go, *args[1:])
    name = f"{_cell(kind)}_layer"
    with pytest.raises(
        RuntimeError,
        match=rf"^varlen_rnn::{name}_backward has no derivative of its own: for gradients "
        rf"of gradients call varlen_rnn.ops.{name} \(or varlen_rnn.{cls}\) and differentiate",
    ):
        g[0].sum().backward()
    fwd = op_args(kind, "cpu")
    outs = op(kind, False)(*fwd, False)
    with pytest.raises(RuntimeError, match=rf"{name}_forward was called with need_workspace=False"):
        outs[0].sum().backward()


class Classifier(nn.Module):
    """Embedding -> varlen_rnn.LSTM/RNN over padded tokens + lengths -> Linear on h_n[-1]."""

    def __init__(self, kind):
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.rnn = make_cell_pair(kind, 5, 6, 2, batch_first=True, bidirectional=True)[1]
        self.rnn.float()
        self.fc = nn.Linear(self.rnn.proj_size or 6, 3)

    def forward(self, tokens, lengths):
        out, state = self.rnn(self.emb(tokens), lengths=lengths)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.fc(h_n[-1]), out


def _batch(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (B, T), generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[1] = 0
    return tokens, lengths


def _train_step(model, params, momentum_buffers, tokens, lengths, labels):
    logits, _ = model(tokens, lengths)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    with torch.no_grad():  # torch.optim.SGD.step's own math, as test_export.py's
        sgd(
            params,
            [p.grad for p in params],
            momentum_buffers,
            weight_decay=0.0,
            momentum=0.9,
            lr=0.1,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            foreach=True,
        )
        for p in params:
            p.grad = None
    return loss.detach()


@pytest.mark.parametrize(
    "kind,backend", [("lstm_proj", "inductor"), ("lstm", "aot_eager"), ("rnn_tanh", "aot_eager")]
)
def test_compile_fullgraph_training_step_matches_eager(kind, backend):
    torch.manual_seed(0)
    eager = Classifier(kind)
    compiled_model = Classifier(kind)
    compiled_model.load_state_dict(eager.state_dict())
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    params = list(compiled_model.parameters())
    buffers = [None] * len(params)
    torch.compiler.reset()
    # trace_autograd_ops lets dynamo put loss.backward() inside the one graph.
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(_train_step, fullgraph=True, backend=backend, dynamic=True)
        for i, (B, T) in enumerate([(4, 7), (5, 9), (3, 4)]):
            tokens, lengths = _batch(B, T, i)
            labels = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(i))
            opt.zero_grad()
            logits, _ = eager(tokens, lengths)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            loss_c = step(compiled_model, params, buffers, tokens, lengths, labels)
            torch.testing.assert_close(loss_c, loss.detach(), atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["lstm_proj", "rnn_relu"])
def test_export_dynamic_batch_and_time(kind):
    torch.manual_seed(0)
    model = Classifier(kind).eval()
    Bd, Td = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=256)
    ep = torch.export.export(
        model,
        _batch(4, 7, 0),
        dynamic_shapes={"tokens": {0: Bd, 1: Td}, "lengths": {0: Bd}},
        strict=False,
    )
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert f"varlen_rnn.{_cell(kind)}_layer_forward.default" in targets
    assert not any(t.startswith("aten.item") or "_local_scalar_dense" in t for t in targets)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for i, (B, T) in enumerate([(4, 7), (6, 11), (1, 3)]):
        tokens, lengths = _batch(B, T, i + 1)
        with torch.no_grad():
            expected = model(tokens, lengths)
            for runner in (ep.module(), loaded):
                for g, e in zip(runner(tokens, lengths), expected):
                    assert g.shape == e.shape
                    torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)

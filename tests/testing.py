"""Shared helpers for the tests: devices, dtypes, and the torch.nn.GRU + packing baseline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import varlen_rnn

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# A device list whose cuda entry is reported as skipped (with a reason) on machines without one.
ALL_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]
DTYPES = [torch.float32, torch.float64]
# opcheck's dtypes: bfloat16 too, whose workspace dtype the fake kernels must know (bfloat16,
# where float16's is float32).
OPCHECK_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Absolute/relative tolerance of a comparison with torch.nn.GRU + packing.
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-4)}

LENGTH_PATTERNS = {
    "unsorted": lambda T, B: [(3 * i + 2) % T + 1 for i in range(B)],
    "repeated": lambda T, B: [T if i % 2 else max(1, T // 2) for i in range(B)],
    "ones": lambda T, B: [1] * B,
    "full": lambda T, B: [T] * B,
    "all_equal": lambda T, B: [max(1, T - 2)] * B,
}


def make_pair(
    input_size,
    hidden_size,
    num_layers=1,
    bias=True,
    batch_first=False,
    bidirectional=False,
    dtype=torch.float64,
    device="cpu",
    dropout=0.0,
    seed=0,
):
    """A torch.nn.GRU and a varlen_rnn.GRU with identical weights."""
    torch.manual_seed(seed)
    ref = torch.nn.GRU(
        input_size,
        hidden_size,
        num_layers,
        bias,
        batch_first,
        dropout,
        bidirectional,
        device=device,
        dtype=dtype,
    )
    ours = varlen_rnn.GRU(
        input_size,
        hidden_size,
        num_layers,
        bias,
        batch_first,
        dropout,
        bidirectional,
        device=device,
        dtype=dtype,
    )
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def packed_baseline(gru: torch.nn.GRU, x, lengths, hx=None):
    """The recipe varlen_rnn replaces: pack (unsorted), run, unpack to the padded length."""
    bf = gru.batch_first
    T = x.shape[1] if bf else x.shape[0]
    packed = pack_padded_sequence(
        x, torch.as_tensor(lengths).cpu(), batch_first=bf, enforce_sorted=False
    )
    out, h_n = gru(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
    return out, h_n


def grads(outputs, inputs, seed=1):
    """Gradients of a random projection of outputs: every element gets its own weight, drawn
    in float64 and cast, so runs in different dtypes get the same weights (torch.randn's
    stream depends on the dtype from 16 elements on)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
        for o in outputs
    )
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)


def assert_close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{msg}: {m}")


def gru_op_args(
    device,
    D,
    bias,
    batch_first,
    lengths=(3, 5, 0, 1),
    T=5,
    I=3,
    H=4,
    dtype=torch.float64,
    requires_grad=True,
):
    """Random arguments of varlen_rnn.ops.gru_layer / the gru_layer_forward op, up to
    batch_first: (x, lengths, hx, w_ih, w_hh, b_ih or None, b_hh or None, batch_first)."""
    B = len(lengths)
    f = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    return (
        f(B, T, I) if batch_first else f(T, B, I),
        torch.tensor(lengths, device=device),
        f(D, B, H),
        f(D, 3 * H, I),
        f(D, 3 * H, H),
        f(D, 3 * H) if bias else None,
        f(D, 3 * H) if bias else None,
        batch_first,
    )


# ------------------------------------------------------------------ LSTM and RNN
# A cell kind: the torch.nn class and its extra constructor arguments for hidden size H.
CELL_KINDS = {
    "lstm": (torch.nn.LSTM, lambda H: {}),
    "lstm_proj": (torch.nn.LSTM, lambda H: {"proj_size": max(1, H // 2)}),
    "rnn_tanh": (torch.nn.RNN, lambda H: {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, lambda H: {"nonlinearity": "relu"}),
}


def make_cell_pair(
    kind,
    input_size,
    hidden_size,
    num_layers=1,
    bias=True,
    batch_first=False,
    bidirectional=False,
    dtype=torch.float64,
    device="cpu",
    dropout=0.0,
    seed=0,
):
    """A torch.nn.LSTM/RNN (per CELL_KINDS) and its varlen_rnn twin with identical weights."""
    nn_cls, extra = CELL_KINDS[kind]
    kwargs = dict(
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        dropout=dropout,
        bidirectional=bidirectional,
        device=device,
        dtype=dtype,
        **extra(hidden_size),
    )
    torch.manual_seed(seed)
    ref = nn_cls(input_size, hidden_size, **kwargs)
    ours = getattr(varlen_rnn, nn_cls.__name__)(input_size, hidden_size, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_kind_pair(kind, input_size, hidden_size, **kw):
    """make_pair for kind "gru", else make_cell_pair (kind a CELL_KINDS key)."""
    if kind == "gru":
        return make_pair(input_size, hidden_size, **kw)
    return make_cell_pair(kind, input_size, hidden_size, **kw)


def random_state(module, B, dtype=torch.float64, device="cpu", requires_grad=True, seed=None):
    """An initial state for module (an nn or varlen_rnn GRU/LSTM/RNN): hx, or (h_0, c_0)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    LD = module.num_layers * (2 if module.bidirectional else 1)
    H = module.hidden_size
    shapes = [(LD, B, getattr(module, "proj_size", 0) or H)]
    if isinstance(module, (torch.nn.LSTM, varlen_rnn.LSTM)):
        shapes.append((LD, B, H))
    states = tuple(
        torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)
        for s in shapes
    )
    return states if len(states) == 2 else states[0]


def tensors_of(result):
    """(output, h_n) or (output, (h_n, c_n)) -> a flat list of tensors."""
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


class OpArguments(TorchDispatchMode):
    """Inside it, every varlen_rnn op whose name ends with `suffix` records the value of its
    argument `name` in `values`: as called, or the schema's default, which the dispatcher leaves
    out of the arguments when the call passes it."""

    def __init__(self, suffix: str, name: str):
        super().__init__()
        self.suffix, self.name, self.values = suffix, name, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name().startswith("varlen_rnn::") and func.name().endswith(self.suffix):
            arguments = func._schema.arguments
            k = [a.name for a in arguments].index(self.name)
            value = args[k] if len(args) > k else kwargs.get(self.name, arguments[k].default_value)
            self.values.append(list(value) if isinstance(value, (list, tuple)) else value)
        return func(*args, **kwargs)


def float64_run(ref, x, hx, lengths, loss_of):
    """The truth an autocast run is held to: nn + packing in float64 on ref's weights, x and hx
    (no autocast), and the gradients of the loss loss_of(outputs). Returns (the outputs as
    tensors_of lists them, [grad of x, *parameter grads])."""
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    if hx is None:
        hx64 = None
    elif isinstance(hx, tuple):
        hx64 = tuple(t.detach().double() for t in hx)
    else:
        hx64 = hx.detach().double()
    outputs = tensors_of(packed_baseline(ref64, x64, lengths, hx64))
    loss_of(outputs).backward()
    return [t.detach() for t in outputs], [x64.grad] + [p.grad for p in ref64.parameters()]


def cudnn_enabled(enabled: bool):
    """torch.backends.cudnn.flags(enabled=...) keeping the session's TF32 setting: flags() would
    also set allow_tf32 to its default, True, which puts the CUDA backend's float32 products on
    TF32 (nn.GRU's cuDNN policy) where a test compares with a float32 run outside the context
    (the session keeps TF32 off: conftest.py)."""
    return torch.backends.cudnn.flags(enabled=enabled, allow_tf32=torch.backends.cudnn.allow_tf32)


def relative_errors(tensors, truth):
    """Each tensor's largest difference from its float64 counterpart (truth), relative to that
    counterpart's largest magnitude."""

    def rel(t, want):
        return ((t.double() - want).abs().max() / (want.abs().max() + 1e-12)).item()

    return [rel(t, want) for t, want in zip(tensors, truth, strict=True)]


def assert_errors_within_nn(names, ours_rel, nn_rel, what=""):
    """ours_rel[i] (tensor names[i]) within twice max(nn_rel): see assert_as_accurate_as_nn."""
    nn_worst = max(nn_rel)
    for name, e in zip(names, ours_rel, strict=True):
        assert e <= 2 * nn_worst, (
            f"{name}: {e:.3g}{what} of its scale from float64, nn's worst {nn_worst:.3g}"
            # every tensor's pair (ours, nn's), for a failure seen only where it cannot be rerun
            + "; all (ours/nn): "
            + ", ".join(f"{n} {o:.3g}/{r:.3g}" for n, o, r in zip(names, ours_rel, nn_rel))
        )


def assert_as_accurate_as_nn(names, ours, theirs, truth):
    """Each of ours is as close to the float64 run's (truth) as nn's are: its largest difference,
    relative to that tensor's largest magnitude, within twice the worst such relative difference
    of nn's tensors (what the autocast dtype's roundings cost nn here)."""
    assert_errors_within_nn(names, relative_errors(ours, truth), relative_errors(theirs, truth))


def autocast_grads(ours, ref, x_o, x_r):
    """After the same backward through ours and nn (autocast outputs, the backward outside the
    region, as the autocast docs recommend): checks that the gradients have the leaves' dtypes
    (float32 parameters, the input's dtype) and returns (names, ours' gradients, nn's) in the
    order float64_run's truth lists them."""
    assert x_o.grad.dtype == x_r.grad.dtype
    names = ["grad of input"] + [f"grad of {name}" for name, _ in ours.named_parameters()]
    got = [x_o.grad] + [p.grad for p in ours.parameters()]
    theirs = [x_r.grad] + [q.grad for q in ref.parameters()]
    for name, p, q in zip(names[1:], got[1:], theirs[1:], strict=True):
        assert p.dtype == q.dtype == torch.float32, name
    return names, got, theirs


def assert_autocast_grads_close(ours, ref, x_o, x_r, truth):
    """autocast_grads' gradients are as accurate as nn's against the float64 run's (truth:
    float64_run's; assert_as_accurate_as_nn)."""
    names, got, theirs = autocast_grads(ours, ref, x_o, x_r)
    assert_as_accurate_as_nn(names, got, theirs, truth)


def backward_op_and_args(kind, layout, device, dtype, lengths, I, H, D=2, seed=7):
    """A backward op (torch.ops.varlen_rnn.*_backward.default) and its arguments without
    output_mask, from its forward op's results on random inputs and weights: kind "gru" or a
    CELL_KINDS key; layout "padded" (time-major), "offsets" or "packed" (ragged rows); the
    incoming gradients random. Returns (op, args, the cell of varlen_rnn._schema.CELLS)."""
    cell = varlen_rnn._schema.CELLS[kind.split("_")[0]]
    G, B, T = cell.gates, len(lengths), max(lengths)
    P = max(1, H // 2) if kind == "lstm_proj" else H
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    lens = torch.tensor(lengths)
    N = int(lens.sum())
    if layout == "padded":
        x = f(T, B, I)
        index = (lens.to(device),)
    elif layout == "offsets":
        x = f(N, I)
        index = (torch.tensor([0, *lens.cumsum(0).tolist()], device=device), None, 0, T)
    else:  # PackedSequence's rows: batch_sizes on the CPU, sorted_indices on the device
        x = f(N, I)
        sorted_indices = torch.sort(lens, descending=True, stable=True).indices
        batch_sizes = (lens.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
        index = (batch_sizes, sorted_indices.to(device), 1, T)
    states = (f(D, B, P),) + ((f(D, B, H),) if cell.states == 2 else ())
    weights = (f(D, G * H, I), f(D, G * H, P), f(D, G * H), f(D, G * H))
    if cell.proj:
        weights += (f(D, P, H) if kind == "lstm_proj" else None,)
    options = (kind.split("_")[1],) if cell.options else ()
    tail = () if layout != "padded" else (False,)
    name = f"{cell.name}_layer{'' if layout == 'padded' else '_ragged'}"
    *outs, ws = getattr(torch.ops.varlen_rnn, f"{name}_forward")(
        x, *index, *states, *weights, *options, *tail, True
    )
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, dtype) for o in outs]
    args = (*grads, x, *index, *states, *weights[:2], *weights[4:], outs[0], ws, *options, *tail)
    return getattr(torch.ops.varlen_rnn, f"{name}_backward").default, args, cell

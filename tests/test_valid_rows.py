"""A training call on a padded batch whose lengths live on the CPU runs as the ragged rows of its
valid positions (varlen_rnn._inputs.valid_rows, RNNBase._run_valid_rows) on the devices of
_inputs.VALID_ROWS_DEVICES (CUDA: its padded op keeps the backward's buffers for all T*B
positions). Here "cpu" is added to that set, so the same route runs through the CPU kernels on
any machine; on a GPU the CUDA cases take it as users do. The results must be those of the
padded op (the route off) and of nn + packing, outputs and every gradient; the route must be
taken exactly where valid_rows says, and leave its inputs as they were."""

import numpy as np
import pytest
import torch
from testing import (
    ALL_DEVICES,
    CELL_KINDS,
    assert_close,
    grads,
    make_cell_pair,
    make_pair,
    packed_baseline,
    tensors_of,
)

from varlen_rnn import _base, _inputs

F64 = torch.float64
T, B, I, H = 7, 5, 3, 4
LENGTHS = [7, 0, 3, 7, 1]  # unsorted, a zero-length sequence, two full ones
NN_LENGTHS = [7, 1, 3, 7, 1]


@pytest.fixture
def route(monkeypatch):
    """The route on for CPU inputs too; counts the calls that took it (route.calls)."""
    monkeypatch.setattr(_inputs, "VALID_ROWS_DEVICES", {"cpu", "cuda"})
    calls = []
    original = _base.RNNBase._run_valid_rows

    def counted(self, *args):
        calls.append(type(self).__name__)
        return original(self, *args)

    monkeypatch.setattr(_base.RNNBase, "_run_valid_rows", counted)
    return calls


def _pair(kind, device, **kw):
    if kind == "gru":
        return make_pair(I, H, dtype=F64, device=device, **kw)
    return make_cell_pair(kind, I, H, dtype=F64, device=device, **kw)


def _run(module, x, lengths, hx):
    """Outputs and the gradients of a random projection of them, for x, hx and the weights."""
    outs = tensors_of(module(x, hx, lengths=lengths))
    leaves = [x, *([hx] if isinstance(hx, torch.Tensor) else list(hx or ())), *module.parameters()]
    return outs, grads(outs, leaves)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["gru", *CELL_KINDS])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_valid_rows_match_the_padded_op_and_nn(route, device, kind, batch_first, bidirectional):
    ref, ours = _pair(
        kind, device, num_layers=2, batch_first=batch_first, bidirectional=bidirectional
    )
    g = torch.Generator().manual_seed(4)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=F64).to(device).requires_grad_()
    lengths = torch.tensor(LENGTHS)
    hx = None
    if kind != "lstm_proj":  # the states given, and their gradients checked too
        L = 2 * (2 if bidirectional else 1)
        states = [torch.randn(L, B, H, generator=g, dtype=F64).to(device) for _ in range(2)]
        states = [s.requires_grad_() for s in states]
        hx = tuple(states) if kind == "lstm" else states[0]
    x_before = x.detach().clone()
    got, got_grads = _run(ours, x, lengths, hx)
    assert route == [type(ours).__name__]
    assert torch.equal(x.detach(), x_before) and torch.equal(lengths, torch.tensor(LENGTHS))
    _inputs.VALID_ROWS_DEVICES.clear()  # the padded op
    padded, padded_grads = _run(ours, x, lengths, hx)
    assert len(route) == 1
    for a, b in zip(got + list(got_grads), padded + list(padded_grads)):
        assert_close(a, b, F64, "valid rows against the padded op")
    # nn + packing takes no zero length: against it, the same batch with one step there.
    _inputs.VALID_ROWS_DEVICES.update({"cpu", "cuda"})
    got, got_grads = _run(ours, x, torch.tensor(NN_LENGTHS), hx)
    assert len(route) == 2
    expected = tensors_of(packed_baseline(ref, x, NN_LENGTHS, hx))
    hx_leaves = [] if hx is None else list(hx if isinstance(hx, tuple) else (hx,))
    expected_grads = grads(expected, [x, *hx_leaves, *ref.parameters()])
    for a, b in zip(got + list(got_grads), expected + list(expected_grads)):
        assert_close(a, b, F64, "valid rows against nn + packing")
    # Padded positions of the output are zero, as the padded op and pad_packed_sequence leave them.
    out = got[0] if batch_first else got[0].transpose(0, 1)
    for b, n in enumerate(NN_LENGTHS):
        assert not out[b, n:].any()


@pytest.mark.parametrize(
    "as_given",
    [list, tuple, np.array, torch.tensor, lambda v: torch.tensor(v, dtype=torch.int32)],
    ids=["list", "tuple", "numpy", "int64", "int32"],
)
def test_every_host_lengths_kind_takes_the_route(route, as_given):
    _, ours = make_pair(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    ours(x, lengths=as_given(LENGTHS))[0].sum().backward()
    assert route == ["GRU"]


def test_an_unbatched_input_takes_the_route(route):
    ref, ours = make_pair(I, H, dtype=F64)
    x = torch.randn(T, I, dtype=F64, requires_grad=True)
    out, h = ours(x, lengths=[4])
    assert route == ["GRU"] and out.shape == (T, H) and not out[4:].any()
    out_r, h_r = packed_baseline(ref, x.unsqueeze(1), [4])
    assert_close(out, out_r.squeeze(1), F64)
    assert_close(h, h_r.squeeze(1), F64)


@pytest.mark.parametrize(
    "why",
    [
        "no grad",
        "inference mode",
        "nothing requires grad",
        "no lengths",
        "no padding",
        "nothing valid",
        "out of range",
        "other device",
    ],
)
def test_calls_that_keep_the_padded_op(route, why):
    """valid_rows' exclusions: no backward recorded, nothing to save (no padding, nothing
    valid), values the padded op must reject with its own error, devices not in the set."""
    _, ours = make_pair(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    lengths = LENGTHS
    if why == "no grad":
        with torch.no_grad():
            ours(x, lengths=lengths)
    elif why == "inference mode":
        with torch.inference_mode():
            ours(x, lengths=lengths)
    elif why == "nothing requires grad":
        ours.requires_grad_(False)
        ours(x.detach(), lengths=lengths)
    elif why == "no lengths":
        ours(x)
    elif why == "no padding":
        ours(x, lengths=[T] * B)
    elif why == "nothing valid":
        ours(x, lengths=[0] * B)
    elif why == "out of range":
        with pytest.raises(RuntimeError, match="lengths must be in"):  # the op's own error
            ours(x, lengths=torch.tensor([T + 1] + LENGTHS[1:]))
    else:
        _inputs.VALID_ROWS_DEVICES.discard("cpu")
        ours(x, lengths=lengths)
    assert route == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_lengths_on_the_device_keep_the_padded_op(route):
    """Lengths on the GPU would have to be read back to size the rows (a host sync)."""
    _, ours = make_pair(I, H, dtype=F64, device="cuda")
    x = torch.randn(T, B, I, dtype=F64, device="cuda", requires_grad=True)
    ours(x, lengths=torch.tensor(LENGTHS, device="cuda"))[0].sum().backward()
    assert route == []


def test_compiled_calls_keep_the_padded_op(route):
    _, ours = make_pair(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    lengths = torch.tensor(LENGTHS)
    eager = ours(x, lengths=lengths)[0]
    compiled = torch.compile(lambda x, n: ours(x, lengths=n)[0], backend="aot_eager")(x, lengths)
    assert route == ["GRU"]  # the eager call only
    assert_close(compiled, eager, F64)


def test_dropout_between_layers_on_the_valid_rows(route):
    """Dropout applies to the valid rows (as nn's packed path applies it to its packed rows):
    with p=1 every layer above the first sees zeros, deterministically."""
    ref, ours = make_pair(I, H, num_layers=2, dropout=1.0, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    out, h = ours(x, lengths=NN_LENGTHS)
    assert route == ["GRU"]
    zero_in = torch.nn.GRU(H, H, dtype=F64)
    zero_in.load_state_dict(
        {k[:-1] + "0": v for k, v in ref.state_dict().items() if k.endswith("l1")}
    )
    want, _ = packed_baseline(zero_in, torch.zeros(T, B, H, dtype=F64), NN_LENGTHS)
    assert_close(out, want, F64)

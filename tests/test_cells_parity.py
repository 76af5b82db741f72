"""varlen_rnn.LSTM / RNN against torch.nn.LSTM / RNN + pack_padded_sequence(enforce_sorted=False)
+ pad_packed_sequence: output, final states and every gradient, over the product of
configurations (tests/test_parity.py is the GRU's)."""

import itertools

import pytest
import torch
from testing import (
    ALL_DEVICES,
    CELL_KINDS,
    LENGTH_PATTERNS,
    assert_close,
    grads,
    make_cell_pair,
    packed_baseline,
    random_state,
    tensors_of,
)

import varlen_rnn

T, B, I, H = 7, 5, 4, 6
F64 = torch.float64

CONFIGS = list(itertools.product([1, 2, 3], [False, True], [False, True], [True, False]))
CONFIG_IDS = [
    f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'bf' if c[2] else 'tf'}-{'b' if c[3] else 'nob'}"
    for c in CONFIGS
]


def _check(kind, device, dtype, num_layers, bidirectional, batch_first, bias, with_hx, lengths):
    ref, ours = make_cell_pair(
        kind, I, H, num_layers, bias, batch_first, bidirectional, dtype, device
    )
    x = torch.randn(
        (B, T, I) if batch_first else (T, B, I), dtype=dtype, device=device, requires_grad=True
    )
    hx = random_state(ref, B, dtype, device) if with_hx else None
    expected = tensors_of(packed_baseline(ref, x, lengths, hx))
    got = tensors_of(ours(x, hx, lengths=torch.tensor(lengths)))
    assert len(got) == len(expected)
    for name, a, e in zip(["output", "h_n", "c_n"], got, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert_close(a, e, dtype, name)
    states = list(hx) if isinstance(hx, tuple) else [hx] if with_hx else []
    inputs = [x] + states
    g_ref = grads(expected, inputs + list(ref.parameters()))
    g = grads(got, inputs + list(ours.parameters()))
    names = ["input"] + [f"state {k}" for k in range(len(states))]
    names += [n for n, _ in ours.named_parameters()]
    assert len(g) == len(names)
    for name, a, e in zip(names, g, g_ref):
        assert_close(a, e, dtype, f"grad of {name}")


@pytest.mark.parametrize("kind", sorted(CELL_KINDS))
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_matches_nn_with_packing_f64(kind, num_layers, bidirectional, batch_first, bias, with_hx):
    lengths = LENGTH_PATTERNS["unsorted"](T, B)
    _check(kind, "cpu", F64, num_layers, bidirectional, batch_first, bias, with_hx, lengths)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", sorted(CELL_KINDS))
@pytest.mark.parametrize("pattern", sorted(LENGTH_PATTERNS))
def test_length_patterns(device, dtype, kind, pattern):
    lengths = LENGTH_PATTERNS[pattern](T, B)
    _check(kind, device, dtype, 2, True, False, True, True, lengths)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("proj_size", [1, 2, 5])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
def test_lstm_projection_sizes(device, proj_size, num_layers, bidirectional):
    """proj_size from 1 to H-1: h_0, h_n and the output are P wide, c_n stays H wide, and the
    layers above the first read D*P features."""
    torch.manual_seed(1)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, dtype=F64, device=device)
    ref = torch.nn.LSTM(I, H, proj_size=proj_size, **kwargs)
    ours = varlen_rnn.LSTM.from_torch(ref)
    lengths = [7, 1, 4, 6, 2]
    x = torch.randn(T, B, I, dtype=F64, device=device, requires_grad=True)
    hx = random_state(ref, B, F64, device)
    expected = tensors_of(packed_baseline(ref, x, lengths, hx))
    got = tensors_of(ours(x, hx, lengths=lengths))
    D = 2 if bidirectional else 1
    assert got[0].shape == (T, B, D * proj_size)
    assert got[1].shape == (num_layers * D, B, proj_size)
    assert got[2].shape == (num_layers * D, B, H)
    for name, a, e in zip(["output", "h_n", "c_n"], got, expected):
        assert_close(a, e, F64, name)
    params = [x, *hx, *ours.parameters()]
    ref_params = [x, *hx, *ref.parameters()]
    for a, e in zip(grads(got, params), grads(expected, ref_params)):
        assert_close(a, e, F64, "grad")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", sorted(CELL_KINDS))
def test_padding_is_exactly_zero_and_ignored(device, kind):
    """Positions past a length are exactly 0, and whatever the padding holds changes nothing."""
    _, ours = make_cell_pair(kind, I, H, 2, bidirectional=True, device=device)
    lengths = torch.tensor([4, 2, 7, 0, 1])
    x = torch.randn(T, B, I, dtype=F64, device=device)
    got = tensors_of(ours(x, lengths=lengths))
    mask = (torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)).to(device)
    assert (got[0][mask] == 0).all()
    x2 = x.clone()
    x2[mask] = 1e3  # different padding content
    for a, b in zip(got, tensors_of(ours(x2, lengths=lengths))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", sorted(CELL_KINDS))
def test_batched_equals_one_sequence_at_a_time(device, kind):
    ref, ours = make_cell_pair(kind, I, H, 2, bidirectional=True, device=device)
    lengths = [4, 2, 7, 1, 5]
    x = torch.randn(T, B, I, dtype=F64, device=device)
    out, *finals = tensors_of(ours(x, lengths=lengths))
    for b, L in enumerate(lengths):
        o1, *f1 = tensors_of(ref(x[:L, b]))  # unbatched nn module on the sequence alone
        assert_close(out[:L, b], o1, F64, f"row {b}")
        for f, e in zip(finals, f1):
            assert_close(f[:, b], e, F64, f"final state of row {b}")

"""What PyTorch's test/test_nn.py checks of nn.GRU, asked of varlen_rnn.GRU: argument
checks with nn.GRU's exact messages, the initial hidden state, a zero-size batch, two
backward passes over one graph, grad and gradgrad, changing dropout, and variable-length
sequences (a padded batch against each sequence run alone)."""

import pytest
import torch
from testing import ALL_DEVICES, assert_close, make_pair
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import varlen_rnn

F64 = torch.float64
SEQ, BATCH, IN, HID, LAYERS = 7, 6, 3, 5, 2


def _error(module, *args):
    with pytest.raises(Exception) as info:
        module(*args)
    return info.type, str(info.value)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "bad",
    [
        "input_size",
        "hx_batch",
        "hx_layers",
        "hx_hidden",
        "hx_rank",
        "unbatched_hx_rank",
        "input_rank",
        "input_dtype",
    ],
)
def test_argument_checks_say_what_nn_gru_says(bidirectional, bad):
    ref, ours = make_pair(IN, HID, LAYERS, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x, hx = torch.randn(SEQ, BATCH, IN, dtype=F64), torch.randn(LAYERS * D, BATCH, HID, dtype=F64)
    args = {
        "input_size": (torch.randn(SEQ, BATCH, IN + 1, dtype=F64), hx),
        "hx_batch": (x, torch.randn(LAYERS * D, BATCH + 2, HID, dtype=F64)),
        "hx_layers": (x, torch.randn(LAYERS * D + 1, BATCH, HID, dtype=F64)),
        "hx_hidden": (x, torch.randn(LAYERS * D, BATCH, HID + 1, dtype=F64)),
        "hx_rank": (x, hx[0]),
        "unbatched_hx_rank": (x[:, 0], hx),
        "input_rank": (x[None], hx),
        "input_dtype": (x.float(), hx),
    }[bad]
    assert _error(ours, *args) == _error(ref, *args)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_initial_hidden_state_none_is_zeros(device, bidirectional, batch_first):
    _, ours = make_pair(
        IN, HID, LAYERS, bidirectional=bidirectional, batch_first=batch_first, device=device
    )
    D = 2 if bidirectional else 1
    x = torch.randn((BATCH, SEQ, IN) if batch_first else (SEQ, BATCH, IN), dtype=F64, device=device)
    lengths = [7, 1, 4, 7, 2, 3]
    a = ours(x, lengths=lengths)
    b = ours(x, torch.zeros(LAYERS * D, BATCH, HID, dtype=F64, device=device), lengths)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("lengths", [None, []])
def test_zero_size_batch_runs_forward_and_backward(device, lengths):
    ref, ours = make_pair(IN, HID, LAYERS, bidirectional=True, device=device)
    x = torch.zeros(SEQ, 0, IN, dtype=F64, device=device, requires_grad=True)
    out, h = ours(x, lengths=lengths)
    out_r, h_r = ref(x)
    assert out.shape == out_r.shape == (SEQ, 0, 2 * HID) and h.shape == h_r.shape
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_an_empty_packed_sequence_is_a_zero_size_batch(device):
    """A PackedSequence with no steps (nn.GRU fails on it with an IndexError): an empty output
    and an [L*D, 0, H] h_n, as the zero-size padded batch above; backward runs."""
    _, ours = make_pair(IN, HID, LAYERS, bidirectional=True, device=device)
    data = torch.zeros(0, IN, dtype=F64, device=device, requires_grad=True)
    out, h = ours(PackedSequence(data, torch.zeros(0, dtype=torch.int64)))
    assert isinstance(out, PackedSequence) and out.data.shape == (0, 2 * HID)
    assert h.shape == (LAYERS * 2, 0, HID)
    (out.data.sum() + h.sum()).backward()
    assert data.grad.shape == data.shape


def test_backward_twice_over_a_retained_graph():
    """The second pass over the same graph adds the same gradients again."""
    ref, ours = make_pair(IN, HID, LAYERS, bidirectional=True)
    x = torch.randn(SEQ, BATCH, IN, dtype=F64, requires_grad=True)
    lengths = [7, 1, 4, 7, 2, 3]
    out, h = ours(x, lengths=lengths)
    out_r, h_r = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    firsts = []
    for loss, params in (
        (out.sum() + h.sum(), ours.parameters()),
        (out_r.data.sum() + h_r.sum(), ref.parameters()),
    ):
        params = list(params)
        x.grad = None
        loss.backward(retain_graph=True)
        once = [t.grad.clone() for t in [x, *params]]
        loss.backward()
        twice = [t.grad for t in [x, *params]]
        for a, b in zip(once, twice):
            assert_close(b, 2 * a, F64, "second backward")
        firsts.append(once)
    for a, b in zip(*firsts):
        assert_close(a, b, F64, "same gradients as nn.GRU")


@pytest.mark.parametrize("bias", [True, False])
def test_grad_and_gradgrad(bias):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(2, 3, bias=bias, dtype=F64)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    hx = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    fn = lambda x, hx: gru(x, hx, lengths=[3, 1])
    assert torch.autograd.gradcheck(fn, (x, hx))
    assert torch.autograd.gradgradcheck(fn, (x, hx))


def test_dropout_can_be_changed_between_calls():
    ref, ours = make_pair(IN, HID, 3)
    x = torch.randn(SEQ, BATCH, IN, dtype=F64)
    lengths = [7, 1, 4, 7, 2, 3]
    for p in (0.0, 1.0, 0.0):  # p=0 and p=1 are deterministic, so nn.GRU's numbers are ours
        ref.dropout = ours.dropout = p
        out, h = ours(x, lengths=lengths)
        out_r, h_r = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
        assert_close(h, h_r, F64, f"h_n with dropout={p}")
        assert_close(
            pack_padded_sequence(out, lengths, enforce_sorted=False).data,
            out_r.data,
            F64,
            f"output with dropout={p}",
        )


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_variable_sequence_batch_equals_each_sequence_alone(
    device, num_layers, bidirectional, batch_first
):
    _, ours = make_pair(
        IN, HID, num_layers, bidirectional=bidirectional, batch_first=batch_first, device=device
    )
    lengths = [3, 7, 1, 5, 7, 2]
    seqs = [torch.randn(L, IN, dtype=F64, device=device, requires_grad=True) for L in lengths]
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=batch_first)
    out, h = ours(padded, lengths=lengths)
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(out.shape, generator=g, dtype=F64).to(device)
    batch_grads = torch.autograd.grad((out * weights).sum() + h.sum(), seqs)
    for b, (s, L) in enumerate(zip(seqs, lengths)):
        alone_out, alone_h = ours(s.unsqueeze(0 if batch_first else 1))
        row = out[b, :L] if batch_first else out[:L, b]
        assert_close(row, alone_out.squeeze(0 if batch_first else 1), F64, "output")
        assert_close(h[:, b], alone_h[:, 0], F64, "h_n")
        w = weights[b, :L] if batch_first else weights[:L, b]
        (alone_grad,) = torch.autograd.grad(
            (alone_out.squeeze(0 if batch_first else 1) * w).sum() + alone_h.sum(), s
        )
        assert_close(batch_grads[b], alone_grad, F64, "input gradient")
        assert not (out[b, L:] if batch_first else out[L:, b]).any()

"""The module as a drop-in for torch.nn.GRU: parameters, state_dict, PackedSequence,
unbatched input, zero lengths, empty batches, dropout, convert()."""

import pytest
import torch
from testing import ALL_DEVICES, assert_close, grads, make_pair
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import varlen_rnn
from varlen_rnn.reference import gru_reference

F64 = torch.float64


def test_same_init_names_shapes_and_state_dict_both_ways():
    torch.manual_seed(3)
    ref = nn.GRU(4, 6, num_layers=3, bidirectional=True, bias=False)
    torch.manual_seed(3)
    ours = varlen_rnn.GRU(4, 6, num_layers=3, bidirectional=True, bias=False)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same initialisation from the same seed
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    other = nn.GRU(4, 6, num_layers=3, bidirectional=True, bias=False)
    ours.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), other.parameters()))
    assert repr(ours).replace("GRU", "") == repr(ref).replace("GRU", "")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_in_packed_sequence_out(device, enforce_sorted, bidirectional):
    ref, ours = make_pair(3, 4, 2, bidirectional=bidirectional, device=device)
    lengths = [6, 4, 4, 1] if enforce_sorted else [4, 1, 6, 4]
    seqs = [torch.randn(L, 3, dtype=F64, device=device, requires_grad=True) for L in lengths]
    packed = pack_padded_sequence(pad_sequence(seqs), lengths, enforce_sorted=enforce_sorted)
    hx = torch.randn(2 * (1 + bidirectional), 4, 4, dtype=F64, device=device)
    out_r, h_r = ref(packed, hx)
    out, h = ours(packed, hx)
    assert type(out) is type(out_r)
    assert torch.equal(out.batch_sizes, out_r.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out, name), getattr(out_r, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert_close(out.data, out_r.data, F64, "data")
    assert_close(h, h_r, F64, "h_n")
    g = grads([out.data, h], seqs)
    g_r = grads([out_r.data, h_r], seqs)
    for a, b in zip(g, g_r):
        assert_close(a, b, F64, "grad")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(device, batch_first):
    ref, ours = make_pair(3, 4, 2, batch_first=batch_first, bidirectional=True, device=device)
    x = torch.randn(5, 3, dtype=F64, device=device)
    hx = torch.randn(4, 4, dtype=F64, device=device)
    out_r, h_r = ref(x, hx)
    out, h = ours(x, hx)
    assert_close(out, out_r, F64, "output")
    assert_close(h, h_r, F64, "h_n")
    out3, h3 = ours(x, hx, lengths=[3])
    assert_close(out3[:3], ref(x[:3], hx)[0], F64, "short output")
    assert (out3[3:] == 0).all()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_lengths_match_reference(device, bidirectional, batch_first):
    """nn.GRU refuses zero lengths; the plain-PyTorch reference defines them: output 0, h_n = hx."""
    _, ours = make_pair(
        3, 4, 2, bidirectional=bidirectional, batch_first=batch_first, device=device
    )
    D = 2 if bidirectional else 1
    lengths = [0, 5, 0, 2, 7]
    x = torch.randn(
        (5, 7, 3) if batch_first else (7, 5, 3), dtype=F64, device=device, requires_grad=True
    )
    hx = torch.randn(2 * D, 5, 4, dtype=F64, device=device, requires_grad=True)
    out, h = ours(x, hx, lengths=lengths)
    out_r, h_r = gru_reference(ours, x, hx, lengths)
    assert_close(out, out_r, F64, "output")
    assert_close(h, h_r, F64, "h_n")
    by_row = out if batch_first else out.transpose(0, 1)  # [B, T, D*H]
    assert not by_row[[0, 2]].any()  # the zero-length rows' outputs are 0
    assert torch.equal(h[:, 0], hx[:, 0]) and torch.equal(h[:, 2], hx[:, 2])
    params = [x, hx] + list(ours.parameters())
    for a, b in zip(grads([out, h], params), grads([out_r, h_r], params)):
        assert_close(a, b, F64, "grad")


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_reference_agrees_with_nn_gru(device):
    """The oracle itself is checked against torch.nn.GRU + packing."""
    from testing import packed_baseline

    ref, ours = make_pair(3, 4, 2, bidirectional=True, device=device)
    x = torch.randn(6, 3, 3, dtype=F64, device=device)
    lengths = [2, 6, 3]
    out_r, h_r = packed_baseline(ref, x, lengths)
    out, h = gru_reference(ours, x, None, lengths)
    assert_close(out, out_r, F64, "output")
    assert_close(h, h_r, F64, "h_n")


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_empty_batch_and_empty_time(device):
    _, ours = make_pair(3, 4, 2, bidirectional=True, device=device)
    ref = nn.GRU(3, 4, 2, bidirectional=True, dtype=F64, device=device)
    x = torch.randn(5, 0, 3, dtype=F64, device=device)
    out, h = ours(x)
    out_r, h_r = ref(x)
    assert out.shape == out_r.shape and h.shape == h_r.shape
    # T = 0 (nn.GRU refuses it): defined as empty output and h_n = hx.
    hx = torch.randn(4, 2, 4, dtype=F64, device=device)
    out, h = ours(torch.randn(0, 2, 3, dtype=F64, device=device), hx, lengths=[0, 0])
    assert out.shape == (0, 2, 8) and torch.equal(h, hx)


def test_dropout_between_layers():
    torch.manual_seed(0)
    ref, ours = make_pair(3, 4, 3, dropout=1.0)  # p=1 zeroes every inter-layer input: deterministic
    ref.train(), ours.train()
    x = torch.randn(6, 2, 3, dtype=F64)
    lengths = [6, 3]
    from testing import packed_baseline

    out_r, h_r = packed_baseline(ref, x, lengths)
    out, h = ours(x, lengths=lengths)
    assert_close(out, out_r, F64, "output")
    assert_close(h, h_r, F64, "h_n")
    _, ours = make_pair(3, 4, 2, dropout=0.5)
    a, _ = ours(x, lengths=lengths)
    b, _ = ours(x, lengths=lengths)
    assert not torch.equal(a, b)  # training mode draws new masks
    ours.eval()
    a, _ = ours(x, lengths=lengths)
    b, _ = ours(x, lengths=lengths)
    assert torch.equal(a, b)  # eval mode is deterministic


def test_convert_swaps_every_gru_with_the_same_weights():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(3, 3))
            self.rnn = nn.GRU(3, 5, 2, batch_first=True, bidirectional=True, dtype=F64)
            self.inner = nn.ModuleDict({"g": nn.GRU(10, 2, dtype=F64)})

    m = Model().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = varlen_rnn.convert(m)
    assert out is m
    assert isinstance(m.rnn, varlen_rnn.GRU) and isinstance(m.inner["g"], varlen_rnn.GRU)
    assert not m.rnn.training and m.rnn.batch_first and m.rnn.bidirectional
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.rnn.weight_ih_l0.dtype == F64
    single = varlen_rnn.convert(nn.GRU(2, 3))
    assert isinstance(single, varlen_rnn.GRU)


def test_readme_example_unsorted_lengths_labels_untouched():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 5, padding_idx=0)
    gru = varlen_rnn.GRU(5, 8, batch_first=True)
    tokens = torch.tensor(
        [[1, 2, 3, 4, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0, 0, 0], [7, 8, 9, 1, 2, 3, 4, 5]]
    )
    lengths = [4, 2, 8]
    out, h_n = gru(emb(tokens), lengths=lengths)
    for b, L in enumerate(lengths):  # h_n is row b's state after its own last token
        assert torch.allclose(h_n[0, b], out[b, L - 1])
        _, h1 = gru(emb(tokens[b : b + 1, :L]))
        assert torch.allclose(h_n[0, b], h1[0, 0], atol=1e-6)


@pytest.mark.parametrize("bidirectional,bias", [(False, True), (True, False)])
def test_layer_weights_are_the_named_parameters_stacked(bidirectional, bias):
    gru = varlen_rnn.GRU(3, 4, num_layers=2, bidirectional=bidirectional, bias=bias, dtype=F64)
    D = gru.num_directions
    assert D == (2 if bidirectional else 1)
    w = gru._layer_weights(1, F64)
    sfx = ["l1", "l1_reverse"][:D]
    for field, name in [
        ("w_ih", "weight_ih"),
        ("w_hh", "weight_hh"),
        ("b_ih", "bias_ih"),
        ("b_hh", "bias_hh"),
    ]:
        got = getattr(w, field)
        if not bias and name.startswith("bias"):
            assert got is None
            continue
        assert torch.equal(got, torch.stack([getattr(gru, f"{name}_{s}") for s in sfx]))
    assert w.w_ih.shape == (D, 12, 4 * D)
    if D == 1:  # one direction: a view of the parameter, no copy per forward
        assert w.w_hh.data_ptr() == gru.weight_hh_l1.data_ptr()


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (varlen_rnn.GRU, {}),
        (varlen_rnn.LSTM, {}),
        (varlen_rnn.LSTM, {"proj_size": 3}),
        (varlen_rnn.RNN, {"nonlinearity": "relu"}),
    ],
    ids=["gru", "lstm", "lstm_proj", "rnn_relu"],
)
@pytest.mark.parametrize("given", ["nothing", "lengths", "packed"])
def test_meta_device_forward_and_backward_like_nn(cls, kwargs, given):
    """On the meta device (shape inference with no data: models built there before their
    weights load) our module runs forward and backward as torch.nn's does, with the same
    output and gradient shapes."""
    config = dict(num_layers=2, bidirectional=True, batch_first=True, device="meta", **kwargs)
    results = []
    for module in (cls._torch_cls(5, 6, **config), cls(5, 6, **config)):
        x = torch.randn(4, 7, 5, device="meta", requires_grad=True)
        if given == "packed":
            cpu = pack_padded_sequence(
                torch.randn(4, 7, 5), [7, 2, 5, 1], batch_first=True, enforce_sorted=False
            )
            meta = cpu.to("meta")  # data and indices; batch_sizes stays on the CPU
            args, kw = (meta._replace(data=meta.data.requires_grad_()),), {}
        elif given == "lengths" and module.__class__ is cls:
            args, kw = (x,), {"lengths": torch.tensor([7, 0, 3, 5], device="meta")}
        else:
            args, kw = (x,), {}
        out, state = module(*args, **kw)
        out = out.data if given == "packed" else out
        states = state if isinstance(state, tuple) else (state,)
        loss = out.sum() + sum(s.sum() for s in states)
        leaves = [args[0].data if given == "packed" else x, *module.parameters()]
        found = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([t.device.type for t in (out, *states, *found) if t is not None])
        results.append([tuple(t.shape) for t in (out, *states)])
        results.append([None if g is None else tuple(g.shape) for g in found])
    assert results[0] == results[3] and set(results[0]) == {"meta"}
    assert results[1] == results[4]
    assert results[2] == results[5]

"""varlen_rnn.LSTM and RNN as drop-ins for torch.nn.LSTM and RNN: construction (names, shapes,
initialisation, state_dict, repr, errors), PackedSequence, unbatched input, zero lengths,
nested tensors, dropout, from_torch and convert (tests/test_module.py is the GRU's)."""

import io
import pickle

import pytest
import torch
from testing import (
    ALL_DEVICES,
    CELL_KINDS,
    assert_close,
    grads,
    make_cell_pair,
    packed_baseline,
    random_state,
    tensors_of,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import varlen_rnn

F64 = torch.float64
KINDS = sorted(CELL_KINDS)


def _twin_classes(kind):
    nn_cls, extra = CELL_KINDS[kind]
    return nn_cls, getattr(varlen_rnn, nn_cls.__name__), extra


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_same_init_names_shapes_and_state_dict_both_ways(kind, bias):
    nn_cls, cls, extra = _twin_classes(kind)
    kwargs = dict(num_layers=3, bidirectional=True, bias=bias, **extra(6))
    torch.manual_seed(3)
    ref = nn_cls(4, 6, **kwargs)
    torch.manual_seed(3)
    ours = cls(4, 6, **kwargs)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same initialisation from the same seed
    if kind == "lstm_proj":
        assert "weight_hr_l2_reverse" in a and a["weight_hr_l2_reverse"].shape == (3, 6)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    assert ours.mode == ref.mode and getattr(ours, "nonlinearity", None) == getattr(
        ref, "nonlinearity", None
    )
    other = nn_cls(4, 6, **kwargs)
    ours.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), other.parameters()))
    assert repr(ours) == repr(ref) and str(ours) == str(ref)


# Constructor arguments torch.nn refuses; each is tried on nn's class and ours, which must
# raise the same exception type with the same message.
BAD_CONSTRUCTORS = [
    dict(input_size=0),
    dict(hidden_size=0),
    dict(hidden_size=2.5),
    dict(input_size="3"),
    dict(num_layers=0),
    dict(dropout=1.5),
    dict(dropout=True),
    dict(bias=1),
    dict(batch_first="yes"),
    dict(proj_size=-1),
    dict(proj_size=4),
    dict(proj_size=9),
    dict(nonlinearity="sigmoid"),
    dict(proj_size=2, nonlinearity="relu"),
]


# nn.LSTM takes no nonlinearity at all (a TypeError of Python's own): those cases are RNN-only.
CONSTRUCTOR_CASES = [
    (nn_cls, bad)
    for nn_cls in (nn.LSTM, nn.RNN)
    for bad in BAD_CONSTRUCTORS
    if not (nn_cls is nn.LSTM and "nonlinearity" in bad)
]


@pytest.mark.parametrize(
    "nn_cls,bad",
    CONSTRUCTOR_CASES,
    ids=[f"{c.__name__}-" + "-".join(map(str, b.items())) for c, b in CONSTRUCTOR_CASES],
)
def test_constructor_errors_are_torch_nns(nn_cls, bad):
    kwargs = {"input_size": 3, "hidden_size": 4, **bad}
    with pytest.raises(Exception) as expected:
        nn_cls(**kwargs)
    with pytest.raises(expected.type) as got:
        getattr(varlen_rnn, nn_cls.__name__)(**kwargs)
    assert str(got.value) == str(expected.value)


def test_positional_arguments_are_torch_nns():
    """nn.RNN's fourth positional argument is nonlinearity, nn.LSTM's eighth proj_size."""
    rnn = varlen_rnn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    ref = nn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert repr(rnn) == repr(ref) and rnn.nonlinearity == "relu" and rnn.mode == "RNN_RELU"
    lstm = varlen_rnn.LSTM(3, 4, 2, False, True, 0.0, True, 2)
    assert repr(lstm) == repr(nn.LSTM(3, 4, 2, False, True, 0.0, True, 2))


# cx_shape only where there is a cell state (the LSTM kinds).
FORWARD_CASES = [
    (kind, bad)
    for kind in KINDS
    for bad in [
        "rank4",
        "features",
        "hx_shape",
        "hx_rank",
        "unbatched_hx_rank",
        "dtype",
        "cx_shape",
    ]
    if bad != "cx_shape" or kind.startswith("lstm")
]


@pytest.mark.parametrize("kind,bad", FORWARD_CASES, ids=[f"{k}-{b}" for k, b in FORWARD_CASES])
def test_forward_errors_are_torch_nns(kind, bad):
    """The same exception type and message as nn's module on the same bad call."""
    ref, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=F64)
    hx = random_state(ref, 2, requires_grad=False)
    lstm = isinstance(hx, tuple)
    h, c = hx if lstm else (hx, None)
    args = {
        "rank4": lambda: (x.unsqueeze(0), None),
        "features": lambda: (torch.randn(5, 2, 7, dtype=F64), None),
        "hx_shape": lambda: (x, (h[:, :1], c) if lstm else h[:, :1]),
        "hx_rank": lambda: (x, (h[0], c) if lstm else h[0]),
        "unbatched_hx_rank": lambda: (x[:, 0], (h, c[:, 0]) if lstm else h),
        "dtype": lambda: (x.float(), None),
        "cx_shape": lambda: (x, (h, c[:3])),
    }[bad]()
    with pytest.raises(Exception) as expected:
        ref(*args)
    with pytest.raises(expected.type) as got:
        ours(*args)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kind", ["gru", *KINDS])
def test_public_attributes_and_helpers_are_torch_nns(kind):
    """Every public name of nn's module exists on ours, and nn.RNNBase's checking helpers
    (check_forward_args, check_input, get_expected_hidden_size, check_hidden_size,
    permute_hidden; the LSTM's get_expected_cell_size) return and raise what nn's do, for
    padded and packed input, so code written against nn's modules runs unchanged."""
    ref, ours = _two_layer_bidirectional_pair(kind, "cpu")

    def public(m):
        return {n for n in dir(m) if not n.startswith("_")}

    assert public(ref) - public(ours) == set()
    hx = random_state(ref, 2, requires_grad=False, seed=2)
    lstm = isinstance(hx, tuple)
    h, c = hx if lstm else (hx, None)
    x = torch.randn(5, 2, 3, dtype=F64)
    packed = pack_padded_sequence(x, [5, 3], enforce_sorted=False)
    order = torch.tensor([1, 0])
    for inp, sizes in ((x, None), (packed.data, packed.batch_sizes)):
        assert ours.get_expected_hidden_size(inp, sizes) == ref.get_expected_hidden_size(inp, sizes)
        if lstm:
            got = ours.get_expected_cell_size(inp, sizes)
            assert got == ref.get_expected_cell_size(inp, sizes) == (4, 2, 4)
        assert ours.check_forward_args(inp, hx, sizes) is None
    expected = ref.permute_hidden(hx, order)
    got = ours.permute_hidden(hx, order)
    for g, e in zip(got if lstm else [got], expected if lstm else [expected], strict=True):
        assert torch.equal(g, e)
    assert ours.permute_hidden(hx, None) is hx
    bad_calls = [
        lambda m: m.check_forward_args(x, (h[:, :1], c) if lstm else h[:, :1], None),
        lambda m: m.check_forward_args(x, hx, packed.batch_sizes),  # rank 3 with batch_sizes
        lambda m: m.check_input(torch.randn(5, 2, 7, dtype=F64), None),
        lambda m: m.check_input(x.float(), None),
        lambda m: m.check_hidden_size(h, (1, 2, 3)),
    ]
    if lstm:
        bad_calls.append(lambda m: m.check_forward_args(x, (h, c[:3]), None))
    for call in bad_calls:
        with pytest.raises(Exception) as want:
            call(ref)
        with pytest.raises(want.type) as got:
            call(ours)
        assert str(got.value) == str(want.value)


def test_isinstance_checks_name_varlen_rnn_rnnbase():
    """Ours are not subclasses of nn's (torch.compile refuses any nn.RNN/GRU/LSTM instance
    unless torch._dynamo.config.allow_rnn): code that dispatches on nn.RNNBase can add
    varlen_rnn.RNNBase, the base of all three."""
    for cls in (varlen_rnn.GRU, varlen_rnn.LSTM, varlen_rnn.RNN):
        m = cls(3, 4)
        assert isinstance(m, varlen_rnn.RNNBase) and not isinstance(m, nn.RNNBase)
    assert not isinstance(nn.GRU(3, 4), varlen_rnn.RNNBase)
    assert "RNNBase" in varlen_rnn.__all__


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_in_packed_sequence_out(device, kind, enforce_sorted):
    ref, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True, device=device)
    lengths = [6, 4, 4, 1] if enforce_sorted else [4, 1, 6, 4]
    seqs = [torch.randn(L, 3, dtype=F64, device=device, requires_grad=True) for L in lengths]
    packed = pack_padded_sequence(pad_sequence(seqs), lengths, enforce_sorted=enforce_sorted)
    hx = random_state(ref, 4, device=device, requires_grad=False)
    out_r, st_r = ref(packed, hx)
    out, st = ours(packed, hx)
    assert type(out) is type(out_r) and type(st) is type(st_r)
    assert torch.equal(out.batch_sizes, out_r.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out, name), getattr(out_r, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    got, expected = tensors_of((out.data, st)), tensors_of((out_r.data, st_r))
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, F64, "packed")
    for a, b in zip(grads(got, seqs), grads(expected, seqs)):
        assert_close(a, b, F64, "grad")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(device, kind, batch_first):
    ref, ours = make_cell_pair(
        kind, 3, 4, 2, batch_first=batch_first, bidirectional=True, device=device
    )
    x = torch.randn(5, 3, dtype=F64, device=device)
    hx = random_state(ref, 1, device=device, requires_grad=False)
    hx = tuple(s[:, 0] for s in hx) if isinstance(hx, tuple) else hx[:, 0]
    for a, b in zip(tensors_of(ours(x, hx)), tensors_of(ref(x, hx)), strict=True):
        assert a.shape == b.shape
        assert_close(a, b, F64, "unbatched")
    short = tensors_of(ours(x, hx, lengths=[3]))
    assert_close(short[0][:3], ref(x[:3], hx)[0], F64, "short output")
    assert (short[0][3:] == 0).all()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_length_rows(device, kind, batch_first):
    """nn refuses zero lengths; ours: output 0, final states = the initial ones, and the
    other rows exactly what nn + packing gives for them alone."""
    ref, ours = make_cell_pair(
        kind, 3, 4, 2, batch_first=batch_first, bidirectional=True, device=device
    )
    lengths = [0, 5, 0, 2, 7]
    x = torch.randn((5, 7, 3) if batch_first else (7, 5, 3), dtype=F64, device=device)
    x.requires_grad_()
    hx = random_state(ref, 5, device=device)
    out, *finals = tensors_of(ours(x, hx, lengths=lengths))
    by_row = out if batch_first else out.transpose(0, 1)  # [B, T, D*P]
    assert not by_row[[0, 2]].any()
    states = list(hx) if isinstance(hx, tuple) else [hx]
    for f, s in zip(finals, states, strict=True):
        assert torch.equal(f[:, [0, 2]], s[:, [0, 2]])
    keep = [1, 3, 4]
    sub = (lambda t: t[keep]) if batch_first else (lambda t: t[:, keep])
    sub_hx = tuple(s[:, keep] for s in states)
    sub_hx = sub_hx if len(sub_hx) == 2 else sub_hx[0]
    out_r, *fin_r = tensors_of(packed_baseline(ref, sub(x), [5, 2, 7], sub_hx))
    assert_close(sub(out), out_r, F64, "output of the other rows")
    for f, e in zip(finals, fin_r):
        assert_close(f[:, keep], e, F64, "final states of the other rows")
    loss_rows = [sub(out), *(f[:, keep] for f in finals)]
    for a, b in zip(grads(loss_rows, [x]), grads([out_r, *fin_r], [x])):
        assert_close(a, b, F64, "grad of input")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_nested_tensor_input(device, kind):
    """A jagged nested tensor (a zero-length component included) runs the ragged ops and
    gives what padded input + lengths gives."""
    _, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True, device=device)
    lengths = [4, 0, 6, 1]
    seqs = [torch.randn(L, 3, dtype=F64, device=device) for L in lengths]
    values = torch.cat(seqs).requires_grad_()
    offsets = torch.tensor([0, 4, 4, 10, 11], device=device)
    nt = torch.nested.nested_tensor_from_jagged(values, offsets)
    hx = random_state(ours, 4, device=device)
    out_nt, st = ours(nt, hx)
    assert out_nt.is_nested and out_nt.offsets() is offsets
    padded = pad_sequence(seqs, batch_first=True).requires_grad_()
    out_p, st_p = ours(padded.transpose(0, 1), hx, lengths=lengths)
    rows = torch.cat([out_p[:L, b] for b, L in enumerate(lengths)])
    got, expected = tensors_of((out_nt.values(), st)), tensors_of((rows, st_p))
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, F64, "nested")
    (g,) = grads(got, [values])
    (g_p,) = grads(expected, [padded])
    assert_close(g, torch.cat([g_p[b, :L] for b, L in enumerate(lengths)]), F64, "grad")


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_between_layers(kind):
    ref, ours = make_cell_pair(kind, 3, 4, 3, dropout=1.0)  # p=1: deterministic zeros
    x = torch.randn(6, 2, 3, dtype=F64)
    lengths = [6, 3]
    for a, b in zip(
        tensors_of(ours(x, lengths=lengths)), tensors_of(packed_baseline(ref, x, lengths))
    ):
        assert_close(a, b, F64, "dropout=1")
    _, ours = make_cell_pair(kind, 3, 4, 2, dropout=0.5)
    assert not torch.equal(ours(x, lengths=lengths)[0], ours(x, lengths=lengths)[0])
    ours.eval()
    assert torch.equal(ours(x, lengths=lengths)[0], ours(x, lengths=lengths)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_and_pickle(kind):
    nn_cls, cls, extra = _twin_classes(kind)
    ref = nn_cls(3, 4, 2, batch_first=True, bidirectional=True, dtype=F64, **extra(4)).eval()
    ours = cls.from_torch(ref)
    assert type(ours) is cls and not ours.training and repr(ours) == repr(ref)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    x = torch.randn(2, 5, 3, dtype=F64)
    for copy in (pickle.loads(pickle.dumps(ours)), _saved_and_loaded(ours)):
        assert type(copy) is cls
        for a, b in zip(tensors_of(copy(x)), tensors_of(ours(x))):
            assert torch.equal(a, b)
    with pytest.raises(TypeError, match=f"from_torch expects a torch.nn.{nn_cls.__name__}"):
        cls.from_torch(nn.GRU(3, 4))


def _saved_and_loaded(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_convert_swaps_every_gru_lstm_and_rnn():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 5, dtype=F64)
            self.lstm = nn.LSTM(3, 5, 2, batch_first=True, proj_size=2, dtype=F64)
            self.inner = nn.ModuleDict({"rnn": nn.RNN(10, 2, nonlinearity="relu", dtype=F64)})
            self.head = nn.Linear(2, 1)

    m = Model().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert varlen_rnn.convert(m) is m
    assert type(m.gru) is varlen_rnn.GRU and type(m.lstm) is varlen_rnn.LSTM
    assert type(m.inner["rnn"]) is varlen_rnn.RNN and m.inner["rnn"].nonlinearity == "relu"
    assert m.lstm.proj_size == 2 and m.lstm.batch_first and not m.lstm.training
    assert type(m.head) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert type(varlen_rnn.convert(nn.LSTM(2, 3))) is varlen_rnn.LSTM
    assert type(varlen_rnn.convert(nn.RNN(2, 3))) is varlen_rnn.RNN


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_and_empty_time(kind):
    """B = 0 gives nn's empty shapes; T = 0 (nn refuses it) an empty output and the initial
    states back."""
    ref, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=F64)
    for a, b in zip(tensors_of(ours(x)), tensors_of(ref(x)), strict=True):
        assert a.shape == b.shape
    hx = random_state(ref, 2, requires_grad=False)
    out, *finals = tensors_of(ours(torch.randn(0, 2, 3, dtype=F64), hx, lengths=[0, 0]))
    assert out.shape == (0, 2, 2 * (ref.proj_size or 4))
    for f, s in zip(finals, hx if isinstance(hx, tuple) else (hx,), strict=True):
        assert torch.equal(f, s)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_never_modified_and_layouts_do_not_matter(kind):
    """Non-contiguous input and states give the contiguous results, forward and backward,
    and nothing the caller passed is written to."""
    _, ours = make_cell_pair(kind, 3, 4, 2, bidirectional=True)
    lengths = torch.tensor([5, 2, 0, 4])
    x = torch.randn(4, 5, 3, dtype=F64).transpose(0, 1).requires_grad_()  # [T, B, I] view
    hx = random_state(ours, 4, requires_grad=False)
    states = hx if isinstance(hx, tuple) else (hx,)
    strided = tuple(s.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for s in states)
    assert not x.is_contiguous() and not any(s.is_contiguous() for s in strided)
    before = [t.clone() for t in (x, lengths, *strided)]
    arg = strided if len(strided) == 2 else strided[0]
    got = tensors_of(ours(x, arg, lengths=lengths))
    dense = [t.detach().contiguous().requires_grad_() for t in (x, *strided)]
    arg = tuple(dense[1:]) if len(dense) == 3 else dense[1]
    expected = tensors_of(ours(dense[0], arg, lengths=lengths))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads(got, [x, *strided]), grads(expected, dense)):
        assert torch.equal(a, b)
    for t, b in zip((x, lengths, *strided), before):
        assert torch.equal(t, b)


def test_lstm_hx_must_be_a_pair():
    """nn.LSTM indexes whatever it is given; a lone tensor is refused by name here."""
    lstm = varlen_rnn.LSTM(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\) for an LSTM, got Tensor"):
        lstm(x, torch.zeros(1, 2, 4, dtype=F64))
    with pytest.raises(TypeError, match=r"got tuple of length 3"):
        lstm(x, (torch.zeros(1, 2, 4, dtype=F64),) * 3)


class _WeightDrop(nn.Module):
    """AWD-LSTM's DropConnect on the recurrent weights, as a parametrization: a fixed random
    mask (fixed so that both twins see the same one), scaled as dropout scales."""

    def __init__(self, shape, p=0.3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("mask", (torch.rand(shape, generator=g) > p).double() / (1 - p))

    def forward(self, w):
        return w * self.mask.to(w)


def _two_layer_bidirectional_pair(kind, device):
    """nn's module and ours, I=3 H=4, 2 layers, bidirectional, float64, the same weights; kind:
    "gru" or one of CELL_KINDS."""
    if kind != "gru":
        return make_cell_pair(kind, 3, 4, 2, bidirectional=True, device=device)
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64, device=device)
    ours = varlen_rnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64, device=device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["gru", *KINDS])
def test_weight_parametrizations(device, kind):
    """What RNN users put on recurrent weights — weight_norm and a weight-drop mask through
    torch.nn.utils.parametrize — gives nn + packing's outputs and gradients (float64), with
    the same parameter names, so optimizers and state_dicts carry over."""
    from torch.nn.utils import parametrizations, parametrize

    ref, ours = _two_layer_bidirectional_pair(kind, device)
    for m in (ref, ours):
        parametrizations.weight_norm(m, "weight_hh_l0")
        drop = _WeightDrop(m.weight_hh_l1_reverse.shape).to(device)
        parametrize.register_parametrization(m, "weight_hh_l1_reverse", drop)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    lengths = [5, 2, 7, 1]
    x = torch.randn(7, 4, 3, dtype=F64, device=device, requires_grad=True)
    hx = random_state(ref, 4, device=device, seed=1)
    got = tensors_of(ours(x, hx, lengths=lengths))
    expected = tensors_of(packed_baseline(ref, x, lengths, hx))
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, F64, "outputs")
    names = ["input", *(n for n, _ in ref.named_parameters())]
    got_grads = grads(got, [x, *ours.parameters()])
    expected_grads = grads(expected, [x, *ref.parameters()])
    for name, a, b in zip(names, got_grads, expected_grads, strict=True):
        assert_close(a, b, F64, f"grad of {name}")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["gru", *KINDS])
def test_tied_weights(device, kind):
    """One Parameter assigned to two of a module's weights (a layer's recurrent weights shared
    with the next layer's, a direction's bias with the other's), as users tie them on nn's
    RNNs: the outputs and the tied parameter's gradient (the sum of its uses) are nn +
    packing's (float64), it is one parameter to the optimizer, and after an SGD step both uses
    still see the one updated tensor."""
    ref, ours = _two_layer_bidirectional_pair(kind, device)
    for m in (ref, ours):
        m.weight_hh_l1 = m.weight_hh_l0
        m.bias_ih_l0_reverse = m.bias_ih_l0
    assert ours.weight_hh_l1 is ours.weight_hh_l0
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == names
    assert "weight_hh_l1" not in names  # the tied one is listed once, under its first name
    lengths = [5, 2, 7, 1]
    x = torch.randn(7, 4, 3, dtype=F64, device=device)
    hx = random_state(ref, 4, device=device, seed=1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, ours)]
    for _ in range(2):  # a second forward sees the step's update through both uses
        got = tensors_of(ours(x, hx, lengths=lengths))
        expected = tensors_of(packed_baseline(ref, x, lengths, hx))
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e, F64, "outputs")
        for opt in opts:
            opt.zero_grad()
        loss_weights = torch.Generator().manual_seed(2)
        for outs in (got, expected):
            w = [torch.randn(o.shape, generator=loss_weights, dtype=F64).to(device) for o in outs]
            loss_weights.manual_seed(2)
            sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
            assert_close(a.grad, b.grad, F64, f"grad of {name}")
        for opt in opts:
            opt.step()
        assert ours.weight_hh_l1 is ours.weight_hh_l0

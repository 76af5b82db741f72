"""Bad inputs raise a clear error that names the argument; inputs are never modified."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import varlen_rnn

T, B, I, H = 6, 3, 4, 5


@pytest.fixture
def gru():
    torch.manual_seed(0)
    return varlen_rnn.GRU(I, H, num_layers=2)


def x_():
    return torch.randn(T, B, I)


@pytest.mark.parametrize(
    "lengths,exc,match",
    [
        ([2, 7, 1], (ValueError, RuntimeError), r"lengths must be in \[0, T\] with T=6, got lengths\[1\]=7"),
        ([2, -1, 1], (ValueError, RuntimeError), r"lengths must be in \[0, T\].*lengths\[1\]=-1"),
        (torch.tensor([2, 7, 1]), RuntimeError, r"lengths must be in \[0, T\] with T=6.*lengths\[1\]=7"),
        (torch.tensor([2, -3, 1]), RuntimeError, r"lengths must be in \[0, T\].*lengths\[1\]=-3"),
        ([2, 3], ValueError, r"lengths must have one entry per sequence \(B=3\), got 2"),
        (torch.tensor([2, 3]), ValueError, r"lengths must be 1-D with one entry per sequence \(B=3\)"),
        (torch.tensor([[2, 3, 1]]), ValueError, r"lengths must be 1-D"),
        (torch.tensor([2.0, 3.0, 1.0]), TypeError, r"lengths must be an integer tensor"),
        ([2.0, 3, 1], TypeError, r"lengths must be a list of ints"),
        ("abc", TypeError, r"lengths must be a list of ints"),
    ],
)
def test_bad_lengths(gru, lengths, exc, match):
    with pytest.raises(exc, match=match):
        gru(x_(), lengths=lengths)


def test_int32_lengths_and_lengths_on_cpu_are_accepted(gru):
    x = x_()
    a, _ = gru(x, lengths=torch.tensor([2, 6, 1], dtype=torch.int32))
    b, _ = gru(x, lengths=[2, 6, 1])
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4, 4)])
def test_input_rank(gru, shape):
    with pytest.raises(ValueError, match=r"Expected input to be 2D or 3D, got \dD"):
        gru(torch.randn(shape))


def test_wrong_feature_size(gru):
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 4, got 7"):
        gru(torch.randn(T, B, 7))


@pytest.mark.parametrize("hx_shape,match", [
    ((2, B, H + 1), r"Expected hidden size \(2, 3, 5\), got \[2, 3, 6\]"),
    ((1, B, H), r"Expected hidden size \(2, 3, 5\), got \[1, 3, 5\]"),
    ((2, H), r"For batched 3-D input, hx should also be 3-D but got 2-D"),
])
def test_hx_wrong_shape(gru, hx_shape, match):
    with pytest.raises(RuntimeError, match=match):
        gru(x_(), torch.randn(hx_shape))


def test_unbatched_hx_must_be_2d(gru):
    with pytest.raises(RuntimeError, match=r"For unbatched 2-D input, hx should also be 2-D"):
        gru(torch.randn(T, I), torch.randn(2, 1, H))


def test_dtype_mismatch(gru):
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match the GRU's weight dtype \(torch.float32\)"):
        gru(x_().double())
    with pytest.raises(ValueError, match=r"hx dtype \(torch.float64\) does not match input dtype"):
        gru(x_(), torch.randn(2, B, H, dtype=torch.float64))


def test_lengths_with_packed_sequence(gru):
    packed = pack_padded_sequence(x_(), [3, 6, 1], enforce_sorted=False)
    with pytest.raises(ValueError, match=r"lengths must be None when input is a PackedSequence"):
        gru(packed, lengths=[3, 6, 1])


def test_input_type(gru):
    with pytest.raises(TypeError, match=r"input must be a Tensor or a PackedSequence, got list"):
        gru([1, 2, 3])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dropout=1.5), ValueError, "dropout should be a number in range"),
    (dict(dropout=True), ValueError, "dropout should be a number in range"),
    (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
    (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
    (dict(hidden_size=2.5), TypeError, "hidden_size should be of type int, got: float"),
    (dict(input_size="3"), TypeError, "input_size should be of type int, got: str"),
    (dict(bias=1), TypeError, "bias should be of type bool, got: int"),
    (dict(batch_first=None), TypeError, "batch_first should be of type bool, got: NoneType"),
    (dict(proj_size=2), ValueError, "proj_size argument is only supported for LSTM"),
])
def test_constructor_errors_match_nn_gru(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        varlen_rnn.GRU(**args)
    with pytest.raises(exc, match=match):  # the same type and wording as torch.nn.GRU
        torch.nn.GRU(**args)


@pytest.mark.parametrize("bad", ["w_ih", "w_hh", "b_ih", "hx", "lengths_dtype"])
def test_op_level_checks_name_the_argument(bad):
    D, x = 1, torch.randn(T, B, I)
    args = dict(input=x, lengths=torch.tensor([1, 2, 3]), hx=torch.zeros(D, B, H),
                w_ih=torch.randn(D, 3 * H, I), w_hh=torch.randn(D, 3 * H, H),
                b_ih=torch.randn(D, 3 * H), b_hh=torch.randn(D, 3 * H))
    match = {"w_ih": "w_ih must be", "w_hh": "w_hh must be", "b_ih": "b_ih must be",
             "hx": "hx must be", "lengths_dtype": "lengths must be an int64 or int32"}[bad]
    if bad == "w_ih":
        args["w_ih"] = torch.randn(D, 3 * H, I + 1)
    elif bad == "w_hh":
        args["w_hh"] = torch.randn(D, 3 * H, H + 1)
    elif bad == "b_ih":
        args["b_ih"] = torch.randn(D, H)
    elif bad == "hx":
        args["hx"] = torch.zeros(D, B + 1, H)
    else:
        args["lengths"] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.varlen_rnn.gru_layer_forward(*args.values(), False, False)


@pytest.mark.parametrize("batch_first", [False, True])
def test_inputs_are_never_modified(batch_first):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), requires_grad=True)
    hx = torch.randn(4, B, H, requires_grad=True)
    lengths = torch.tensor([3, 6, 0])
    saved = [t.detach().clone() for t in (x, hx, lengths)] + [p.detach().clone() for p in gru.parameters()]
    out, h = gru(x, hx, lengths=lengths)
    (out.sum() + h.sum()).backward()
    now = [x, hx, lengths] + list(gru.parameters())
    assert all(torch.equal(a.detach(), b) for a, b in zip(now, saved))

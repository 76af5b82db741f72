"""Bad inputs raise a clear error that names the argument; inputs are never modified."""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import varlen_rnn
from varlen_rnn._inputs import as_lengths

T, B, I, H = 6, 3, 4, 5


@pytest.fixture
def gru():
    torch.manual_seed(0)
    return varlen_rnn.GRU(I, H, num_layers=2)


def x_():
    return torch.randn(T, B, I)


KINDS = r"lengths must be a list or tuple of ints, a NumPy integer array or an integer tensor"


@pytest.mark.parametrize(
    "lengths,exc,match",
    [
        ([2, 7, 1], ValueError, r"lengths must be in \[0, T\] with T=6, got lengths\[1\]=7"),
        ((2, -1, 1), ValueError, r"lengths must be in \[0, T\] with T=6, got lengths\[1\]=-1"),
        (
            torch.tensor([2, 7, 1]),
            RuntimeError,
            r"lengths must be in \[0, T\] with T=6.*lengths\[1\]=7",
        ),
        (torch.tensor([2, -3, 1]), RuntimeError, r"lengths must be in \[0, T\].*lengths\[1\]=-3"),
        (
            np.array([2, 7, 1]),
            RuntimeError,
            r"lengths must be in \[0, T\] with T=6.*lengths\[1\]=7",
        ),
        ([2, 3], ValueError, r"lengths must have one entry per sequence \(B=3\), got 2"),
        (
            torch.tensor([2, 3]),
            ValueError,
            r"lengths must be 1-D with one entry per sequence \(B=3\)",
        ),
        (np.array([2, 3]), ValueError, r"lengths must be 1-D with one entry per sequence \(B=3\)"),
        (torch.tensor([[2, 3, 1]]), ValueError, r"lengths must be 1-D .*got shape \(1, 3\)"),
        (
            torch.tensor([2.0, 3.0, 1.0]),
            TypeError,
            r"lengths must be an integer tensor, got torch.float32",
        ),
        (
            torch.tensor([True, True, False]),
            TypeError,
            r"lengths must be an integer tensor, got torch.bool",
        ),
        (np.array([2.0, 3.0, 1.0]), TypeError, KINDS + r", got a NumPy array of float64"),
        ([2.0, 3, 1], TypeError, KINDS + r", got list \[2.0, 3, 1\]"),
        ([True, 3, 1], TypeError, KINDS + r", got list"),
        ("abc", TypeError, KINDS + r", got str"),
        ({2, 3, 1}, TypeError, KINDS + r", got set"),
    ],
)
def test_bad_lengths(gru, lengths, exc, match):
    with pytest.raises(exc, match=match):
        gru(x_(), lengths=lengths)


@pytest.mark.parametrize(
    "kind",
    [
        "list",
        "tuple",
        "numpy",
        "numpy_scalars",
        "numpy_int32",
        "numpy_uint8",
        "int32",
        "int16",
        "uint8",
        "noncontiguous",
    ],
)
def test_every_form_pack_padded_sequence_accepts(gru, kind):
    """The same lengths in every form pack_padded_sequence takes give the same result."""
    x, values = x_(), [2, 6, 1]
    lengths = {
        "list": values,
        "tuple": tuple(values),
        "numpy": np.array(values),
        "numpy_scalars": [np.int64(v) for v in values],
        "numpy_int32": np.array(values, dtype=np.int32),
        "numpy_uint8": np.array(values, dtype=np.uint8),
        "int32": torch.tensor(values, dtype=torch.int32),
        "int16": torch.tensor(values, dtype=torch.int16),
        "uint8": torch.tensor(values, dtype=torch.uint8),
        "noncontiguous": torch.tensor([2, 0, 6, 0, 1, 0])[::2],
    }[kind]
    pack_padded_sequence(x, lengths, enforce_sorted=False)  # torch takes this form too
    out, h = gru(x, lengths=lengths)
    out_p, h_p = gru(pack_padded_sequence(x, values, enforce_sorted=False))
    assert torch.equal(h, h_p)
    assert torch.equal(pack_padded_sequence(out, values, enforce_sorted=False).data, out_p.data)


def test_a_single_sequence_takes_a_scalar_length(gru):
    x = torch.randn(T, 1, I)
    expected = gru(x, lengths=[4])
    for length in (4, np.int64(4), np.array(4), torch.tensor(4)):
        assert all(torch.equal(a, b) for a, b in zip(gru(x, lengths=length), expected))


def test_cpu_lengths_stay_on_the_cpu_and_device_lengths_are_passed_as_they_are():
    """The backend checks CPU lengths on the host before any kernel runs (no device assert);
    lengths already on the device are handed over without a copy."""
    cuda = torch.device("cuda")  # only named: nothing is moved, so no GPU is needed
    for lengths in ([1, 2], (1, 2), np.array([1, 2]), torch.tensor([1, 2])):
        got = as_lengths(lengths, 2, 3, cuda)
        assert got.device.type == "cpu" and got.tolist() == [1, 2]
    on_device = torch.tensor([1, 2], device="meta")
    assert as_lengths(on_device, 2, 3, torch.device("meta")) is on_device
    assert as_lengths(None, 2, 3, torch.device("meta")).device.type == "meta"


@pytest.fixture
def pair():
    """nn.GRU and ours, same configuration: nn.GRU's error is the specification."""
    torch.manual_seed(0)
    return torch.nn.GRU(I, H, num_layers=2), varlen_rnn.GRU(I, H, num_layers=2)


def raises_like_nn_gru(pair, exc, match, *args):
    for module in pair:
        with pytest.raises(exc, match=match):
            module(*args)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4, 4)])
def test_input_rank(pair, shape):
    raises_like_nn_gru(
        pair, ValueError, r"GRU: Expected input to be 2D or 3D, got \dD instead", torch.randn(shape)
    )


def test_packed_data_must_be_2d(pair):
    packed = PackedSequence(torch.randn(2, 2, I), torch.tensor([1, 1]))
    raises_like_nn_gru(pair, RuntimeError, "input must have 2 dimensions, got 3", packed)


def test_wrong_feature_size(pair):
    raises_like_nn_gru(
        pair,
        RuntimeError,
        r"input.size\(-1\) must be equal to input_size. Expected 4, got 7",
        torch.randn(T, B, 7),
    )


@pytest.mark.parametrize(
    "hx_shape,match",
    [
        ((2, B, H + 1), r"Expected hidden size \(2, 3, 5\), got \[2, 3, 6\]"),
        ((1, B, H), r"Expected hidden size \(2, 3, 5\), got \[1, 3, 5\]"),
        ((2, B + 1, H), r"Expected hidden size \(2, 3, 5\), got \[2, 4, 5\]"),
        ((2, H), r"For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    ],
)
def test_hx_wrong_shape(pair, hx_shape, match):
    raises_like_nn_gru(pair, RuntimeError, match, x_(), torch.randn(hx_shape))


def test_unbatched_hx_must_be_2d(pair):
    raises_like_nn_gru(
        pair,
        RuntimeError,
        r"For unbatched 2-D input, hx should also be 2-D but got 3-D tensor",
        torch.randn(T, I),
        torch.randn(2, 1, H),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_input_dtype_mismatch(pair, dtype):
    raises_like_nn_gru(
        pair,
        ValueError,
        rf"^RNN input dtype \({dtype}\) does not match weight dtype \(torch.float32\). Convert "
        rf"input: input.to\(torch.float32\), or convert model: model.to\({dtype}\)$",
        x_().to(dtype),
    )


def test_hx_dtype_mismatch_is_a_runtime_error_as_in_nn_gru(pair):
    hx = torch.randn(2, B, H, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # nn.GRU's own text names a GEMM, not hx
        pair[0](x_(), hx)
    with pytest.raises(
        RuntimeError,
        match=r"hx dtype \(torch.float64\) does not match input "
        r"dtype \(torch.float32\): convert hx with hx.to\(torch.float32\)$",
    ):
        pair[1](x_(), hx)


def test_device_mismatch_messages_are_nn_grus(pair):
    """The meta device stands in for a GPU: the checks run before any kernel is reached."""
    raises_like_nn_gru(
        pair,
        RuntimeError,
        r"^Input and hidden tensors are not at the same "
        r"device, found input tensor at cpu and hidden tensor at meta$",
        x_(),
        torch.zeros(2, B, H, device="meta"),
    )
    raises_like_nn_gru(
        pair,
        RuntimeError,
        r"^Input and parameter tensors are not at the "
        r"same device, found input tensor at meta and parameter tensor at cpu$",
        x_().to("meta"),
    )
    raises_like_nn_gru(
        [m.to("meta") for m in pair],
        RuntimeError,
        r"^Input and parameter "
        r"tensors are not at the same device, found input tensor at cpu and "
        r"parameter tensor at meta$",
        x_(),
    )


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_device_mismatch_with_a_packed_sequence(pair, enforce_sorted):
    """nn.GRU reports this one from inside an index op, naming no argument; we say which."""
    packed = pack_padded_sequence(x_(), [6, 4, 2], enforce_sorted=enforce_sorted)
    with pytest.raises(
        RuntimeError,
        match=r"^Input and hidden tensors are not at the same "
        r"device, found input tensor at cpu and hidden "
        r"tensor at meta$",
    ):
        pair[1](packed, torch.zeros(2, B, H, device="meta"))


def test_every_parameter_device_is_checked(pair):
    ours = pair[1]
    ours.weight_hh_l1 = torch.nn.Parameter(ours.weight_hh_l1.detach().to("meta"))
    with pytest.raises(
        RuntimeError, match=r"found input tensor at cpu and parameter tensor at meta"
    ):
        ours(x_())


def test_lengths_with_packed_sequence(gru):
    packed = pack_padded_sequence(x_(), [3, 6, 1], enforce_sorted=False)
    with pytest.raises(ValueError, match=r"lengths must be None when input is a PackedSequence"):
        gru(packed, lengths=[3, 6, 1])


def test_input_type(gru):
    with pytest.raises(TypeError, match=r"input must be a Tensor or a PackedSequence, got list"):
        gru([1, 2, 3])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dropout=1.5), ValueError, "dropout should be a number in range"),
        (dict(dropout=True), ValueError, "dropout should be a number in range"),
        (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
        (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
        (dict(hidden_size=2.5), TypeError, "hidden_size should be of type int, got: float"),
        (dict(input_size="3"), TypeError, "input_size should be of type int, got: str"),
        (dict(bias=1), TypeError, "bias should be of type bool, got: int"),
        (dict(batch_first=None), TypeError, "batch_first should be of type bool, got: NoneType"),
        (dict(proj_size=2), ValueError, "proj_size argument is only supported for LSTM"),
        (dict(hiden_size=4), TypeError, "unexpected keyword argument"),
    ],
)
def test_constructor_errors_match_nn_gru(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        varlen_rnn.GRU(**args)
    with pytest.raises(exc, match=match):  # the same type and wording as torch.nn.GRU
        torch.nn.GRU(**args)


@pytest.mark.parametrize("cell", ["LSTM", "RNN"])
def test_the_other_cells_refuse_unknown_keywords_as_nn_does(cell):
    for module in (varlen_rnn, torch.nn):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            getattr(module, cell)(3, 4, hiden_size=4)


@pytest.mark.parametrize("cell", ["GRU", "LSTM", "RNN"])
def test_dropout_on_one_layer_warns_as_nn_does(cell):
    for module in (varlen_rnn, torch.nn):
        with pytest.warns(UserWarning, match="dropout option adds dropout after all but last"):
            getattr(module, cell)(3, 4, num_layers=1, dropout=0.5)


@pytest.mark.parametrize("bad", ["w_ih", "w_hh", "b_ih", "hx", "lengths_dtype"])
def test_op_level_checks_name_the_argument(bad):
    D, x = 1, torch.randn(T, B, I)
    args = dict(
        input=x,
        lengths=torch.tensor([1, 2, 3]),
        hx=torch.zeros(D, B, H),
        w_ih=torch.randn(D, 3 * H, I),
        w_hh=torch.randn(D, 3 * H, H),
        b_ih=torch.randn(D, 3 * H),
        b_hh=torch.randn(D, 3 * H),
    )
    match = {
        "w_ih": "w_ih must be",
        "w_hh": "w_hh must be",
        "b_ih": "b_ih must be",
        "hx": "hx must be",
        "lengths_dtype": "lengths must be an int64 or int32",
    }[bad]
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
    saved = [t.detach().clone() for t in (x, hx, lengths)] + [
        p.detach().clone() for p in gru.parameters()
    ]
    out, h = gru(x, hx, lengths=lengths)
    (out.sum() + h.sum()).backward()
    now = [x, hx, lengths] + list(gru.parameters())
    assert all(torch.equal(a.detach(), b) for a, b in zip(now, saved))

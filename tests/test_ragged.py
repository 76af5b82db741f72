"""Ragged input to varlen_rnn.GRU: jagged nested tensors and PackedSequence run on their rows as
stored. Parity with torch.nn.GRU + pack_padded_sequence(enforce_sorted=False) (outputs, h_n and
every gradient), gradcheck, torch.compile, zero-length components and bad input."""

import itertools

import pytest
import torch
from testing import ALL_DEVICES, assert_close, grads, make_pair
from torch.nn.utils.rnn import (
    PackedSequence,
    pack_padded_sequence,
    pad_packed_sequence,
    pad_sequence,
)

import varlen_rnn

I, H = 4, 5
LENGTHS = [5, 1, 7, 7, 3, 1]  # T = 7, a length of 1 and of T, repeats, unsorted
CONFIGS = list(itertools.product([1, 2, 3], [False, True], [True, False], [False, True]))
IDS = [
    f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'b' if c[2] else 'nob'}-{'hx' if c[3] else 'nohx'}"
    for c in CONFIGS
]


def _offsets(lengths, device):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), device=device)


def _baseline_rows(ref, values, lengths, hx):
    """nn.GRU + pack_padded_sequence(enforce_sorted=False) on the padded batch, output as
    sequence-major rows [N, D*H] (what a nested tensor's values hold)."""
    padded = pad_sequence(values.split(lengths))  # [T, B, I]
    packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False)
    out, h_n = ref(packed, hx)
    out, _ = pad_packed_sequence(out)  # [T, B, D*H]
    return torch.cat([out[:L, b] for b, L in enumerate(lengths)]), h_n


def _setup(device, dtype, num_layers, bidirectional, bias, with_hx, lengths=LENGTHS):
    ref, ours = make_pair(I, H, num_layers, bias, False, bidirectional, dtype, device)
    D = 2 if bidirectional else 1
    values = torch.randn(sum(lengths), I, dtype=dtype, device=device, requires_grad=True)
    hx = (
        torch.randn(num_layers * D, len(lengths), H, dtype=dtype, device=device, requires_grad=True)
        if with_hx
        else None
    )
    return ref, ours, values, hx


def _check_grads(outs, outs_ref, leaves, ours, ref, dtype):
    g = grads(outs, leaves + list(ours.parameters()))
    g_ref = grads(outs_ref, leaves + list(ref.parameters()))
    names = ["input", "hx"][: len(leaves)] + [n for n, _ in ours.named_parameters()]
    for name, a, e in zip(names, g, g_ref, strict=True):
        assert a is not None, f"no gradient reached {name}"
        assert_close(a, e, dtype, f"grad of {name}")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("num_layers,bidirectional,bias,with_hx", CONFIGS, ids=IDS)
def test_nested_matches_nn_gru_with_packing(
    device, dtype, num_layers, bidirectional, bias, with_hx
):
    ref, ours, values, hx = _setup(device, dtype, num_layers, bidirectional, bias, with_hx)
    nt = torch.nested.nested_tensor_from_jagged(values, _offsets(LENGTHS, device))
    out, h_n = ours(nt, hx)
    out_ref, h_ref = _baseline_rows(ref, values, LENGTHS, hx)
    assert out.is_nested and out.layout == torch.jagged and out.offsets() is nt.offsets()
    assert out.shape[0] == len(LENGTHS) and out.shape[1] == nt.shape[1]
    assert nt._maybe_max_seqlen is None and out._maybe_max_seqlen == max(LENGTHS)
    assert_close(out.values(), out_ref, dtype, "output")
    assert_close(h_n, h_ref, dtype, "h_n")
    leaves = [values] + ([hx] if with_hx else [])
    _check_grads([out.values(), h_n], [out_ref, h_ref], leaves, ours, ref, dtype)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("num_layers,bidirectional,bias,with_hx", CONFIGS, ids=IDS)
def test_packed_matches_nn_gru(device, dtype, num_layers, bidirectional, bias, with_hx):
    ref, ours, _, hx = _setup(device, dtype, num_layers, bidirectional, bias, with_hx)
    padded = torch.randn(max(LENGTHS), len(LENGTHS), I, dtype=dtype, device=device)
    packed = pack_padded_sequence(padded, torch.tensor(LENGTHS), enforce_sorted=False)
    data = packed.data.detach().requires_grad_()
    packed = PackedSequence(
        data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
    )
    out, h_n = ours(packed, hx)
    out_ref, h_ref = ref(packed, hx)
    assert isinstance(out, PackedSequence)
    assert out.batch_sizes is packed.batch_sizes and out.sorted_indices is packed.sorted_indices
    assert out.unsorted_indices is packed.unsorted_indices
    assert_close(out.data, out_ref.data, dtype, "output")
    assert_close(h_n, h_ref, dtype, "h_n")
    leaves = [data] + ([hx] if with_hx else [])
    _check_grads([out.data, h_n], [out_ref.data, h_ref], leaves, ours, ref, dtype)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize(
    "lengths", [[1], [4], [3, 3, 3], [1, 1, 2], [2, 9, 1, 9, 4, 4, 6]], ids=str
)
def test_nested_and_packed_other_lengths(device, lengths):
    ref, ours, values, hx = _setup(device, torch.float64, 2, True, True, True, lengths)
    out, h_n = ours(torch.nested.nested_tensor_from_jagged(values, _offsets(lengths, device)), hx)
    out_ref, h_ref = _baseline_rows(ref, values, lengths, hx)
    assert_close(out.values(), out_ref, torch.float64, "output")
    assert_close(h_n, h_ref, torch.float64, "h_n")
    packed = pack_padded_sequence(
        pad_sequence(values.split(lengths)), torch.tensor(lengths), enforce_sorted=False
    )
    (p_out, p_h), (r_out, r_h) = ours(packed, hx), ref(packed, hx)
    assert_close(p_out.data, r_out.data, torch.float64, "packed output")
    assert_close(p_h, r_h, torch.float64, "packed h_n")


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_packed_sorted_without_indices(device):
    """enforce_sorted=True packing has sorted_indices None: rank order is the caller's order."""
    ref, ours, _, hx = _setup(device, torch.float64, 2, True, True, True, [5, 4, 2])
    padded = torch.randn(5, 3, I, dtype=torch.float64, device=device)
    packed = pack_padded_sequence(padded, [5, 4, 2])
    assert packed.sorted_indices is None
    (out, h_n), (out_ref, h_ref) = ours(packed, hx), ref(packed, hx)
    assert out.sorted_indices is None and out.unsorted_indices is None
    assert_close(out.data, out_ref.data, torch.float64, "output")
    assert_close(h_n, h_ref, torch.float64, "h_n")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_nested_zero_length_components(device, with_hx):
    """torch.nested builds components of length 0: they have no rows, and h_n = hx (or 0).
    Everything else matches the padded path on the same data (which allows length 0)."""
    lengths = [3, 0, 4, 0]
    _, ours, values, hx = _setup(device, torch.float64, 2, True, True, with_hx, lengths)
    parts = list(values.detach().split(lengths))
    nt = torch.nested.nested_tensor(parts, layout=torch.jagged, device=device)
    assert nt.offsets().tolist() == [0, 3, 3, 7, 7]
    out, h_n = ours(nt, hx)
    padded = pad_sequence(parts)
    out_pad, h_pad = ours(padded, hx, lengths=lengths)
    assert_close(
        out.values(),
        torch.cat([out_pad[:L, b] for b, L in enumerate(lengths)]),
        torch.float64,
        "output",
    )
    assert_close(h_n, h_pad, torch.float64, "h_n")
    expected = hx if with_hx else torch.zeros_like(h_n)
    assert torch.equal(h_n[:, [1, 3]], expected[:, [1, 3]])
    assert [len(c) for c in out.unbind()] == lengths


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["nested", "packed"])
def test_gradcheck_module(device, kind):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(3, 2, num_layers=2, bidirectional=True, dtype=torch.float64, device=device)
    names = [n for n, _ in gru.named_parameters()]
    lengths = [3, 1, 2]
    values = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    offsets = _offsets(lengths, device)
    packed = pack_padded_sequence(
        pad_sequence(values.detach().split(lengths)), lengths, enforce_sorted=False
    )

    def fn(v, hx, *ps):
        if kind == "nested":
            x = torch.nested.nested_tensor_from_jagged(v, offsets)
        else:
            x = PackedSequence(
                v, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
        out, h = torch.func.functional_call(gru, dict(zip(names, ps)), (x, hx))
        return (out.values() if kind == "nested" else out.data), h

    v = values if kind == "nested" else packed.data.detach().requires_grad_()
    assert torch.autograd.gradcheck(fn, (v, hx, *params), eps=1e-6, atol=1e-8)


def _ragged_args(device, layout):
    """gru_layer_ragged's arguments for lengths [2, 1] (B=2, D=2, I=H=2) in float64."""
    f = lambda *s: torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
    if layout == 0:
        index = (_offsets([2, 1], device), None, 0, 2)
    else:  # packed rank order [0, 1], batch_sizes [2, 1]
        index = (torch.tensor([2, 1]), torch.tensor([1, 0], device=device), 1, 2)
    return (f(3, 2), *index, f(2, 2, 2), f(2, 6, 2), f(2, 6, 2), f(2, 6), f(2, 6))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", [0, 1], ids=["offsets", "packed"])
def test_gradgradcheck_ragged_op(device, layout):
    """Gradients of gradients of the layer the nested (layout 0) and packed (layout 1) paths
    run: recomputed through varlen_rnn.reference's ragged layer."""
    args = _ragged_args(device, layout)
    op = varlen_rnn.ops.gru_layer_ragged
    assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_gradgradcheck_packed_module(device):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(2, 2, bidirectional=True, dtype=torch.float64, device=device)
    packed = pack_padded_sequence(torch.randn(2, 2, 2, dtype=torch.float64, device=device), [2, 1])
    data = packed.data.detach().requires_grad_()
    hx = torch.randn(2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = gru.weight_hh_l0.detach().clone().requires_grad_()

    def fn(data, hx, w):
        x = PackedSequence(data, packed.batch_sizes)
        out, h = torch.func.functional_call(gru, {"weight_hh_l0": w}, (x, hx))
        return out.data, h

    assert torch.autograd.gradgradcheck(fn, (data, hx, w), eps=1e-6, atol=1e-7)


@pytest.mark.xfail(
    raises=NotImplementedError,
    strict=True,
    reason="torch.nested: the double backward of nested_tensor_from_jagged/values() "
    "needs aten._nested_tensor_storage_offsets, which has no jagged implementation",
)
def test_gradgrad_through_a_nested_tensor_is_torch_nested_limit():
    """Not ours: the same failure with no GRU at all. The layer itself is checked above."""
    offsets = _offsets([2, 1], "cpu")
    v = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    f = lambda v: torch.nested.nested_tensor_from_jagged(v, offsets).values().sin()
    torch.autograd.gradgradcheck(f, (v,))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", [0, 1], ids=["offsets", "packed"])
def test_forward_ad_ragged_op(device, layout):
    """Forward mode (torch.func.jvp) goes through the differentiable reference; checked
    against central differences of the kernels. (torch.func cannot wrap a nested tensor,
    so the layer is called on its plain-tensor arguments.)"""
    args = _ragged_args(device, layout)
    x, rest = args[0].detach(), args[1:]
    dx = torch.randn_like(x)
    f = lambda x: varlen_rnn.ops.gru_layer_ragged(x, *rest)
    with torch.no_grad():
        (out, h), (t_out, t_h) = torch.func.jvp(f, (x,), (dx,))
        (o1, h1), (o0, h0) = f(x + 1e-6 * dx), f(x - 1e-6 * dx)
        assert_close(out, f(x)[0], torch.float64, "primal")
    torch.testing.assert_close(t_out, (o1 - o0) / 2e-6, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(t_h, (h1 - h0) / 2e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("cached_max", [True, False], ids=["max_seqlen", "no_max_seqlen"])
def test_compile_fullgraph_nested(device, cached_max):
    """A training step on a nested tensor compiles with fullgraph=True and matches eager, on new
    offsets too; with or without the nested tensor's cached max seqlen."""
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(4, 3, num_layers=2, bidirectional=True, device=device)

    def step(x):
        out, h_n = gru(x)
        return (out.values() * out.values()).sum() + h_n.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for lengths in ([3, 1, 5], [2, 6, 1, 1], [4, 4]):
        values = torch.randn(sum(lengths), 4, device=device, requires_grad=True)
        nt = torch.nested.nested_tensor_from_jagged(
            values, _offsets(lengths, device), max_seqlen=max(lengths) if cached_max else None
        )
        got, want = compiled(nt), step(nt)
        assert_close(got, want, torch.float32, f"loss {lengths}")
        (g,), (g_want,) = torch.autograd.grad(got, values), torch.autograd.grad(want, values)
        assert_close(g, g_want, torch.float32, f"grad {lengths}")


# ------------------------------------------------------------------ bad input
def test_lengths_with_nested_is_a_value_error():
    gru = varlen_rnn.GRU(4, 3)
    nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    with pytest.raises(
        ValueError,
        match="lengths must be None when input is a nested tensor: "
        "the nested tensor carries its own lengths",
    ):
        gru(nt, lengths=[2, 3])


def test_nested_layout_rank_and_holes():
    gru = varlen_rnn.GRU(4, 3)
    parts = [torch.randn(2, 4), torch.randn(3, 4)]
    with pytest.raises(ValueError, match="must have layout=torch.jagged, got torch.strided"):
        gru(torch.nested.nested_tensor(parts))
    with pytest.raises(ValueError, match=r"must be \[B, j, I\] with the ragged dimension second"):
        gru(torch.nested.nested_tensor([torch.randn(2, 4, 1)], layout=torch.jagged))
    holes = torch.nested.nested_tensor_from_jagged(
        torch.randn(6, 4), torch.tensor([0, 3, 6]), lengths=torch.tensor([2, 3])
    )
    with pytest.raises(ValueError, match=r"holes .* call input.contiguous\(\) first"):
        gru(holes)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        gru(torch.nested.nested_tensor([torch.randn(2, 5)], layout=torch.jagged))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 3\), got \[1, 3, 3\]"):
        gru(torch.nested.nested_tensor(parts, layout=torch.jagged), torch.zeros(1, 3, 3))


@pytest.mark.parametrize(
    "offsets,match",
    [
        ([0, 3, 2, 5], "non-decreasing"),
        ([1, 3, 5], r"offsets\[0\] must be 0"),
        ([0, 2, 4], r"offsets\[B\] must equal input.size\(0\)=5"),
    ],
    ids=["decreasing", "first_not_0", "last_not_N"],
)
def test_bad_offsets_name_the_argument(offsets, match):
    gru = varlen_rnn.GRU(4, 3)
    nt = torch.nested.nested_tensor_from_jagged(torch.randn(5, 4), torch.tensor(offsets))
    with pytest.raises(RuntimeError, match=match):
        gru(nt)


def test_bad_seq_index_dtype_and_size_name_the_argument():
    gru = varlen_rnn.GRU(4, 3)
    w = gru._layer_weights(0, torch.float32)
    x, hx = torch.randn(5, 4), torch.zeros(1, 2, 3)
    op = varlen_rnn.ops.gru_layer_ragged
    with pytest.raises(RuntimeError, match="seq_index must be an int64 or int32 tensor"):
        op(x, torch.tensor([0.0, 2.0, 5.0]), None, 0, 3, hx, *w)
    # Offsets give B: 4 offsets are 3 sequences, hx has 2.
    with pytest.raises(RuntimeError, match=r"hx must be \[D, B, H\] = \[1, 3, 3\], got"):
        op(x, torch.tensor([0, 1, 2, 5]), None, 0, 3, hx, *w)
    with pytest.raises(RuntimeError, match="max_len=2 must be >= every length"):
        op(x, torch.tensor([0, 2, 5]), None, 0, 2, hx, *w)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_dropout_between_ragged_layers(device):
    """Training mode drops [N, D*H] rows between layers (as nn.GRU); eval mode is the plain
    stack, equal to the padded path."""
    ours = varlen_rnn.GRU(I, H, num_layers=2, dropout=0.5, device=device, dtype=torch.float64)
    parts = [torch.randn(L, I, dtype=torch.float64, device=device) for L in LENGTHS]
    nt = torch.nested.nested_tensor(parts, layout=torch.jagged)
    ours.eval()
    out_eval, _ = ours(nt)
    out_pad, _ = ours(pad_sequence(parts), lengths=LENGTHS)
    want = torch.cat([out_pad[:L, b] for b, L in enumerate(LENGTHS)])
    assert_close(out_eval.values(), want, torch.float64, "eval")
    ours.train()
    torch.manual_seed(3)
    out_a, _ = ours(nt)
    torch.manual_seed(3)
    out_b, _ = ours(nt)
    assert torch.equal(out_a.values(), out_b.values())
    assert not torch.allclose(out_a.values(), out_eval.values())


def test_autocast_and_noncontiguous_packed_data():
    """CPU autocast keeps nn.GRU's dtypes (hx's: float32 here), and PackedSequence data that is
    a strided view gives the contiguous copy's results."""
    ref, ours, _, hx = _setup("cpu", torch.float32, 2, True, True, True)
    padded = torch.randn(max(LENGTHS), len(LENGTHS), 2 * I)[..., ::2]
    packed = pack_padded_sequence(padded, torch.tensor(LENGTHS), enforce_sorted=False)
    strided = PackedSequence(
        torch.randn(packed.data.shape[0], 2 * I)[:, ::2].copy_(packed.data),
        packed.batch_sizes,
        packed.sorted_indices,
        packed.unsorted_indices,
    )
    assert not strided.data.is_contiguous()
    (out, h_n), (out_ref, h_ref) = ours(strided, hx), ref(packed, hx)
    assert_close(out.data, out_ref.data, torch.float32, "strided output")
    nt = torch.nested.nested_tensor([torch.randn(L, I) for L in LENGTHS], layout=torch.jagged)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = ours(nt, hx)
        out_ref, h_ref = ref(nt.values().new_zeros(1, 1, I), hx[:, :1])
    assert out.dtype == out_ref.dtype == torch.float32 and h_n.dtype == h_ref.dtype

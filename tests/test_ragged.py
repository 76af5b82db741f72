"""Ragged input to varlen_rnn.GRU: jagged nested tensors and PackedSequence run on their rows as
stored. Parity with torch.nn.GRU + pack_padded_sequence(enforce_sorted=False) (outputs, h_n and
every gradient), gradcheck, torch.compile, zero-length components and bad input."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.nn.utils.rnn import pad_sequence

import varlen_rnn
from testing import ALL_DEVICES, TOL, assert_close, grads, make_pair

I, H = 4, 5
LENGTHS = [5, 1, 7, 7, 3, 1]  # T = 7, a length of 1 and of T, repeats, unsorted
CONFIGS = list(itertools.product([1, 2, 3], [False, True], [True, False], [False, True]))
IDS = [f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'b' if c[2] else 'nob'}-{'hx' if c[3] else 'nohx'}"
       for c in CONFIGS]


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
    hx = (torch.randn(num_layers * D, len(lengths), H, dtype=dtype, device=device,
                      requires_grad=True) if with_hx else None)
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
def test_nested_matches_nn_gru_with_packing(device, dtype, num_layers, bidirectional, bias,
                                            with_hx):
    ref, ours, values, hx = _setup(device, dtype, num_layers, bidirectional, bias, with_hx)
    nt = torch.nested.nested_tensor_from_jagged(values, _offsets(LENGTHS, device))
    out, h_n = ours(nt, hx)
    out_ref, h_ref = _baseline_rows(ref, values, LENGTHS, hx)
    assert out.is_nested and out.layout == torch.jagged and out.offsets() is nt.offsets()
    assert out.shape[0] == len(LENGTHS) and out.shape[1] == nt.shape[1]
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
    packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                            packed.unsorted_indices)
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
@pytest.mark.parametrize("lengths", [[1], [4], [3, 3, 3], [1, 1, 2], [2, 9, 1, 9, 4, 4, 6]],
                         ids=str)
def test_nested_and_packed_other_lengths(device, lengths):
    ref, ours, values, hx = _setup(device, torch.float64, 2, True, True, True, lengths)
    out, h_n = ours(torch.nested.nested_tensor_from_jagged(values, _offsets(lengths, device)), hx)
    out_ref, h_ref = _baseline_rows(ref, values, lengths, hx)
    assert_close(out.values(), out_ref, torch.float64, "output")
    assert_close(h_n, h_ref, torch.float64, "h_n")
    packed = pack_padded_sequence(pad_sequence(values.split(lengths)), torch.tensor(lengths),
                                  enforce_sorted=False)
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
    assert_close(out.values(), torch.cat([out_pad[:L, b] for b, L in enumerate(lengths)]),
                 torch.float64, "output")
    assert_close(h_n, h_pad, torch.float64, "h_n")
    expected = hx if with_hx else torch.zeros_like(h_n)
    assert torch.equal(h_n[:, [1, 3]], expected[:, [1, 3]])
    assert [len(c) for c in out.unbind()] == lengths


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("kind", ["nested", "packed"])
def test_gradcheck_module(device, kind):
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(3, 2, num_layers=2, bidirectional=True, dtype=torch.float64,
                         device=device)
    names = [n for n, _ in gru.named_parameters()]
    lengths = [3, 1, 2]
    values = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    offsets = _offsets(lengths, device)
    packed = pack_padded_sequence(pad_sequence(values.detach().split(lengths)), lengths,
                                  enforce_sorted=False)

    def fn(v, hx, *ps):
        if kind == "nested":
            x = torch.nested.nested_tensor_from_jagged(v, offsets)
        else:
            x = PackedSequence(v, packed.batch_sizes, packed.sorted_indices,
                               packed.unsorted_indices)
        out, h = torch.func.functional_call(gru, dict(zip(names, ps)), (x, hx))
        return (out.values() if kind == "nested" else out.data), h

    v = values if kind == "nested" else packed.data.detach().requires_grad_()
    assert torch.autograd.gradcheck(fn, (v, hx, *params), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_gradgradcheck_nested(device):
    """Gradients of gradients: recomputed through varlen_rnn.reference's ragged layer."""
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(2, 2, bidirectional=True, dtype=torch.float64, device=device)
    offsets = _offsets([2, 1], device)
    values = torch.randn(3, 2, dtype=torch.float64, device=device, requires_grad=True)
    hx = torch.randn(2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)

    def fn(v, hx, w):
        out, h = torch.func.functional_call(
            gru, {"weight_hh_l0": w}, (torch.nested.nested_tensor_from_jagged(v, offsets), hx))
        return out.values(), h

    w = gru.weight_hh_l0.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (values, hx, w), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_forward_ad_nested(device):
    """Forward mode goes through the differentiable reference; compared with finite
    differences of the kernels' output."""
    torch.manual_seed(0)
    gru = varlen_rnn.GRU(3, 4, bidirectional=True, dtype=torch.float64, device=device)
    offsets = _offsets([3, 1, 2], device)
    v, dv = (torch.randn(6, 3, dtype=torch.float64, device=device) for _ in range(2))

    def f(v):
        out, h = gru(torch.nested.nested_tensor_from_jagged(v, offsets))
        return out.values(), h

    (out, h), (t_out, t_h) = torch.func.jvp(f, (v,), (dv,))
    (o1, h1), (o0, h0) = f(v + 1e-6 * dv), f(v - 1e-6 * dv)
    assert_close(out, f(v)[0], torch.float64, "primal")
    torch.testing.assert_close(t_out, (o1 - o0) / 2e-6, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(t_h, (h1 - h0) / 2e-6, atol=1e-7, rtol=1e-6)

"""Parity with torch.nn.GRU + pack_padded_sequence(enforce_sorted=False) + pad_packed_sequence:
output, h_n and every gradient, over the product of configurations."""

import itertools

import pytest
import torch
from testing import ALL_DEVICES, LENGTH_PATTERNS, assert_close, grads, make_pair, packed_baseline

T, B, I, H = 7, 5, 4, 6

CONFIGS = list(itertools.product([1, 2, 3], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", sorted(LENGTH_PATTERNS))
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias",
    CONFIGS,
    ids=[
        f"L{c[0]}-{'bi' if c[1] else 'uni'}-{'bf' if c[2] else 'tf'}-{'b' if c[3] else 'nob'}"
        for c in CONFIGS
    ],
)
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_matches_nn_gru_with_packing(
    device, dtype, pattern, num_layers, bidirectional, batch_first, bias, with_hx
):
    ref, ours = make_pair(I, H, num_layers, bias, batch_first, bidirectional, dtype, device)
    D = 2 if bidirectional else 1
    lengths = LENGTH_PATTERNS[pattern](T, B)
    x = torch.randn(
        (B, T, I) if batch_first else (T, B, I), dtype=dtype, device=device, requires_grad=True
    )
    hx = (
        torch.randn(num_layers * D, B, H, dtype=dtype, device=device, requires_grad=True)
        if with_hx
        else None
    )
    out_ref, h_ref = packed_baseline(ref, x, lengths, hx)
    out, h = ours(x, hx, lengths=torch.tensor(lengths))
    assert out.shape == out_ref.shape and h.shape == h_ref.shape
    assert_close(out, out_ref, dtype, "output")
    assert_close(h, h_ref, dtype, "h_n")
    inputs = [x] + ([hx] if with_hx else [])
    g_ref = grads([out_ref, h_ref], inputs + list(ref.parameters()))
    g = grads([out, h], inputs + list(ours.parameters()))
    names = ["input"] + (["hx"] if with_hx else []) + [n for n, _ in ours.named_parameters()]
    for name, a, e in zip(names, g, g_ref):
        assert_close(a, e, dtype, f"grad of {name}")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_is_exactly_zero_and_ignored(device, bidirectional):
    """Positions past a length are exactly 0, and whatever the padding holds changes nothing."""
    ref, ours = make_pair(I, H, 2, bidirectional=bidirectional, device=device)
    lengths = torch.tensor([4, 2, 7, 0, 1])
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    out, h = ours(x, lengths=lengths)
    mask = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)
    assert (out[mask.to(device)] == 0).all()
    x2 = x.clone()
    x2[mask.to(device)] = 1e3  # different padding content
    out2, h2 = ours(x2, lengths=lengths)
    assert torch.equal(out, out2) and torch.equal(h, h2)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_batched_equals_one_sequence_at_a_time(device):
    ref, ours = make_pair(I, H, 2, bidirectional=True, device=device)
    lengths = [4, 2, 7, 1, 5]
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    out, h = ours(x, lengths=lengths)
    for b, L in enumerate(lengths):
        o1, h1 = ref(x[:L, b])  # unbatched nn.GRU on the sequence alone
        assert_close(out[:L, b], o1, torch.float64, f"row {b}")
        assert_close(h[:, b], h1, torch.float64, f"h_n row {b}")

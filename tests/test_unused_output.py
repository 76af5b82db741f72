"""An output that the loss does not use gets no gradient tensor: a classifier reading only h_n
(the README's example) reaches the top layer's backward op with grad_output=None, which the
kernels read as zeros, so no [T, B, D*H] tensor of zeros is made (benchmarks/bench_last_state.py
measures the memory).

- at the op: grad_output=None gives the results of grad_output=zeros bit for bit, every cell,
  layout, dtype and output_mask; opcheck (fake kernels included) with None;
- through the modules: the top layer's op gets None and the layers below a tensor; the
  gradients equal those of a run whose output gradient is an explicit zero tensor, bit for
  bit, and nn + packing's in float64; gradients of gradients still work.
"""

import pytest
import torch
from testing import (
    ALL_DEVICES,
    CELL_KINDS,
    TOL,
    OpArguments,
    backward_op_and_args,
    make_kind_pair,
    packed_baseline,
)
from torch.nn.utils.rnn import pack_padded_sequence

KINDS = ["gru", *CELL_KINDS]
LENGTHS = [4, 6, 0, 1, 3]
T, B, I, H = 6, 5, 3, 5
LAYOUTS = ["padded", "offsets", "packed"]


def with_zero_output_grad(args):
    return (torch.zeros_like(args[0]), *args[1:])


def without_output_grad(args):
    return (None, *args[1:])


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_op_none_equals_zeros(kind, layout, dtype, device):
    lengths = [n for n in LENGTHS if n > 0] if layout == "packed" else LENGTHS
    op, args, _ = backward_op_and_args(kind, layout, device, dtype, lengths, I, H)
    for mask in ([True, True], [False, True], [True, False]):
        want = op(*with_zero_output_grad(args), mask)
        got = op(*without_output_grad(args), mask)
        assert len(got) == len(want)
        for k, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (mask, k)
            assert torch.equal(a, b), f"mask {mask}: result {k} differs"
        # Not the same as dropping the gradient that was given: the test can fail.
        if mask[0]:
            assert not torch.equal(op(*args, mask)[0], got[0])


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_backward_without_output_grad(kind, layout, device):
    lengths = [n for n in LENGTHS if n > 0] if layout == "packed" else LENGTHS
    op, args, _ = backward_op_and_args(kind, layout, device, torch.float64, lengths, I, H)
    torch.library.opcheck(op, without_output_grad(args))


def test_op_still_checks_a_given_output_grad():
    op, args, _ = backward_op_and_args("gru", "padded", "cpu", torch.float32, LENGTHS, I, H)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[6, 5, 10\]"):
        op(args[0][:-1], *args[1:])
    with pytest.raises(RuntimeError, match="grad_output"):
        op(args[0].double(), *args[1:])


# ------------------------------------------------------------------ the modules
def last_states(module, x, layout):
    """(the output as a tensor, h_n) of module on x [T, B, I] in layout, lengths LENGTHS (at
    least 1 where packed: PackedSequence takes no zero lengths)."""
    if layout == "padded":
        out, fin = module(x, lengths=LENGTHS)
    elif layout == "packed":
        lengths = [max(n, 1) for n in LENGTHS]
        out, fin = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out = out.data
    else:
        nested = torch.nested.nested_tensor_from_jagged(
            torch.cat([x[:n, b] for b, n in enumerate(LENGTHS)]),
            torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()]).to(x.device),
            max_seqlen=max(LENGTHS),
        )
        out, fin = module(nested)
        out = out.values()
    return out, fin[0] if isinstance(fin, tuple) else fin


def classifier_loss(h_n):
    w = torch.randn(h_n.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (h_n.double() * w.to(h_n.device)).sum()


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", ["padded", "packed", "nested"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_on_h_n_only(kind, dtype, layout, device):
    _, ours = make_kind_pair(kind, I, H, num_layers=2, bidirectional=True, dtype=dtype)
    ours = ours.to(device)
    x0 = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x0.to(device, dtype).requires_grad_()
    leaves = [x, *ours.parameters()]
    out, h_n = last_states(ours, x, layout)
    with OpArguments("_backward", "grad_output") as rec:
        got = torch.autograd.grad(classifier_loss(h_n), leaves)
    # One call per layer (or per direction where a short call runs them apart), top first:
    # the top layer's output is unused, the lower layer's gets the upper layer's grad_input.
    n = len(rec.values) // 2
    assert len(rec.values) in (2, 4)
    assert all(v is None for v in rec.values[:n]), rec.values
    assert all(isinstance(v, torch.Tensor) for v in rec.values[n:]), rec.values
    # The same with an explicit zero gradient for the output.
    out, h_n = last_states(ours, x, layout)
    want = torch.autograd.grad(classifier_loss(h_n) + (out * 0).sum(), leaves)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"gradient {k} differs"


@pytest.mark.parametrize("kind", KINDS)
def test_loss_on_h_n_only_matches_nn_with_packing(kind):
    ref, ours = make_kind_pair(kind, I, H, num_layers=2, bidirectional=True)
    lengths = [max(n, 1) for n in LENGTHS]  # nn's packing takes no zero lengths
    x0 = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_ours, x_ref = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    _, fin = ours(x_ours, lengths=lengths)
    got = torch.autograd.grad(
        classifier_loss(fin[0] if isinstance(fin, tuple) else fin), [x_ours, *ours.parameters()]
    )
    _, fin = packed_baseline(ref, x_ref, lengths)
    want = torch.autograd.grad(
        classifier_loss(fin[0] if isinstance(fin, tuple) else fin), [x_ref, *ref.parameters()]
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_of_gradients_with_h_n_only(kind):
    """The double-backward path recomputes with plain ops and needs a zero tensor; it makes one."""
    _, ours = make_kind_pair(kind, I, H, num_layers=1, bidirectional=True)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    names = [n for n, _ in ours.named_parameters()]

    def h_n_of(x, *weights):
        fin = torch.func.functional_call(
            ours, dict(zip(names, weights)), (x,), {"lengths": lengths}
        )[1]
        return fin[0] if isinstance(fin, tuple) else fin

    weights = [p.detach().requires_grad_() for p in ours.parameters()]
    torch.autograd.gradgradcheck(h_n_of, (x.requires_grad_(), *weights), fast_mode=True)

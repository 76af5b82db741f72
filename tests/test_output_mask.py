"""The backward computes only the gradients autograd asks for (the backward ops' output_mask,
cuDNN's _cudnn_rnn_backward has the same): no input gradient where the input is data, no weight
gradients where the weights are frozen.

- through the modules, every layout: what is still computed equals the unmasked backward's
  gradients bit for bit, each layer's backward op is asked for exactly what is wanted, and
  float64 agrees with nn + packing;
- at the op: masked gradients come back as [0] tensors, the others equal the unmasked call's,
  opcheck (fake kernels included) with each mask;
- the masked GEMMs do not run (the op's matrix products counted by the profiler).
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
LENGTHS = [4, 6, 1, 3]
T, B, I, H = 6, 4, 3, 5


def run(module, x, layout, requires):
    """The module on x (padded [T, B, I] float64) in layout: 'padded', 'packed' or 'nested'.
    requires: which of 'input', 'state', 'weights' require grad. Returns (the tensors whose
    gradients are compared, a loss)."""
    dtype = next(module.parameters()).dtype
    x = x.to(dtype).detach().requires_grad_("input" in requires)
    for p in module.parameters():
        p.grad = None
        p.requires_grad_("weights" in requires)
    D = 2 if module.bidirectional else 1
    g = torch.Generator().manual_seed(5)
    P = getattr(module, "proj_size", 0) or H
    hs = [torch.randn(module.num_layers * D, B, P, generator=g, dtype=torch.float64)]
    if module.mode == "LSTM":
        hs.append(torch.randn(module.num_layers * D, B, H, generator=g, dtype=torch.float64))
    hs = [h.to(dtype).requires_grad_("state" in requires) for h in hs]
    hx = tuple(hs) if module.mode == "LSTM" else hs[0]
    if layout == "padded":
        out, fin = module(x, hx, lengths=LENGTHS)
        outs = [out]
    elif layout == "packed":
        packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        out, fin = module(packed, hx)
        outs = [out.data]
    else:
        nested = torch.nested.nested_tensor_from_jagged(
            torch.cat([x[:n, b] for b, n in enumerate(LENGTHS)]),
            torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()]),
            max_seqlen=max(LENGTHS),
        )
        out, fin = module(nested, hx)
        outs = [out.values()]
    outs += list(fin) if isinstance(fin, tuple) else [fin]
    w = torch.Generator().manual_seed(6)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=w, dtype=torch.float64)).sum() for o in outs
    )
    leaves = {"input": [x], "state": hs, "weights": list(module.parameters())}
    return leaves, loss


WANTED = {
    "data_input": ("state", "weights"),  # the input is data: no grad_input
    "frozen": ("input", "state"),  # frozen weights: no weight gradients
    "state_only": ("state",),
}


@pytest.mark.parametrize("layout", ["padded", "packed", "nested"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_masked_backward_equals_the_full_backward(kind, bidirectional, dtype, layout):
    _, ours = make_kind_pair(kind, I, H, num_layers=2, bidirectional=bidirectional, dtype=dtype)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves, loss = run(ours, x, layout, ("input", "state", "weights"))
    full = {k: torch.autograd.grad(loss, v, retain_graph=True) for k, v in leaves.items()}
    for case, requires in WANTED.items():
        leaves, loss = run(ours, x, layout, requires)
        with OpArguments("_backward", "output_mask") as rec:
            loss.backward()
        for k, v in leaves.items():
            for n, (t, want) in enumerate(zip(v, full[k])):
                if k in requires:
                    assert torch.equal(t.grad, want), f"{case}: {k}[{n}]"
        # What the backward ops were asked for, top layer first (one call per layer, or per
        # direction where a short bidirectional call runs them apart): the first layer's
        # input gradient only where the input requires grad (the upper layer's input is the
        # lower layer's output, which does), the weights' only where they are trained.
        n = len(rec.values) // 2
        assert len(rec.values) in (2, 4), (case, rec.values)
        top, first = [True, "weights" in requires], ["input" in requires, "weights" in requires]
        assert rec.values == [top] * n + [first] * n, (case, rec.values)


@pytest.mark.parametrize("case", list(WANTED))
@pytest.mark.parametrize("kind", KINDS)
def test_masked_backward_matches_nn_with_packing(kind, case):
    requires = WANTED[case]
    ref, ours = make_kind_pair(kind, I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves_ours, loss_ours = run(ours, x, "padded", requires)
    # The same inputs through nn + packing.
    leaves_ref = {
        "input": [leaves_ours["input"][0].detach().requires_grad_("input" in requires)],
        "state": [h.detach().requires_grad_("state" in requires) for h in leaves_ours["state"]],
        "weights": list(ref.parameters()),
    }
    for p in ref.parameters():
        p.requires_grad_("weights" in requires)
    hs = leaves_ref["state"]
    out, fin = packed_baseline(
        ref, leaves_ref["input"][0], LENGTHS, tuple(hs) if len(hs) > 1 else hs[0]
    )
    outs = [out, *(fin if isinstance(fin, tuple) else (fin,))]
    w = torch.Generator().manual_seed(6)
    loss_ref = sum((o * torch.randn(o.shape, generator=w, dtype=torch.float64)).sum() for o in outs)
    for k in requires:
        got = torch.autograd.grad(loss_ours, leaves_ours[k], retain_graph=True)
        want = torch.autograd.grad(loss_ref, leaves_ref[k], retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


# ------------------------------------------------------------------ the ops
def op_and_args(kind, layout, device, dtype, D=2):
    """A backward op and its arguments (without output_mask), from a forward's results."""
    return backward_op_and_args(kind, layout, device, dtype, LENGTHS, I, H, D=D)


MASKS = [[False, True], [True, False], [False, False]]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("kind", KINDS)
def test_op_masked_results_are_empty_and_the_rest_unchanged(kind, layout, dtype, device):
    op, args, cell = op_and_args(kind, layout, device, dtype)
    full = op(*args)
    assert torch.equal(op(*args, [True, True])[0], full[0])
    n_states = cell.states
    for mask in MASKS:
        got = op(*args, mask)
        assert len(got) == len(full)
        for k, (a, b) in enumerate(zip(got, full)):
            masked = (k == 0 and not mask[0]) or (k > n_states and not mask[1])
            if masked:
                assert a.shape == (0,), f"mask {mask}: result {k} has shape {tuple(a.shape)}"
            else:
                assert torch.equal(a, b), f"mask {mask}: result {k} differs"


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", ["padded", "offsets"])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_backward_with_masks(kind, layout, device):
    op, args, _ = op_and_args(kind, layout, device, torch.float64)
    for mask in MASKS:
        torch.library.opcheck(op, (*args, mask))


# ATen's products and ours that stand in for them over few positions (named in profiles:
# csrc/cpu/weight_grad.cpp, the input gradient in csrc/cpu/recurrence.h).
PRODUCTS = (
    "aten::mm",
    "aten::addmm",
    "varlen_rnn::f32_weight_grad",
    "varlen_rnn::bf16_weight_grad",
    "varlen_rnn::f32_rows_times",
)


def _matrix_products(op, args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        op(*args)
    return sum(e.count for e in prof.key_averages() if e.key in PRODUCTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_masked_gemms_do_not_run(kind, dtype):
    """The input GEMM (dx = dG W_ih) and the weight GEMMs (dW_ih, dW_hh[, dW_hr]) are not run
    where masked: fewer matrix products in the op, fewest with both masked."""
    op, args, _ = op_and_args(kind, "padded", "cpu", dtype, D=1)
    full = _matrix_products(op, args)
    no_input = _matrix_products(op, (*args, [False, True]))
    no_weights = _matrix_products(op, (*args, [True, False]))
    neither = _matrix_products(op, (*args, [False, False]))
    assert no_input == full - 1, (full, no_input)
    assert no_weights <= full - 2, (full, no_weights)
    assert neither == no_weights - 1, (no_weights, neither)


@pytest.mark.parametrize("kind", KINDS)
def test_module_backward_asks_for_what_autograd_needs(kind):
    """Through a module: data input -> the op skips dx, frozen weights -> it skips the weight
    GEMMs (one layer, so the layer's input is the module's)."""
    _, ours = make_kind_pair(kind, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def products(requires):
        _, loss = run(ours, x, "padded", requires)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        return sum(e.count for e in prof.key_averages() if e.key in PRODUCTS)

    full = products(("input", "state", "weights"))
    assert products(WANTED["data_input"]) == full - 1
    assert products(WANTED["frozen"]) <= full - 2
    assert products(WANTED["state_only"]) <= full - 3

"""The fake kernels and autograd formulas of every op in csrc/ops.cpp, registered once per
cell of varlen_rnn._schema.CELLS (that module's docstring has the ops' shared argument
layout).

Importing varlen_rnn.ops imports this module; nothing here is public.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._schema import (
    CELLS,
    Cell,
    _Args,
    _layout,
    _op,
    _reference,
    _workspace_dtype,
)


# ------------------------------------------------------------------ fake kernels
def _forward_fake(cell: Cell, ragged: bool, args):
    *args, need_workspace = args
    a = _Args.split(cell, ragged, args)
    input, hx, w_ih = a.input, a.states[0], a.weights[0]
    G = cell.gates
    torch._check(w_ih.dim() == 3, lambda: f"w_ih must be [D, {G}H, I], got {tuple(w_ih.shape)}")
    D, H = w_ih.shape[0], w_ih.shape[1] // G
    w_hr = a.weights[4] if cell.proj else None
    P = H if w_hr is None else w_hr.shape[1]
    if ragged:
        torch._check(input.dim() == 2, lambda: f"input must be [N, I], got {tuple(input.shape)}")
        torch._check(hx.dim() == 3, lambda: f"hx must be [D, B, H], got {tuple(hx.shape)}")
        N, B = input.shape[0], hx.shape[1]
        output = input.new_empty((N, D * P))
        rows = N  # every backend keeps the N valid rows
    else:
        torch._check(input.dim() == 3, lambda: f"input must be 3-D, got {input.dim()}-D")
        batch_first = a.tail[0]
        T, B = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
        output = input.new_empty((B, T, D * P) if batch_first else (T, B, D * P))
        # Rows are the backend's choice: the N valid positions on the CPU (a value
        # known only from lengths' data), T*B on CUDA (no host sync to learn N). Meta
        # tensors (a real call on device "meta", not a fake tensor) have no data to learn N
        # from: there it is T*B, as on CUDA.
        if not need_workspace:
            rows = 0
        elif input.device.type == "meta":
            rows = T * B
        else:
            rows = torch.library.get_ctx().new_dynamic_size()
    finals = [input.new_empty((D, B, P))] + [input.new_empty((D, B, H))] * (cell.states - 1)
    shape = (D, rows, cell.saved * H) if need_workspace else (0,)
    workspace = input.new_empty(shape, dtype=_workspace_dtype(input))
    return (output, *finals, workspace)


def _backward_fake(cell: Cell, ragged: bool, args):
    n = 1 + cell.states  # incoming gradients
    input = args[n]
    at = n + 1 + (4 if ragged else 1)
    states = args[at : at + cell.states]
    w_ih, w_hh = args[at + cell.states : at + cell.states + 2]
    # output_mask, the last argument (defaulted: [True, True]), ends the list.
    want_input, want_weights = args[-1] if isinstance(args[-1], (list, tuple)) else (True, True)
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    empty = lambda: input.new_empty((0,))  # noqa: E731  (what a mask leaves out)
    D, G = w_ih.shape[0], w_ih.shape[1]
    weights = [like(w_ih), like(w_hh), input.new_empty((D, G)), input.new_empty((D, G))]
    if cell.proj:
        w_hr = args[at + cell.states + 2]
        weights.append(empty() if w_hr is None else like(w_hr))
    if not want_weights:
        weights = [empty() for _ in weights]
    return (like(input) if want_input else empty(), *map(like, states), *weights)


# ------------------------------------------------------------------ autograd
def _setup_context(cell: Cell, ragged: bool, ctx, inputs, output):
    *args, ctx.need_workspace = inputs
    out, workspace = output[0], output[-1]
    ctx.mark_non_differentiable(workspace)
    # Unused outputs reach the backward as None instead of zero tensors: autograd would
    # otherwise fill a [D, rows, S*H] zero gradient for the workspace.
    ctx.set_materialize_grads(False)
    # Tensors (and absent optional tensors) go through save_for_backward, the rest
    # (layout, max_len, options, batch_first) stays on ctx. The kernels' backward never
    # reads the biases; the double-backward recomputation does.
    at = _layout(cell, ragged)
    ctx.consts = [args[k] for k in at.consts]
    ctx.save_for_backward(*(args[k] for k in at.tensors), out, workspace)


def _backward(cell: Cell, ragged: bool, ctx, *grads):
    if not ctx.need_workspace:
        name = f"{cell.name}_layer{'_ragged' if ragged else ''}"
        raise RuntimeError(
            f"varlen_rnn::{name}_forward was called with need_workspace=False, so it "
            "kept nothing for the backward; call it with need_workspace=True (as "
            f"varlen_rnn.ops.{name} does when gradients are required)"
        )
    at = _layout(cell, ragged)
    *saved, out, workspace = ctx.saved_tensors
    args = [None] * at.n
    for k, t in zip(at.tensors, saved):
        args[k] = t
    for k, v in zip(at.consts, ctx.consts):
        args[k] = v
    states, weights = args[at.states], args[at.weights]
    # An unused output's gradient arrives as None (set_materialize_grads(False)). The states'
    # become zeros ([D, B, H]); the output's stays None, which the backward op reads as
    # zeros without a [T, B, D*H] tensor of them (a classifier reading only h_n).
    grad_out, *grad_states = grads
    grad_states = [torch.zeros_like(t) if g is None else g for g, t in zip(grad_states, states)]
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients need a graph
        grads = [torch.zeros_like(out) if grad_out is None else grad_out, *grad_states]
        reference = _reference(cell, ragged)
        found = _differentiable_backward(ctx, grads, args, reference, at.n + 1)
        return found
    # Only what autograd asks for: the input's gradient is not wanted where the input is
    # data, the weights' where they are frozen; the op then skips those GEMMs.
    needs = ctx.needs_input_grad
    want_input = needs[0]
    want_weights = any(needs[at.weights])
    # Below autograd: the backward op's own autograd kernel (_not_differentiable, reached
    # from the dispatcher in Python) would only redispatch, ~30 us a call.
    with torch._C._AutoDispatchBelowAutograd():
        result = _op(cell, ragged, "backward")(
            grad_out,
            *grad_states,
            args[0],
            *args[at.index],
            *states,
            *weights[:2],
            *weights[4:],
            out,
            workspace,
            *args[at.options],
            *args[at.tail],
            [want_input, want_weights],
        )
    g_w = list(result[1 + cell.states :]) if want_weights else [None] * len(weights)
    if weights[2] is None:  # no biases: their gradients are computed but not wanted
        g_w[2] = g_w[3] = None
    if cell.proj and weights[4] is None:
        g_w[4] = None
    found: list[Tensor | None] = [None] * (at.n + 1)
    found[0] = result[0] if want_input else None
    found[at.states] = result[1 : 1 + cell.states]
    found[at.weights] = g_w
    return tuple(found)


def _differentiable_backward(ctx, grads, inputs, layer, n_results):
    """The layer's gradients as a function of its inputs and of grads, differentiable
    once more: the layer is recomputed with plain ops (layer(*inputs), varlen_rnn.reference,
    the same semantics as the kernels) and differentiated with create_graph=True. inputs are
    the op's leading arguments in order; n_results the op's argument count. Only gradients
    of gradients pay for it; first-order backward never comes here."""
    wanted = [
        k
        for k, t in enumerate(inputs)
        if isinstance(t, Tensor) and ctx.needs_input_grad[k] and t.requires_grad
    ]
    result: list[Tensor | None] = [None] * n_results
    if not wanted:
        return tuple(result)
    # The kernels run with autocast off; so does their stand-in.
    with torch.autocast(inputs[0].device.type, enabled=False):
        outs = layer(*inputs)
    found = torch.autograd.grad(
        tuple(outs),
        [inputs[k] for k in wanted],
        grads,
        create_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )
    for k, g in zip(wanted, found):
        result[k] = g
    return tuple(result)


def _not_differentiable(op: str, wrapper: str, module: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"varlen_rnn::{op} has no derivative of its own: for gradients of "
            f"gradients call varlen_rnn.ops.{wrapper} (or varlen_rnn.{module}) and "
            "differentiate with create_graph=True, which recomputes the layer with "
            "differentiable ops"
        )

    return backward


def _setup_nothing(ctx, inputs, output):
    pass


def _register(cell: Cell, ragged: bool) -> None:
    wrapper = f"{cell.name}_layer{'_ragged' if ragged else ''}"
    fwd, bwd = f"varlen_rnn::{wrapper}_forward", f"varlen_rnn::{wrapper}_backward"
    torch.library.register_fake(fwd, lambda *args: _forward_fake(cell, ragged, args))
    torch.library.register_fake(bwd, lambda *args: _backward_fake(cell, ragged, args))
    torch.library.register_autograd(
        fwd,
        lambda ctx, *grads: _backward(cell, ragged, ctx, *grads),
        setup_context=lambda ctx, inputs, output: _setup_context(cell, ragged, ctx, inputs, output),
    )
    module = {"gru": "GRU", "lstm": "LSTM", "rnn": "RNN"}[cell.name]
    torch.library.register_autograd(
        bwd,
        _not_differentiable(f"{wrapper}_backward", wrapper, module),
        setup_context=_setup_nothing,
    )


for _cell in CELLS.values():
    for _ragged in (False, True):
        _register(_cell, _ragged)

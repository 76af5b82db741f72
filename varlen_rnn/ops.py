"""Thin Python layer over torch.ops.varlen_rnn: autograd and fake (meta) kernels.

The math lives in C++ (csrc/); this file wires the registered backward op into
autograd and gives shapes to torch.compile / torch.export. What the kernels have no
derivative for (gradients of gradients, forward-mode AD, torch.func's grad) goes
through the plain-PyTorch layer of varlen_rnn.reference instead.
Shape legend: T time, B batch, I input, H hidden, D directions; r|z|n gates.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .reference import gru_layer_ragged_reference, gru_layer_reference

__all__ = ["gru_layer", "gru_layer_ragged"]

_HALF = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _needs_differentiable_path(tensors) -> bool:
    """Forward-mode AD (a dual tensor of torch.autograd.forward_ad, or torch.func.jvp,
    jacfwd, hessian) and torch.func's grad/jacrev: the registered autograd formula covers
    none of them (forward mode has no formula; functorch refuses register_autograd), so
    the layer runs as plain differentiable ops (varlen_rnn.reference) instead."""
    if torch.compiler.is_compiling():  # dynamo/export: no functorch interpreters to look at
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    if stack and any(i.key() in _FUNCTORCH_AD for i in stack):
        return True
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


_FUNCTORCH_AD = (torch._C._functorch.TransformType.Jvp, torch._C._functorch.TransformType.Grad)


def _need_workspace(tensors) -> bool:
    """Whether the forward must keep what its backward reads: a gradient is wanted."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gru_layer(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths: Tensor,  # [B] int64/int32, on the CPU or input's device
    hx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, 3H, I]
    w_hh: Tensor,  # [D, 3H, H]
    b_ih: Tensor | None,  # [D, 3H]
    b_hh: Tensor | None,  # [D, 3H]
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """One GRU layer (both directions if D == 2) over a padded, length-masked batch.

    Returns output [T, B, D*H] (or [B, T, D*H]), zero past each length, and
    h_n [D, B, H], each row's state after its own last valid step.
    """
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh)
    if _needs_differentiable_path(tensors):
        return gru_layer_reference(input, lengths, *tensors[1:], batch_first)
    need_workspace = _need_workspace(tensors)
    # The kernels run with autocast excluded (csrc/gru.h NoAutocastGuard); GRU._run
    # picks the dtypes by torch.nn.GRU's autocast policy.
    output, h_n, _ = torch.ops.varlen_rnn.gru_layer_forward(
        input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace
    )
    return output, h_n


@torch.library.register_fake("varlen_rnn::gru_layer_forward")
def _gru_layer_forward_fake(
    input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace
):
    torch._check(input.dim() == 3, lambda: f"input must be 3-D, got {input.dim()}-D")
    torch._check(w_ih.dim() == 3, lambda: f"w_ih must be [D, 3H, I], got {tuple(w_ih.shape)}")
    T, B = (input.shape[1], input.shape[0]) if batch_first else (input.shape[0], input.shape[1])
    D, H = w_ih.shape[0], w_ih.shape[1] // 3
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    output = input.new_empty(out_shape)
    h_n = input.new_empty((D, B, H))
    if need_workspace:
        # Rows are the backend's choice: the N valid positions on the CPU (a value
        # known only from lengths' data), T*B on CUDA (no host sync to learn N).
        rows = torch.library.get_ctx().new_dynamic_size()
        workspace = input.new_empty((D, rows, 4 * H), dtype=_opmath(input.dtype))
    else:
        workspace = input.new_empty((0,), dtype=_opmath(input.dtype))
    return output, h_n, workspace


def _layer_grads_fake(input, hx, w_ih, w_hh):
    """Shapes of a layer backward's six results, the same for every layout."""
    D, G = w_ih.shape[0], w_ih.shape[1]
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(hx, memory_format=torch.contiguous_format),
        torch.empty_like(w_ih, memory_format=torch.contiguous_format),
        torch.empty_like(w_hh, memory_format=torch.contiguous_format),
        input.new_empty((D, G)),
        input.new_empty((D, G)),
    )


@torch.library.register_fake("varlen_rnn::gru_layer_backward")
def _gru_layer_backward_fake(
    grad_output, grad_h_n, input, lengths, hx, w_ih, w_hh, output, workspace, batch_first
):
    return _layer_grads_fake(input, hx, w_ih, w_hh)


def _setup_context(ctx, inputs, output):
    input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace = inputs
    out, _h_n, workspace = output
    ctx.batch_first = batch_first
    ctx.need_workspace = need_workspace
    ctx.mark_non_differentiable(workspace)
    # Unused outputs reach _backward as None instead of zero tensors: autograd
    # would otherwise fill a [D, T*B, 4H] zero gradient for the workspace.
    ctx.set_materialize_grads(False)
    # The kernels' backward never reads the biases; the double-backward recomputation does.
    ctx.save_for_backward(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, out, workspace)


def _backward(ctx, grad_output, grad_h_n, _grad_workspace):
    if not ctx.need_workspace:
        raise RuntimeError(
            "varlen_rnn::gru_layer_forward was called with need_workspace=False, so it "
            "kept nothing for the backward; call it with need_workspace=True (as "
            "varlen_rnn.ops.gru_layer does when gradients are required)"
        )
    input, lengths, hx, w_ih, w_hh, b_ih, b_hh, out, workspace = ctx.saved_tensors
    grad_output, grad_h_n = _materialize(grad_output, grad_h_n, out, hx)
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients need a graph
        inputs = (input, lengths, hx, w_ih, w_hh, b_ih, b_hh)

        def layer(*args):
            return gru_layer_reference(*args, ctx.batch_first)

        return _differentiable_backward(ctx, (grad_output, grad_h_n), inputs, layer, 9)
    g_in, g_hx, g_wih, g_whh, g_bih, g_bhh = torch.ops.varlen_rnn.gru_layer_backward(
        grad_output, grad_h_n, input, lengths, hx, w_ih, w_hh, out, workspace, ctx.batch_first
    )
    if b_ih is None:
        g_bih = g_bhh = None
    return g_in, None, g_hx, g_wih, g_whh, g_bih, g_bhh, None, None


def _materialize(grad_output, grad_h_n, out, hx):
    """Zeros for an unused output's gradient (set_materialize_grads(False) passes None)."""
    grad_output = torch.zeros_like(out) if grad_output is None else grad_output
    grad_h_n = torch.zeros_like(hx) if grad_h_n is None else grad_h_n
    return grad_output, grad_h_n


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
        out, h_n = layer(*inputs)
    found = torch.autograd.grad(
        (out, h_n),
        [inputs[k] for k in wanted],
        grads,
        create_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )
    for k, g in zip(wanted, found):
        result[k] = g
    return tuple(result)


torch.library.register_autograd(
    "varlen_rnn::gru_layer_forward", _backward, setup_context=_setup_context
)


# ------------------------------------------------------------------ ragged rows
# N = input.size(0) valid positions, nothing padded; seq_index/layout say which row is (t, b):
# layout 0 = offsets [B+1] (a jagged nested tensor's values, sequence-major), layout 1 =
# batch_sizes [T] + sorted_indices (PackedSequence.data, time-major). See csrc/ops.cpp.


def gru_layer_ragged(
    input: Tensor,  # [N, I]
    seq_index: Tensor,  # layout 0: offsets [B+1]; layout 1: batch_sizes [T] int64 on the CPU
    sorted_indices: Tensor | None,  # layout 1: [B] rank -> sequence (None = identity)
    layout: int,  # 0 = offsets, 1 = packed
    max_len: int,  # >= every length: the step-loop bound
    hx: Tensor,  # [D, B, H] in sequence order b
    w_ih: Tensor,  # [D, 3H, I]
    w_hh: Tensor,  # [D, 3H, H]
    b_ih: Tensor | None,  # [D, 3H]
    b_hh: Tensor | None,  # [D, 3H]
) -> tuple[Tensor, Tensor]:
    """One GRU layer (both directions if D == 2) over ragged rows.

    Returns output [N, D*H] in input's row order and h_n [D, B, H], each sequence's
    state after its own last step (hx for a zero-length sequence).
    """
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh)
    index = (seq_index, sorted_indices, layout, max_len)
    if _needs_differentiable_path(tensors):
        return gru_layer_ragged_reference(input, *index, *tensors[1:])
    need_workspace = _need_workspace(tensors)
    output, h_n, _ = torch.ops.varlen_rnn.gru_layer_ragged_forward(
        input, *index, *tensors[1:], need_workspace
    )
    return output, h_n


@torch.library.register_fake("varlen_rnn::gru_layer_ragged_forward")
def _gru_layer_ragged_forward_fake(
    input, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh, b_ih, b_hh, need_workspace
):
    torch._check(input.dim() == 2, lambda: f"input must be [N, I], got {tuple(input.shape)}")
    torch._check(hx.dim() == 3, lambda: f"hx must be [D, B, H], got {tuple(hx.shape)}")
    torch._check(w_ih.dim() == 3, lambda: f"w_ih must be [D, 3H, I], got {tuple(w_ih.shape)}")
    N, B = input.shape[0], hx.shape[1]
    D, H = w_ih.shape[0], w_ih.shape[1] // 3
    output = input.new_empty((N, D * H))
    h_n = input.new_empty((D, B, H))
    rows = N if need_workspace else 0  # every backend keeps the N valid rows
    shape = (D, rows, 4 * H) if need_workspace else (0,)
    workspace = input.new_empty(shape, dtype=_opmath(input.dtype))
    return output, h_n, workspace


@torch.library.register_fake("varlen_rnn::gru_layer_ragged_backward")
def _gru_layer_ragged_backward_fake(
    grad_output,
    grad_h_n,
    input,
    seq_index,
    sorted_indices,
    layout,
    max_len,
    hx,
    w_ih,
    w_hh,
    output,
    workspace,
):
    return _layer_grads_fake(input, hx, w_ih, w_hh)


def _setup_ragged_context(ctx, inputs, output):
    input, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh, b_ih, b_hh, need_ws = inputs
    out, _h_n, workspace = output
    ctx.layout, ctx.max_len, ctx.need_workspace = layout, max_len, need_ws
    ctx.mark_non_differentiable(workspace)
    ctx.set_materialize_grads(False)  # as _setup_context: no zero gradient for the workspace
    ctx.save_for_backward(
        input, seq_index, sorted_indices, hx, w_ih, w_hh, b_ih, b_hh, out, workspace
    )


def _ragged_backward(ctx, grad_output, grad_h_n, _grad_workspace):
    if not ctx.need_workspace:
        raise RuntimeError(
            "varlen_rnn::gru_layer_ragged_forward was called with need_workspace=False, so "
            "it kept nothing for the backward; call it with need_workspace=True (as "
            "varlen_rnn.ops.gru_layer_ragged does when gradients are required)"
        )
    input, seq_index, sorted_indices, hx, w_ih, w_hh, b_ih, b_hh, out, ws = ctx.saved_tensors
    grad_output, grad_h_n = _materialize(grad_output, grad_h_n, out, hx)
    inputs = (input, seq_index, sorted_indices, ctx.layout, ctx.max_len, hx, w_ih, w_hh)
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradients need a graph
        grads = (grad_output, grad_h_n)
        inputs += (b_ih, b_hh)
        return _differentiable_backward(ctx, grads, inputs, gru_layer_ragged_reference, 11)
    g_in, g_hx, g_wih, g_whh, g_bih, g_bhh = torch.ops.varlen_rnn.gru_layer_ragged_backward(
        grad_output, grad_h_n, *inputs, out, ws
    )
    if b_ih is None:
        g_bih = g_bhh = None
    return g_in, None, None, None, None, g_hx, g_wih, g_whh, g_bih, g_bhh, None


torch.library.register_autograd(
    "varlen_rnn::gru_layer_ragged_forward", _ragged_backward, setup_context=_setup_ragged_context
)


def _not_differentiable(op: str, wrapper: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"varlen_rnn::{op} has no derivative of its own: for gradients of "
            f"gradients call varlen_rnn.ops.{wrapper} (or varlen_rnn.GRU) and differentiate "
            "with create_graph=True, which recomputes the layer with differentiable ops"
        )

    return backward


def _setup_nothing(ctx, inputs, output):
    pass


for _op, _wrapper in (
    ("gru_layer_backward", "gru_layer"),
    ("gru_layer_ragged_backward", "gru_layer_ragged"),
):
    torch.library.register_autograd(
        f"varlen_rnn::{_op}", _not_differentiable(_op, _wrapper), setup_context=_setup_nothing
    )

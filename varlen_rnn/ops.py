"""Thin Python layer over torch.ops.varlen_rnn: autograd and fake (meta) kernels.

The math lives in C++ (csrc/); this file only wires the registered backward op
into autograd and gives shapes to torch.compile / torch.export.
Shape legend: T time, B batch, I input, H hidden, D directions; r|z|n gates.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gru_layer"]

_HALF = (torch.float16, torch.bfloat16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _refuse_functorch_jvp() -> None:
    """torch.func.jvp/jacfwd would otherwise run the op as if it were not differentiable
    and return zero tangents without a word; torch.autograd.forward_ad already raises."""
    if torch.compiler.is_compiling():  # dynamo/export: no functorch interpreters to look at
        return
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack):
        raise NotImplementedError(
            "varlen_rnn: forward-mode AD (torch.func.jvp, jacfwd, hessian) of the GRU is not "
            "supported; use reverse mode (loss.backward() or torch.autograd.grad)"
        )


def gru_layer(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths: Tensor,  # [B] int64/int32 on input's device
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
    _refuse_functorch_jvp()
    tensors = (input, hx, w_ih, w_hh, b_ih, b_hh)
    need_workspace = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    # The kernels run with autocast excluded (csrc/gru.h NoAutocastGuard); GRU._run
    # picks the dtypes by torch.nn.GRU's autocast policy.
    output, h_n, _ = torch.ops.varlen_rnn.gru_layer_forward(
        input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace
    )
    return output, h_n


@torch.library.register_fake("varlen_rnn::gru_layer_forward")
def _gru_layer_forward_fake(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace):
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


@torch.library.register_fake("varlen_rnn::gru_layer_backward")
def _gru_layer_backward_fake(
    grad_output, grad_h_n, input, lengths, hx, w_ih, w_hh, output, workspace, batch_first
):
    D, G = w_ih.shape[0], w_ih.shape[1]
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(hx, memory_format=torch.contiguous_format),
        torch.empty_like(w_ih, memory_format=torch.contiguous_format),
        torch.empty_like(w_hh, memory_format=torch.contiguous_format),
        input.new_empty((D, G)),
        input.new_empty((D, G)),
    )


def _setup_context(ctx, inputs, output):
    input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first, need_workspace = inputs
    out, _h_n, workspace = output
    ctx.batch_first = batch_first
    ctx.need_workspace = need_workspace
    ctx.has_bias = b_ih is not None
    ctx.mark_non_differentiable(workspace)
    # Unused outputs reach _backward as None instead of zero tensors: autograd
    # would otherwise fill a [D, T*B, 4H] zero gradient for the workspace.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, lengths, hx, w_ih, w_hh, out, workspace)


def _backward(ctx, grad_output, grad_h_n, _grad_workspace):
    if not ctx.need_workspace:
        raise RuntimeError(
            "varlen_rnn::gru_layer_forward was called with need_workspace=False, so it "
            "kept nothing for the backward; call it with need_workspace=True (as "
            "varlen_rnn.ops.gru_layer does when gradients are required)"
        )
    input, lengths, hx, w_ih, w_hh, out, workspace = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    g_in, g_hx, g_wih, g_whh, g_bih, g_bhh = torch.ops.varlen_rnn.gru_layer_backward(
        grad_output, grad_h_n, input, lengths, hx, w_ih, w_hh, out, workspace, ctx.batch_first
    )
    if not ctx.has_bias:
        g_bih = g_bhh = None
    return g_in, None, g_hx, g_wih, g_whh, g_bih, g_bhh, None, None


torch.library.register_autograd(
    "varlen_rnn::gru_layer_forward", _backward, setup_context=_setup_context
)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "varlen_rnn: double backward (gradients of gradients) of the GRU is not "
        "supported; use torch.nn.GRU without cuDNN for higher-order gradients"
    )


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "varlen_rnn::gru_layer_backward", _no_double_backward, setup_context=_setup_nothing
)

"""Thin Python layer over torch.ops.varlen_rnn: the layer functions the modules call.

The math lives in C++ (csrc/); varlen_rnn._autograd wires the registered backward ops
into autograd and gives shapes to torch.compile / torch.export. What the kernels have no
derivative for (gradients of gradients, forward-mode AD, torch.func's grad) goes
through the plain-PyTorch layers of varlen_rnn.reference instead. The ops' shared argument
layout and the table of cells are varlen_rnn._schema's.
"""

from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _autograd  # noqa: F401  (the fake kernels and autograd formulas, registered on import)
from ._schema import _LAYOUTS, CELLS, Cell, _full, _op, _reference

__all__ = [
    "gru_layer",
    "gru_layer_ragged",
    "lstm_layer",
    "lstm_layer_ragged",
    "rnn_layer",
    "rnn_layer_ragged",
]


def _needs_differentiable_path(tensors, stack) -> bool:
    """Forward-mode AD (a dual tensor of torch.autograd.forward_ad, or torch.func.jvp,
    jacfwd, hessian) and torch.func's grad/jacrev: the registered autograd formula covers
    none of them (forward mode has no formula; functorch refuses register_autograd), so
    the layer runs as plain differentiable ops (varlen_rnn.reference) instead. stack:
    functorch's interpreter stack (empty outside its transforms)."""
    if stack and any(i.key() in _FUNCTORCH_AD for i in stack):
        return True
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors
    )


_FUNCTORCH_AD = (torch._C._functorch.TransformType.Jvp, torch._C._functorch.TransformType.Grad)


def _need_workspace(tensors) -> bool:
    """Whether the forward must keep what its backward reads: a gradient is wanted."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layer(cell: Cell, ragged: bool, args, squeezed: bool = False) -> tuple[Tensor, ...]:
    """Any cell's layer: (output, h_n[, c_n]) from the op's arguments minus need_workspace.

    squeezed: one direction whose weights come without their D dimension (a module's
    parameters as they are, [G*H, I] for [1, G*H, I]). An eager call that records a graph
    runs the recording op (csrc/recording.cpp), which puts the dimension back below
    autograd, so the graph holds no view node per weight, which the backward of every
    one-step call would run; other calls take the views here.

    The kernels run with autocast excluded (csrc/layer.h NoAutocastGuard); the modules pick
    the dtypes by torch.nn's autocast policy."""
    tensors = (args[0], *args[_LAYOUTS[cell.name, ragged].differentiable])  # input, states, w
    op = _op(cell, ragged, "forward")
    if torch.compiler.is_compiling():  # dynamo/export: no functorch interpreters to look at
        return tuple(op(*_full(cell, ragged, args, squeezed), _need_workspace(tensors))[:-1])
    stack = torch._C._functorch.get_interpreter_stack()
    if _needs_differentiable_path(tensors, stack):
        return tuple(_reference(cell, ragged)(*_full(cell, ragged, args, squeezed)))
    if torch.jit.is_tracing():
        # The graph records the op that decides need_workspace when it runs (csrc/ops.cpp):
        # a flag decided here would be a constant of the graph, whatever the grad mode
        # the traced module later runs in.
        return tuple(_op(cell, ragged, "")(*_full(cell, ragged, args, squeezed)))
    need_workspace = _need_workspace(tensors)
    if stack:
        return tuple(op(*_full(cell, ragged, args, squeezed), need_workspace)[:-1])
    if need_workspace:
        if _compiled_autograd_on():  # the registered autograd's node, which it compiles
            return tuple(op(*_full(cell, ragged, args, squeezed), True)[:-1])
        return _layer_recording(cell, ragged, args, squeezed)
    return _layer_below_autograd(cell, ragged, args, squeezed)


def _compiled_autograd_on() -> bool:
    """Whether compiled autograd (torch._dynamo.compiled_autograd) may run this call's
    backward: its context is active, or torch._dynamo.config.compiled_autograd is set. It
    compiles every node of the graph, which the recording op's C++ node does not support, the
    registered autograd's node does. (Neither is on before torch._dynamo is imported.)"""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    config = sys.modules.get("torch._dynamo.config")
    return bool(
        (ca is not None and getattr(ca, "compiled_autograd_enabled", False))
        or (config is not None and getattr(config, "compiled_autograd", False))
    )


def _layer_recording(cell: Cell, ragged: bool, args, squeezed: bool) -> tuple[Tensor, ...]:
    """_layer of an eager call through the recording op (the caller knows: _layer, or
    forward's shortcut RNNBase._eager_shortcut), which records one C++ node calling the
    backward op where a gradient is wanted, and nothing otherwise (csrc/recording.cpp)."""
    return tuple(_op(cell, ragged, "recording")(*args, squeezed))


def _layer_below_autograd(cell: Cell, ragged: bool, args, squeezed: bool) -> tuple[Tensor, ...]:
    """_layer of an eager call with no gradient wanted (the caller knows: _layer, or forward's
    shortcut RNNBase._eager_shortcut). The op's autograd kernel (torch.library's, in Python)
    would only redispatch below autograd, so call below it directly. That kernel's round trip
    through Python cost more than the rest of a one-step call's Python (B=1 T=1 H=16, 1
    thread: 45 -> 29 us for the op).

    Squeezed weights go through the recording op, which records nothing here (no gradient is
    wanted: its condition is _need_workspace's) and makes their [1, ...] views in C++: four
    views in Python cost a greedy decoder's GRU step 9-11 us more (ad hoc, I=H=256, B=1-8, 2
    threads, from cold caches: "Small calls" in benchmarks/README.md)."""
    if squeezed:
        return _layer_recording(cell, ragged, args, True)
    with torch._C._AutoDispatchBelowAutograd():
        op = _op(cell, ragged, "forward")
        return tuple(op(*args, False)[:-1])


# ------------------------------------------------------------------ the public layers
# One layer (both directions if D == 2). Padded: output [T, B, D*P] (or [B, T, D*P]), zero
# past each length. Ragged (N = input.size(0) valid positions, nothing padded; layout 0 =
# offsets [B+1], a jagged nested tensor's values, sequence-major; layout 1 = batch_sizes [T]
# + sorted_indices, PackedSequence.data, time-major; see csrc/ops.cpp): output [N, D*P] in
# input's row order. h_n [D, B, P] (c_n [D, B, H]) is each sequence's state after its own
# last valid step (hx for a zero-length sequence), in sequence order b.


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
    """One GRU layer over a padded, length-masked batch: (output, h_n)."""
    return _layer(CELLS["gru"], False, (input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first))


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
    """One GRU layer over ragged rows: (output [N, D*H], h_n)."""
    index = (seq_index, sorted_indices, layout, max_len)
    return _layer(CELLS["gru"], True, (input, *index, hx, w_ih, w_hh, b_ih, b_hh))


def lstm_layer(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths: Tensor,  # [B] int64/int32, on the CPU or input's device
    hx: Tensor,  # [D, B, P]
    cx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, 4H, I]
    w_hh: Tensor,  # [D, 4H, P]
    b_ih: Tensor | None,  # [D, 4H]
    b_hh: Tensor | None,  # [D, 4H]
    w_hr: Tensor | None,  # [D, P, H], None without a projection (P = H)
    batch_first: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer (gates i|f|g|o) over a padded batch: (output, h_n, c_n)."""
    args = (input, lengths, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_first)
    return _layer(CELLS["lstm"], False, args)


def lstm_layer_ragged(
    input: Tensor,  # [N, I]
    seq_index: Tensor,  # as gru_layer_ragged
    sorted_indices: Tensor | None,
    layout: int,
    max_len: int,
    hx: Tensor,  # [D, B, P] in sequence order b
    cx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, 4H, I]
    w_hh: Tensor,  # [D, 4H, P]
    b_ih: Tensor | None,  # [D, 4H]
    b_hh: Tensor | None,  # [D, 4H]
    w_hr: Tensor | None,  # [D, P, H]
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over ragged rows: (output [N, D*P], h_n, c_n)."""
    index = (seq_index, sorted_indices, layout, max_len)
    return _layer(CELLS["lstm"], True, (input, *index, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr))


def rnn_layer(
    input: Tensor,  # [T, B, I] or [B, T, I] if batch_first
    lengths: Tensor,  # [B] int64/int32, on the CPU or input's device
    hx: Tensor,  # [D, B, H]
    w_ih: Tensor,  # [D, H, I]
    w_hh: Tensor,  # [D, H, H]
    b_ih: Tensor | None,  # [D, H]
    b_hh: Tensor | None,  # [D, H]
    nonlinearity: str = "tanh",  # or "relu"
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer over a padded batch: (output, h_n)."""
    args = (input, lengths, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_first)
    return _layer(CELLS["rnn"], False, args)


def rnn_layer_ragged(
    input: Tensor,  # [N, I]
    seq_index: Tensor,  # as gru_layer_ragged
    sorted_indices: Tensor | None,
    layout: int,
    max_len: int,
    hx: Tensor,  # [D, B, H] in sequence order b
    w_ih: Tensor,  # [D, H, I]
    w_hh: Tensor,  # [D, H, H]
    b_ih: Tensor | None,  # [D, H]
    b_hh: Tensor | None,  # [D, H]
    nonlinearity: str = "tanh",  # or "relu"
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer over ragged rows: (output [N, D*H], h_n)."""
    index = (seq_index, sorted_indices, layout, max_len)
    args = (input, *index, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return _layer(CELLS["rnn"], True, args)

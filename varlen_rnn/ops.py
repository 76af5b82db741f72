"""Thin Python layer over torch.ops.varlen_rnn: the layer functions the modules call.

The math lives in C++ (csrc/); varlen_rnn._autograd wires the registered backward ops
into autograd and gives shapes to torch.compile / torch.export. What the kernels have no
derivative for (gradients of gradients, forward-mode AD, torch.func's grad) goes
through the plain-PyTorch layers of varlen_rnn.reference instead.

Every cell's ops share one argument layout (csrc/ops.cpp), so the wiring is written once
over a table of cells: a forward op takes
    input, index, states, w_ih, w_hh, b_ih, b_hh, [w_hr], [options], [batch_first], need_workspace
with index = (lengths,) for a padded batch or (seq_index, sorted_indices, layout, max_len)
for ragged rows, states = (hx,) or (hx, cx) for the LSTM, w_hr the LSTM's projection and
options the RNN's nonlinearity; batch_first only for a padded batch. Its backward takes
    grad_output, grad_states, input, index, states, w_ih, w_hh, [w_hr], output, workspace,
    [options], [batch_first]
and returns grad_input, grad_states, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, [grad_w_hr].
Shape legend: T time, B batch, I input, H hidden, D directions, G gates, P the LSTM's
state width (proj_size or H), S values saved per unit (see csrc/ops.cpp).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import reference
from .reference import gru_layer_ragged_reference, gru_layer_reference  # noqa: F401

__all__ = [
    "gru_layer",
    "gru_layer_ragged",
    "lstm_layer",
    "lstm_layer_ragged",
    "rnn_layer",
    "rnn_layer_ragged",
]

_HALF = (torch.float16, torch.bfloat16)


class Cell(NamedTuple):
    """What this layer needs to know of a cell (csrc/cells/*.h has the rest)."""

    name: str  # the ops are {name}_layer[_ragged]_forward / _backward
    gates: int  # G: w_ih is [D, G*H, I]
    saved: int  # S: the workspace is [D, rows, S*H]
    states: int  # 1 (h) or 2 (h, c)
    proj: bool  # an optional projection w_hr [D, P, H] after the biases
    options: int  # non-tensor cell arguments after the weights (the RNN's nonlinearity)


CELLS = {
    "gru": Cell("gru", 3, 4, 1, False, 0),
    "lstm": Cell("lstm", 4, 6, 2, True, 0),
    "rnn": Cell("rnn", 1, 1, 1, False, 1),
}


class _Layout(NamedTuple):
    """Where each group of a forward op's arguments sits (need_workspace excluded): the
    same for every call of one op, so computed once per (cell, ragged)."""

    index: slice  # (lengths,) or (seq_index, sorted_indices, layout, max_len)
    states: slice  # (hx,) or (hx, cx)
    weights: slice  # (w_ih, w_hh, b_ih, b_hh) + (w_hr,) for a cell with a projection
    options: slice  # (nonlinearity,) or ()
    tail: slice  # (batch_first,) for a padded batch, () for ragged rows
    n: int  # the argument count
    consts: tuple[int, ...]  # the non-tensor arguments (layout, max_len, options, tail)
    tensors: tuple[int, ...]  # the others: tensors, and optional tensors that may be None
    differentiable: slice  # after the input: the states and weights (not the index)


def _layout(cell: Cell, ragged: bool) -> _Layout:
    return _LAYOUTS[cell.name, ragged]


def _make_layout(cell: Cell, ragged: bool) -> _Layout:
    a = 1 + (4 if ragged else 1)
    b = a + cell.states
    c = b + 4 + cell.proj
    d = c + cell.options
    n = d + (0 if ragged else 1)
    consts = ((3, 4) if ragged else ()) + tuple(range(c, n))
    tensors = tuple(k for k in range(n) if k not in consts)
    differentiable = slice(a, c)
    return _Layout(
        slice(1, a),
        slice(a, b),
        slice(b, c),
        slice(c, d),
        slice(d, n),
        n,
        consts,
        tensors,
        differentiable,
    )


# Built once (a plain dict: torch.compile traces a lookup in it, not a cache wrapper).
_LAYOUTS = {(c.name, r): _make_layout(c, r) for c in CELLS.values() for r in (False, True)}


class _Args(NamedTuple):
    """A forward op's arguments (need_workspace excluded) in their groups."""

    input: Tensor
    index: tuple
    states: tuple
    weights: tuple
    options: tuple
    tail: tuple

    @staticmethod
    def split(cell: Cell, ragged: bool, args) -> _Args:
        at = _layout(cell, ragged)
        return _Args(
            args[0],
            args[at.index],
            args[at.states],
            args[at.weights],
            args[at.options],
            args[at.tail],
        )


def _op(cell: Cell, ragged: bool, kind: str):
    return _OPS[cell.name, ragged, kind]


# The layer ops of csrc/ops.cpp (varlen_rnn/__init__.py loads _C before importing this):
# kind "forward", "backward", and "" for the one that decides need_workspace itself.
_OPS = {
    (c.name, r, kind): getattr(
        torch.ops.varlen_rnn, f"{c.name}_layer{'_ragged' if r else ''}{kind and '_' + kind}"
    )
    for c in CELLS.values()
    for r in (False, True)
    for kind in ("forward", "backward", "")
}


def _reference(cell: Cell, ragged: bool):
    """The plain-PyTorch layer (varlen_rnn.reference) with the op's arguments minus
    need_workspace, looked up when called: a name set on this module wins, so a test can
    replace it (to prove the first-order backward never calls it)."""
    name = f"{cell.name}_layer{'_ragged' if ragged else ''}_reference"
    return globals().get(name) or getattr(reference, name)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


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


def _unsqueezed(weights) -> list:
    """One direction's weights as the layer op takes them: each with a D dimension of 1 (a
    view), None left as it is."""
    return [None if w is None else w[None] for w in weights]


def _full(cell: Cell, ragged: bool, args, squeezed: bool) -> tuple:
    """The op's arguments: args, with the weights' D dimension put back where squeezed (see
    _layer)."""
    if not squeezed:
        return args
    at = _LAYOUTS[cell.name, ragged].weights
    return (*args[: at.start], *_unsqueezed(args[at]), *args[at.stop :])


def _layer(cell: Cell, ragged: bool, args, squeezed: bool = False) -> tuple[Tensor, ...]:
    """Any cell's layer: (output, h_n[, c_n]) from the op's arguments minus need_workspace.

    squeezed: one direction whose weights come without their D dimension (a module's
    parameters as they are, [G*H, I] for [1, G*H, I]). An eager call that records a graph
    puts the dimension back inside its autograd function (_autograd.EAGER), so the graph
    holds no view node per weight, which the backward of every one-step call would run;
    other calls take the views here.

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
    if need_workspace:  # eager, recording: the op's autograd applied directly (_autograd.EAGER)
        return tuple(_autograd.EAGER[cell.name, ragged, squeezed].apply(*args, True)[:-1])
    # Eager with no gradient wanted: the op's autograd kernel (torch.library's, in Python)
    # would only redispatch below autograd, so call below it directly. That kernel's round
    # trip through Python cost more than the rest of a one-step call's Python (B=1 T=1
    # H=16, 1 thread: 45 -> 29 us for the op).
    with torch._C._AutoDispatchBelowAutograd():
        return tuple(op(*_full(cell, ragged, args, squeezed), False)[:-1])


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


# The fake kernels and autograd formulas (after the names above exist: they import them).
from . import _autograd  # noqa: E402,F401

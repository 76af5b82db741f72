"""The Python side of csrc/ops.cpp's schemas: the cells, the argument layout every cell's
layer ops share, and handles to the ops. varlen_rnn.ops (the layer functions) and
varlen_rnn._autograd (the ops' fake kernels and autograd formulas) both build on it.

Every cell's ops share one argument layout (csrc/ops.cpp), so the wiring is written once
over a table of cells: a forward op takes
    input, index, states, w_ih, w_hh, b_ih, b_hh, [w_hr], [options], [batch_first], need_workspace
with index = (lengths,) for a padded batch or (seq_index, sorted_indices, layout, max_len)
for ragged rows, states = (hx,) or (hx, cx) for the LSTM, w_hr the LSTM's projection and
options the RNN's nonlinearity; batch_first only for a padded batch. Its backward takes
    grad_output, grad_states, input, index, states, w_ih, w_hh, [w_hr], output, workspace,
    [options], [batch_first]
(grad_output None: zero, an output not used)
and returns grad_input, grad_states, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, [grad_w_hr].
Shape legend: T time, B batch, I input, H hidden, D directions, G gates, P the LSTM's
state width (proj_size or H), S values saved per unit (see csrc/ops.cpp).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import reference

_HALF = (torch.float16, torch.bfloat16)


class Cell(NamedTuple):
    """What this layer needs to know of a cell (csrc/cells/*.h has the rest)."""

    name: str  # the ops are {name}_layer[_ragged]_forward / _backward
    gates: int  # G: w_ih is [D, G*H, I]
    # S: the workspace is [D, rows, S*H]; 0 where the saved values are the output itself (the
    # RNN's h': its backward reads the output; csrc/cells/cell.h kWorkspaceSaved).
    saved: int
    states: int  # 1 (h) or 2 (h, c)
    proj: bool  # an optional projection w_hr [D, P, H] after the biases
    options: int  # non-tensor cell arguments after the weights (the RNN's nonlinearity)


CELLS = {
    "gru": Cell("gru", 3, 4, 1, False, 0),
    "lstm": Cell("lstm", 4, 5, 2, True, 0),
    "rnn": Cell("rnn", 1, 0, 1, False, 1),
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


# The layer ops of csrc/ops.cpp (varlen_rnn/__init__.py loads _C before importing ops):
# kind "forward", "backward", "" for the one that decides need_workspace itself, and
# "recording" for an eager call that records a graph (csrc/recording.cpp).
_OPS = {
    (c.name, r, kind): getattr(
        torch.ops.varlen_rnn, f"{c.name}_layer{'_ragged' if r else ''}{kind and '_' + kind}"
    )
    for c in CELLS.values()
    for r in (False, True)
    for kind in ("forward", "backward", "", "recording")
}


def _reference(cell: Cell, ragged: bool):
    """The plain-PyTorch layer (varlen_rnn.reference) with the op's arguments minus
    need_workspace, looked up in that module when called, so a test can replace it (to
    prove the first-order backward never calls it)."""
    return getattr(reference, f"{cell.name}_layer{'_ragged' if ragged else ''}_reference")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _workspace_dtype(input: Tensor) -> torch.dtype:
    """The forward's workspace dtype (csrc/layer.h workspace_dtype): the op-math one, but
    bfloat16 for a bfloat16 input, whose kernels save their values rounded."""
    return torch.bfloat16 if input.dtype == torch.bfloat16 else _opmath(input.dtype)


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

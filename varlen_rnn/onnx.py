"""ONNX export of varlen_rnn.GRU, LSTM and RNN: each padded layer op becomes one ONNX GRU,
LSTM or RNN node with `sequence_lens`, ONNX's own form of per-sequence lengths (no sorting;
the reverse direction starts at each sequence's last valid step; Y_h is each sequence's
last valid state).

    import varlen_rnn.onnx
    program = varlen_rnn.onnx.export(model, (tokens, lengths), dynamic_shapes=...)
    # or, the same: torch.onnx.export(model, args, dynamo=True,
    #                   custom_translation_table=varlen_rnn.onnx.translation_table())

torch.onnx builds a fresh operator registry for every export and offers no public hook to
add to it, so the table has to be passed; varlen_rnn.onnx.export passes it for you.

Each translation (an ONNX Script function, traced) maps the op's arguments as follows.
ONNX shapes: X [T, B, I] time-major (ONNX Runtime refuses layout=1, so batch_first input is
transposed), W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] = concat(Wb, Rb), sequence_lens
int32 [B], initial_h [D, B, H], Y [T, D, B, H], Y_h [D, B, H]. Gate orders: torch's GRU
r|z|n is ONNX's z|r|h (linear_before_reset=1 is torch's n = tanh(W_in x + b_in + r * (W_hn h
+ b_hn))); torch's LSTM i|f|g|o is ONNX's i|o|f|c. Two fix-ups make the node return exactly
what our op does whatever a runtime leaves where the ONNX spec is silent: output past each
length is set to 0 (ONNX Runtime 1.32 writes 0 there already), and a zero-length sequence's
Y_h (and Y_c) is its initial state (ONNX Runtime 1.32 writes 0). A runtime must honour
sequence_lens: ONNX's own reference evaluator (onnx.reference) ignores it.

Not expressible in ONNX, refused at export with a ValueError naming the reason: an LSTM with
proj_size > 0 (ONNX's LSTM has no projection), and ragged input (a PackedSequence or a jagged
nested tensor: pad it and pass lengths instead). Dropout between layers is training-only.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence

try:
    from onnxscript import ir
    from onnxscript import opset18 as op  # torch.onnx's own translations' opset
except ImportError as e:  # the optional extra is not installed
    raise ImportError(
        "varlen_rnn.onnx needs onnx, onnxscript (and onnxruntime to run the result): "
        "pip install 'varlen_rnn[onnx]'"
    ) from e

from ._schema import CELLS

__all__ = ["export", "translation_table"]

# ONNX's gate k is torch's gate _GATE_ORDER[cell][k].
_GATE_ORDER = {"gru": (1, 0, 2), "lstm": (0, 3, 1, 2), "rnn": (0,)}
_ACTIVATION = {"tanh": "Tanh", "relu": "Relu"}


def _reorder(cell: str, w, H: int):
    """w [D, G*H, ...] (or a bias [D, G*H]) from torch's gate order to ONNX's. Slices, not
    one Split: the exporter's optimizer folds single-output ops on weights into initializers."""
    order = _GATE_ORDER[cell]
    if len(order) == 1:
        return w
    gate = lambda k: op.Slice(w, [k * H], [(k + 1) * H], [1])  # noqa: E731
    return op.Concat(*(gate(k) for k in order), axis=1)


def _bias(cell: str, b_ih, b_hh, H: int):
    """ONNX's B [D, 2*G*H] = concat(Wb, Rb), or None (ONNX's default: zeros)."""
    if b_ih is None and b_hh is None:
        return None
    # The schema lets one of the two be None: that one is zeros.
    zeros = lambda like: op.Expand(op.CastLike(0, like), op.Shape(like))  # noqa: E731
    b_ih = zeros(b_hh) if b_ih is None else b_ih
    b_hh = zeros(b_ih) if b_hh is None else b_hh
    return op.Concat(_reorder(cell, b_ih, H), _reorder(cell, b_hh, H), axis=1)


def _hidden_size(w_hh) -> int:
    """H from w_hh [D, G*H, H]: a weight, so its shape is static."""
    H = w_hh.shape[2]
    if not isinstance(H, int):
        raise ValueError(f"ONNX export needs w_hh's shape to be static, got {w_hh.shape}")
    return H


def _time_major(input, batch_first: bool):
    return op.Transpose(input, perm=[1, 0, 2]) if batch_first else input  # [T, B, I]


def _output(Y, x, lengths, batch_first: bool, DH: int):
    """Y [T, D, B, H] -> our output [T, B, D*H] (or [B, T, D*H]), 0 past each length.
    x [T, B, I] is the node's input (its T), lengths int64 [B]."""
    T = op.Squeeze(op.Shape(x, start=0, end=1), [0])
    steps = op.Range(op.Constant(value_int=0), T, op.Constant(value_int=1))  # [T]
    valid = op.Less(op.Unsqueeze(steps, [1]), op.Unsqueeze(lengths, [0]))  # [T, B]
    valid = op.Unsqueeze(valid, [1, 3])  # [T, 1, B, 1]
    Y = op.Where(valid, Y, op.CastLike(0, Y))
    Y = op.Transpose(Y, perm=[2, 0, 1, 3] if batch_first else [0, 2, 1, 3])  # [., ., D, H]
    # D*H spelled out: with T or B = 0, Reshape cannot infer a -1.
    return op.Reshape(Y, op.Constant(value_ints=[0, 0, DH]))


def _final(Y_h, initial, lengths):
    """Y_h [D, B, H] with a zero-length sequence's initial state in place of the runtime's."""
    empty = op.Unsqueeze(op.Equal(lengths, op.Constant(value_int=0)), [0, 2])  # [1, B, 1]
    return op.Where(empty, initial, Y_h)


def _no_workspace(input):
    """The workspace output: empty, as need_workspace=False gives (inference keeps none).
    Its dtype is the op-math dtype: float32 for half inputs, float64 for float64."""
    empty = op.ConstantOfShape(op.Constant(value_ints=[0]))  # float32 [0]
    return op.CastLike(empty, input) if input.dtype == ir.DataType.DOUBLE else empty


def _node(cell: str, input, lengths, states, w_ih, w_hh, b_ih, b_hh, batch_first, **attrs):
    """One ONNX GRU/LSTM/RNN node for a padded layer: (output, *finals, workspace)."""
    D, H = w_ih.shape[0], _hidden_size(w_hh)
    x = _time_major(input, batch_first)
    lens = op.Cast(lengths, to=ir.DataType.INT64)  # [B]; our ops take int32 lengths too
    onnx_op = {"gru": op.GRU, "lstm": op.LSTM, "rnn": op.RNN}[cell]
    Y, *finals = onnx_op(
        x,
        _reorder(cell, w_ih, H),
        _reorder(cell, w_hh, H),
        _bias(cell, b_ih, b_hh, H),
        op.Cast(lens, to=ir.DataType.INT32),
        *states,
        hidden_size=H,
        direction="bidirectional" if D == 2 else "forward",
        **attrs,
    )
    finals = [_final(f, s, lens) for f, s in zip(finals, states)]
    return (_output(Y, x, lens, batch_first, D * H), *finals, _no_workspace(input))


def _gru(
    input,  # [T, B, I] or [B, T, I]
    lengths,  # [B]
    hx,  # [D, B, H]
    w_ih,  # [D, 3H, I]
    w_hh,  # [D, 3H, H]
    b_ih=None,  # [D, 3H]
    b_hh=None,  # [D, 3H]
    batch_first: bool = False,
    need_workspace: bool = False,
):
    return _node(
        "gru", input, lengths, (hx,), w_ih, w_hh, b_ih, b_hh, batch_first, linear_before_reset=1
    )


def _lstm(
    input,  # [T, B, I] or [B, T, I]
    lengths,  # [B]
    hx,  # [D, B, H]
    cx,  # [D, B, H]
    w_ih,  # [D, 4H, I]
    w_hh,  # [D, 4H, H]
    b_ih=None,  # [D, 4H]
    b_hh=None,  # [D, 4H]
    w_hr=None,  # [D, P, H]
    batch_first: bool = False,
    need_workspace: bool = False,
):
    if w_hr is not None:
        raise ValueError(
            "varlen_rnn.LSTM with proj_size > 0 cannot be exported to ONNX: ONNX's LSTM "
            "operator has no projection (w_hr)"
        )
    return _node("lstm", input, lengths, (hx, cx), w_ih, w_hh, b_ih, b_hh, batch_first)


def _rnn(
    input,  # [T, B, I] or [B, T, I]
    lengths,  # [B]
    hx,  # [D, B, H]
    w_ih,  # [D, H, I]
    w_hh,  # [D, H, H]
    b_ih=None,  # [D, H]
    b_hh=None,  # [D, H]
    nonlinearity: str = "tanh",
    batch_first: bool = False,
    need_workspace: bool = False,
):
    activations = [_ACTIVATION[nonlinearity]] * w_ih.shape[0]  # one per direction
    return _node(
        "rnn", input, lengths, (hx,), w_ih, w_hh, b_ih, b_hh, batch_first, activations=activations
    )


def _ragged(cell: str):
    def refuse(*args, **kwargs):
        raise ValueError(
            f"varlen_rnn.{cell.upper()} on ragged input (a PackedSequence or a jagged nested "
            "tensor) cannot be exported to ONNX: ONNX's recurrent operators take a padded "
            "batch [T, B, I] and sequence_lens. Pad the input (e.g. "
            "torch.nn.utils.rnn.pad_packed_sequence) and pass lengths= instead."
        )

    refuse.__name__ = f"_{cell}_ragged"
    return refuse


_PADDED = {"gru": _gru, "lstm": _lstm, "rnn": _rnn}


def translation_table() -> dict:
    """torch.onnx.export(..., dynamo=True)'s custom_translation_table for every varlen_rnn
    forward op: {torch.ops.varlen_rnn.<cell>_layer[_ragged]_forward.default: function}."""
    table = {}
    for cell in CELLS:
        ops = torch.ops.varlen_rnn
        table[getattr(ops, f"{cell}_layer_forward").default] = _PADDED[cell]
        table[getattr(ops, f"{cell}_layer_ragged_forward").default] = _ragged(cell)
    return table


def export(model, args=(), f=None, *, custom_translation_table=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, **kwargs) with varlen_rnn's translations
    added to custom_translation_table (the caller's own entries win). Returns the
    torch.onnx.ONNXProgram."""
    if not kwargs.pop("dynamo", True):
        raise ValueError(
            "varlen_rnn.onnx.export needs dynamo=True: the TorchScript exporter "
            "(dynamo=False) has no translation for varlen_rnn's ops"
        )
    if isinstance(args, (torch.Tensor, PackedSequence)):  # a PackedSequence is a tuple
        args = (args,)
    for a in (*args, *(kwargs.get("kwargs") or {}).values()):
        if isinstance(a, PackedSequence) or (isinstance(a, torch.Tensor) and a.is_nested):
            kind = "a PackedSequence" if isinstance(a, PackedSequence) else "a nested tensor"
            raise ValueError(
                f"varlen_rnn.onnx.export got {kind} as input: ONNX's recurrent operators "
                "take a padded batch [T, B, I] and sequence_lens, and torch.export cannot "
                "trace packing or nested tensors; pad it and pass lengths= instead"
            )
    table = {**translation_table(), **(custom_translation_table or {})}
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)

"""The raw LSTM and RNN layer ops for the tests: one calling shape for every cell and layout.

A Layer holds one layer's states and weights (torch.nn's shapes, stacked over directions), a
Batch one input in one layout; op_forward / op_backward call the torch.ops.varlen_rnn op that
fits both, ref_forward the matching varlen_rnn.reference function.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from varlen_rnn import reference

CELLS = ["lstm", "lstm_proj", "rnn_tanh", "rnn_relu"]
# padded time-major, padded batch-major, ragged offsets (layout 0), ragged packed (layout 1)
LAYOUTS = ["padded", "padded_bf", "offsets", "packed"]
GRAD_NAMES = ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
ops = torch.ops.varlen_rnn


@dataclasses.dataclass
class Layer:
    cell: str
    hx: Tensor  # [D, B, P]
    cx: Tensor | None  # [D, B, H] (LSTM)
    w_ih: Tensor  # [D, G*H, I]
    w_hh: Tensor  # [D, G*H, P]
    b_ih: Tensor | None  # [D, G*H]
    b_hh: Tensor | None  # [D, G*H]
    w_hr: Tensor | None  # [D, P, H] (LSTM with proj_size)

    @property
    def lstm(self) -> bool:
        return self.cell.startswith("lstm")

    @property
    def nonlinearity(self) -> str:
        return "relu" if self.cell == "rnn_relu" else "tanh"

    def tensors(self) -> dict:
        names = ["hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def replace(self, **kwargs) -> Layer:
        return dataclasses.replace(self, **kwargs)


def make_layer(cell, D, B, I, H, P=3, bias=True, dtype=torch.float64, seed=0) -> Layer:
    """Uniform weights in [-0.6, 0.6] (the gates stay away from saturation, so every gradient
    is exercised); P is used only by lstm_proj."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.6).to(dtype)

    assert cell in CELLS, f"cell_ops_testing knows {CELLS}, not {cell!r}"
    lstm = cell.startswith("lstm")
    G, P = (4 if lstm else 1), (P if cell == "lstm_proj" else H)
    return Layer(
        cell,
        hx=rnd(D, B, P),
        cx=rnd(D, B, H) if lstm else None,
        w_ih=rnd(D, G * H, I),
        w_hh=rnd(D, G * H, P),
        b_ih=rnd(D, G * H) if bias else None,
        b_hh=rnd(D, G * H) if bias else None,
        w_hr=rnd(D, P, H) if cell == "lstm_proj" else None,
    )


@dataclasses.dataclass
class Batch:
    layout: str
    x: Tensor  # padded [T, B, I] / [B, T, I]; ragged [N, I]
    lengths: Tensor  # [B] in sequence order
    seq_index: Tensor | None = None  # ragged: offsets [B+1] or batch_sizes [T']
    sorted_indices: Tensor | None = None  # packed: rank -> sequence
    max_len: int = 0  # ragged

    @property
    def batch_first(self) -> bool:
        return self.layout == "padded_bf"

    @property
    def padded(self) -> bool:
        return self.layout.startswith("padded")


def make_batch(layout, lengths, I, T=None, dtype=torch.float64, seed=1) -> Batch:
    """lengths in sequence order; T (padded) / max_len (ragged) defaults to max + 1, so there
    is padding (or slack) past the longest row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    B = lengths.numel()
    T = int(lengths.max()) + 1 if T is None else T
    if layout.startswith("padded"):
        shape = (B, T, I) if layout == "padded_bf" else (T, B, I)
        return Batch(layout, torch.randn(shape, generator=g, dtype=dtype), lengths)
    x = torch.randn(int(lengths.sum()), I, generator=g, dtype=dtype)
    if layout == "offsets":
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return Batch(layout, x, lengths, offsets, None, T)
    assert layout == "packed" and int(lengths.min()) >= 1, "packed rows have length >= 1"
    order = torch.sort(lengths, descending=True, stable=True).indices
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(int(lengths.max())).unsqueeze(1)).sum(1)
    return Batch(layout, x, lengths, batch_sizes, order, T)


def _ragged_args(batch: Batch) -> tuple:
    code = 0 if batch.layout == "offsets" else 1
    return batch.seq_index, batch.sorted_indices, code, batch.max_len


def op_forward(layer: Layer, batch: Batch, need_workspace=True) -> tuple:
    """(output, h_n, c_n or None, workspace) of the op for layer's cell and batch's layout."""
    w = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    if layer.lstm:
        states, extra = (layer.hx, layer.cx), (layer.w_hr,)
    else:
        states, extra = (layer.hx,), (layer.nonlinearity,)
    if batch.padded:
        name, args = (
            "layer_forward",
            (batch.x, batch.lengths, *states, *w, *extra, batch.batch_first),
        )
    else:
        name, args = "layer_ragged_forward", (batch.x, *_ragged_args(batch), *states, *w, *extra)
    cell = "lstm" if layer.lstm else "rnn"
    result = getattr(ops, f"{cell}_{name}")(*args, need_workspace)
    return tuple(result) if layer.lstm else (result[0], result[1], None, result[2])


def op_backward(layer: Layer, batch: Batch, output, workspace, grad_output, grad_h_n, grad_c_n):
    """{name: gradient} from the backward op (GRAD_NAMES; cx and w_hr only where they exist)."""
    if layer.lstm:
        grads_in = (grad_output, grad_h_n, grad_c_n)
        states_w = (layer.hx, layer.cx, layer.w_ih, layer.w_hh, layer.w_hr, output, workspace)
    else:
        grads_in = (grad_output, grad_h_n)
        states_w = (layer.hx, layer.w_ih, layer.w_hh, output, workspace)
    if batch.padded:
        args = (*grads_in, batch.x, batch.lengths, *states_w)
        tail = (layer.nonlinearity,) if not layer.lstm else ()
        tail += (batch.batch_first,)
        name = "layer_backward"
    else:
        args = (*grads_in, batch.x, *_ragged_args(batch), *states_w)
        tail = (layer.nonlinearity,) if not layer.lstm else ()
        name = "layer_ragged_backward"
    cell = "lstm" if layer.lstm else "rnn"
    result = getattr(ops, f"{cell}_{name}")(*args, *tail)
    names = GRAD_NAMES if layer.lstm else [n for n in GRAD_NAMES if n not in ("cx", "w_hr")]
    return dict(zip(names, result))


def ref_forward(layer: Layer, batch: Batch, x=None) -> tuple:
    """(output, h_n, c_n or None) of the reference for layer's cell and batch's layout (x:
    batch.x or a replacement, e.g. one that requires grad)."""
    x = batch.x if x is None else x
    w = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    if layer.lstm:
        states, extra = (layer.hx, layer.cx), (layer.w_hr,)
    else:
        states, extra = (layer.hx,), (layer.nonlinearity,)
    cell = "lstm" if layer.lstm else "rnn"
    if batch.padded:
        fn = getattr(reference, f"{cell}_layer_reference")
        result = fn(x, batch.lengths, *states, *w, *extra, batch.batch_first)
    else:
        fn = getattr(reference, f"{cell}_layer_ragged_reference")
        result = fn(x, *_ragged_args(batch), *states, *w, *extra)
    return tuple(result) if layer.lstm else (result[0], result[1], None)

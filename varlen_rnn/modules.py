"""varlen_rnn.GRU: a drop-in torch.nn.GRU that takes per-sequence lengths.

Same constructor, parameter names, shapes, initialisation and state_dict as
torch.nn.GRU; forward(input, hx=None, lengths=None) runs the fused kernels of
varlen_rnn.ops one layer at a time. Padded input is never sorted: lengths are
given in the caller's order and everything comes back in that order.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import gru_layer

__all__ = ["GRU", "convert"]


class GRU(nn.Module):
    """Multi-layer GRU over variable-length batches; see torch.nn.GRU.

    forward(input, hx=None, lengths=None):
      input   [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, or a PackedSequence
      hx      [num_layers * D, B, H] ([num_layers * D, H] unbatched), default zeros
      lengths B ints in [0, T] in the caller's order (list, or int tensor on the CPU or
              the input's device); default: every sequence has length T. Not allowed
              with a PackedSequence, which carries its own.
    Returns output like input (0 past each length; a PackedSequence for a
    PackedSequence) and h_n [num_layers * D, B, H], each sequence's state after
    its own last valid step (hx for a zero-length sequence).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"GRU got unexpected keyword arguments: {sorted(kwargs)}")
        super().__init__()
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                "probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so "
                "non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")

        self.mode = "GRU"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # Registration order matches torch.nn.GRU so that reset_parameters draws the
        # same numbers from the same seed and state_dicts line up key for key.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * D
            for direction in range(D):
                sfx = "_reverse" if direction == 1 else ""
                shapes = [
                    (f"weight_ih_l{layer}{sfx}", (3 * hidden_size, layer_in)),
                    (f"weight_hh_l{layer}{sfx}", (3 * hidden_size, hidden_size)),
                ]
                if bias:
                    shapes += [
                        (f"bias_ih_l{layer}{sfx}", (3 * hidden_size,)),
                        (f"bias_hh_l{layer}{sfx}", (3 * hidden_size,)),
                    ]
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names += [n for n, _ in shapes]
                self._all_weights.append([n for n, _ in shapes])
        self.reset_parameters()

    @classmethod
    def from_torch(cls, gru: nn.GRU) -> "GRU":
        """A varlen_rnn.GRU with gru's configuration, weights, device, dtype and mode."""
        if getattr(gru, "proj_size", 0):
            raise ValueError("from_torch: GRU with proj_size is not supported")
        w = gru.weight_ih_l0
        new = cls(
            gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first,
            gru.dropout, gru.bidirectional, device=w.device, dtype=w.dtype,
        )
        new.load_state_dict(gru.state_dict())
        new.train(gru.training)
        return new

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn.GRU runs unchanged."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ----------------------------------------------------------------- forward
    def forward(self, input, hx: Tensor | None = None, lengths=None):
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "lengths must be None when input is a PackedSequence: the "
                    "PackedSequence carries its own lengths"
                )
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(
                f"input must be a Tensor or a PackedSequence, got {type(input).__name__}"
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                    )
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(
                f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
            )
        B, T = input.size(batch_dim), input.size(1 - batch_dim)
        self._check_input(input)
        hx = self._check_hx(hx, input, B)
        lengths = _as_lengths(lengths, B, T, input.device)
        output, h_n = self._run(input, hx, lengths, self.batch_first)
        if not batched:
            output, h_n = output.squeeze(batch_dim), h_n.squeeze(1)
        return output, h_n

    def _forward_packed(self, packed: PackedSequence, hx: Tensor | None):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
        self._check_input(data)
        # Padded in the PackedSequence's own (sorted) order; nothing is re-sorted.
        padded, lens = pad_packed_sequence(PackedSequence(data, batch_sizes))
        B = padded.size(1)
        if hx is not None:
            if hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            if sorted_indices is not None:
                hx = hx.index_select(1, sorted_indices)
        hx = self._check_hx(hx, data, B)
        output, h_n = self._run(padded, hx, lens.to(data.device), batch_first=False)
        out_data = pack_padded_sequence(output, lens, enforce_sorted=True).data
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), h_n

    def _check_input(self, input: Tensor) -> None:
        w = self.weight_ih_l0
        if input.dtype != w.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"input dtype ({input.dtype}) does not match the GRU's weight dtype "
                f"({w.dtype}): convert the input with input.to({w.dtype}) or the model "
                f"with model.to({input.dtype})"
            )
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}"
            )
        if input.device != w.device:
            raise RuntimeError(
                f"input is on {input.device} but the GRU's weights are on {w.device}"
            )

    def _check_hx(self, hx: Tensor | None, input: Tensor, B: int) -> Tensor:
        D = 2 if self.bidirectional else 1
        expected = (self.num_layers * D, B, self.hidden_size)
        if hx is None:
            return torch.zeros(expected, dtype=input.dtype, device=input.device)
        if tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")
        if hx.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(f"hx dtype ({hx.dtype}) does not match input dtype ({input.dtype})")
        if hx.device != input.device:
            raise RuntimeError(f"hx is on {hx.device} but input is on {input.device}")
        return hx

    def _run(self, x: Tensor, hx: Tensor, lengths: Tensor, batch_first: bool):
        D = 2 if self.bidirectional else 1
        dtype = _autocast_dtype(x, hx) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x, hx = x.to(dtype), hx.to(dtype)
        h_n = []
        for layer in range(self.num_layers):
            names = self._all_weights[layer * D : (layer + 1) * D]
            w = [_stack([getattr(self, n[k]) for n in names], dtype) for k in range(len(names[0]))]
            b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
            x, h = gru_layer(x, lengths, hx[layer * D : (layer + 1) * D], w[0], w[1], b_ih, b_hh, batch_first)
            h_n.append(h)
            if self.dropout > 0 and self.training and layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.cat(h_n, 0) if len(h_n) > 1 else h_n[0]


# Read once: dynamo cannot trace the call (a torch.* function returning a bool).
_HAS_CUDNN = torch.backends.cudnn.is_available()


def _autocast_dtype(x: Tensor, hx: Tensor) -> torch.dtype:
    """The dtype torch.nn.GRU computes in and returns under autocast, so that
    swapping it for varlen_rnn.GRU changes no dtype downstream.

    cuDNN (CUDA input of float32/float16/float64 with cuDNN enabled): autocast's
    _cudnn_rnn wrapper casts input, hx and weights to float16 (whatever the
    autocast dtype; float64 is left alone). Otherwise (CPU, bfloat16 input, cuDNN
    off) nn.GRU has no autocast rule of its own: the state and outputs keep hx's
    dtype (the input's when hx is None) and only its internal GEMMs are autocast;
    the kernels here then run in that dtype (float32 state: float32 throughout).
    """
    if (
        x.device.type == "cuda"
        and x.dtype in (torch.float32, torch.float16, torch.float64)
        and x.numel() > 0
        and torch.backends.cudnn.enabled
        and _HAS_CUDNN
    ):
        return torch.float64 if x.dtype == torch.float64 else torch.float16
    return hx.dtype


def _stack(ws: list[Tensor], dtype: torch.dtype) -> Tensor:
    """[D, ...] from one weight per direction (a view when D == 1)."""
    ws = [w.to(dtype) for w in ws]
    return ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)


def _as_lengths(lengths, B: int, T: int, device: torch.device) -> Tensor:
    """lengths as an int64 [B] tensor on `device`. Values are checked by the kernels."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    if isinstance(lengths, Tensor):
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"lengths must be an integer tensor (int64 or int32), got {lengths.dtype}")
        if lengths.dim() == 0:
            lengths = lengths.reshape(1)
        if lengths.dim() != 1 or lengths.numel() != B:
            raise ValueError(
                f"lengths must be 1-D with one entry per sequence (B={B}), got shape {tuple(lengths.shape)}"
            )
        return lengths.to(device=device, dtype=torch.int64, non_blocking=True)
    if isinstance(lengths, numbers.Integral):
        lengths = [lengths]
    if not isinstance(lengths, Sequence) or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in lengths
    ):
        raise TypeError(
            "lengths must be a list of ints or an integer tensor, got "
            f"{type(lengths).__name__}" + (f" {list(lengths)!r}" if isinstance(lengths, Sequence) else "")
        )
    if len(lengths) != B:
        raise ValueError(f"lengths must have one entry per sequence (B={B}), got {len(lengths)}")
    bad = [(i, v) for i, v in enumerate(lengths) if not 0 <= v <= T]
    if bad:
        i, v = bad[0]
        raise ValueError(f"lengths must be in [0, T] with T={T}, got lengths[{i}]={v}")
    return torch.tensor(list(lengths), dtype=torch.int64).to(device, non_blocking=True)


def convert(module: nn.Module) -> nn.Module:
    """Replace every torch.nn.GRU inside `module` by a varlen_rnn.GRU with the same
    weights, device, dtype and training mode. Returns the module (a new one if
    `module` itself is an nn.GRU); other modules are changed in place."""
    if isinstance(module, nn.GRU):
        return GRU.from_torch(module)
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module

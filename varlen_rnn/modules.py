"""varlen_rnn.GRU: a drop-in torch.nn.GRU that takes per-sequence lengths.

Same constructor, parameter names, shapes, initialisation, state_dict and error messages
as torch.nn.GRU; forward(input, hx=None, lengths=None) runs the fused kernels of
varlen_rnn.ops one layer at a time. Padded input is never sorted: lengths are given in the
caller's order and everything comes back in that order. Argument checks live in _inputs.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _inputs
from .ops import gru_layer, gru_layer_ragged

__all__ = ["GRU", "convert"]


class LayerWeights(NamedTuple):
    """One layer's parameters, both directions stacked (a view when D == 1)."""

    w_ih: Tensor  # [D, 3H, I] (I = D*H above layer 0)
    w_hh: Tensor  # [D, 3H, H]
    b_ih: Tensor | None  # [D, 3H]
    b_hh: Tensor | None  # [D, 3H]


_DEFAULTS = {
    "num_layers": 1,
    "bias": True,
    "batch_first": False,
    "dropout": 0.0,
    "bidirectional": False,
}


def _parameter_shapes(sfx: str, layer_in: int, H: int, bias: bool) -> list[tuple[str, tuple]]:
    """One direction of one layer: nn.GRU's parameter names and shapes, in its order."""
    shapes = [
        ("weight_ih", (3 * H, layer_in)),
        ("weight_hh", (3 * H, H)),
        ("bias_ih", (3 * H,)),
        ("bias_hh", (3 * H,)),
    ]
    return [(f"{kind}_{sfx}", shape) for kind, shape in shapes[: 4 if bias else 2]]


class GRU(nn.Module):
    """Multi-layer GRU over variable-length batches; see torch.nn.GRU.

    forward(input, hx=None, lengths=None):
      input   [T, B, I] ([B, T, I] if batch_first), [T, I] unbatched, a PackedSequence,
              or a jagged nested tensor [B, j, I] (ragged dimension second whatever
              batch_first says)
      hx      [num_layers * D, B, H] ([num_layers * D, H] unbatched), default zeros
      lengths B ints in [0, T] in the caller's order: a list or tuple of ints, a NumPy
              integer array, or an integer tensor (on the CPU or the input's device);
              default: every sequence has length T. Not allowed with a PackedSequence
              or a nested tensor, which carry their own.
    Returns output like input (0 past each length; a PackedSequence for a
    PackedSequence; a jagged nested tensor [B, j, D*H] with input's offsets for a nested
    tensor) and h_n [num_layers * D, B, H], each sequence's state after its own last
    valid step (hx for a zero-length sequence). Ragged input (packed, nested) runs on its
    rows as stored: nothing is padded, layers pass [N, D*H] rows to each other.
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
        _inputs.check_constructor_args(
            input_size, hidden_size, num_layers, bias, batch_first, dropout
        )
        self.mode = "GRU"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # Registration order matches torch.nn.GRU so that reset_parameters draws the
        # same numbers from the same seed and state_dicts line up key for key.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for sfx in self._suffixes(layer):
                shapes = _parameter_shapes(sfx, layer_in, hidden_size, bias)
                for name, shape in shapes:
                    param = torch.empty(shape, device=device, dtype=dtype)
                    self.register_parameter(name, nn.Parameter(param))
                self._flat_weights_names += [n for n, _ in shapes]
                self._all_weights.append([n for n, _ in shapes])
        self.reset_parameters()

    @classmethod
    def from_torch(cls, gru: nn.GRU) -> GRU:
        """A varlen_rnn.GRU with gru's configuration, weights, device, dtype and mode."""
        if getattr(gru, "proj_size", 0):
            raise ValueError("from_torch: GRU with proj_size is not supported")
        w = gru.weight_ih_l0
        new = cls(
            gru.input_size,
            gru.hidden_size,
            gru.num_layers,
            gru.bias,
            gru.batch_first,
            gru.dropout,
            gru.bidirectional,
            device=w.device,
            dtype=w.dtype,
        )
        new.load_state_dict(gru.state_dict())
        new.train(gru.training)
        return new

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def num_directions(self) -> int:
        """D: 2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list[str]:
        """Parameter-name suffixes of layer's directions, forward first (nn.GRU's names)."""
        return [f"l{layer}", f"l{layer}_reverse"][: self.num_directions]

    def _layer_weights(self, layer: int, dtype: torch.dtype) -> LayerWeights:
        def stacked(kind: str) -> Tensor:  # [D, ...]
            ws = [getattr(self, f"{kind}_{sfx}").to(dtype) for sfx in self._suffixes(layer)]
            return ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)

        if not self.bias:
            return LayerWeights(stacked("weight_ih"), stacked("weight_hh"), None, None)
        return LayerWeights(
            stacked("weight_ih"), stacked("weight_hh"), stacked("bias_ih"), stacked("bias_hh")
        )

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn.GRU runs unchanged."""

    def extra_repr(self) -> str:
        """nn.GRU's: the sizes, then every argument that differs from its default."""
        changed = [k for k, default in _DEFAULTS.items() if getattr(self, k) != default]
        return ", ".join(
            [f"{self.input_size}, {self.hidden_size}"]
            + [f"{k}={getattr(self, k)}" for k in changed]
        )

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
        if input.is_nested:
            if lengths is not None:
                raise ValueError(
                    "lengths must be None when input is a nested tensor: the nested "
                    "tensor carries its own lengths (its offsets)"
                )
            return self._forward_nested(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        _inputs.check_hx_rank(hx, batched)
        if not batched:
            input = input.unsqueeze(batch_dim)
            hx = None if hx is None else hx.unsqueeze(1)
        B, T = input.size(batch_dim), input.size(1 - batch_dim)
        hx = self._checked_hx(hx, input, B)
        lengths = _inputs.as_lengths(lengths, B, T, input.device)
        bf = self.batch_first
        output, h_n = self._run(input, hx, lambda x, h, w: gru_layer(x, lengths, h, *w, bf))
        if not batched:
            output, h_n = output.squeeze(batch_dim), h_n.squeeze(1)
        return output, h_n

    def _forward_packed(self, packed: PackedSequence, hx: Tensor | None):
        """PackedSequence.data [N, I] as it is (layout 1, time-major): hx and h_n stay in the
        caller's order, the op reads sorted_indices itself (what nn.GRU's permutations do)."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
        _inputs.check_hx_rank(hx, batched=True)
        # batch_sizes lives on the CPU (PackedSequence keeps it there): no host sync.
        B = int(batch_sizes[0]) if batch_sizes.numel() else 0
        hx = self._checked_hx(hx, data, B)
        index = (batch_sizes, sorted_indices, 1, batch_sizes.numel())
        out, h_n = self._run(data, hx, lambda x, h, w: gru_layer_ragged(x, *index, h, *w))
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), h_n

    def _forward_nested(self, input: Tensor, hx: Tensor | None):
        """A jagged nested tensor's values [N, I] as they are (layout 0, sequence-major)."""
        values, offsets, max_len = _inputs.jagged_parts(input)
        _inputs.check_hx_rank(hx, batched=True)
        hx = self._checked_hx(hx, values, offsets.size(0) - 1)
        index = (offsets, None, 0, max_len)
        out, h_n = self._run(values, hx, lambda x, h, w: gru_layer_ragged(x, *index, h, *w))
        # The same offsets tensor, so out's ragged dimension is input's (out + input works);
        # max_len goes along, so the next layer or GRU on out needs no host read to find it.
        out = torch.nested.nested_tensor_from_jagged(
            out, offsets, min_seqlen=input._maybe_min_seqlen, max_seqlen=max_len
        )
        return out, h_n

    def _checked_hx(self, hx: Tensor | None, input: Tensor, B: int) -> Tensor:
        """Every check of input [..., I] and hx [L*D, B, H] in torch.nn.GRU's order (dtype,
        feature size, hidden shape, devices); hx, or zeros when it is None."""
        _inputs.check_input(input, self.weight_ih_l0, self.input_size)
        expected = (self.num_layers * self.num_directions, B, self.hidden_size)
        if hx is not None:
            _inputs.check_hx_shape(hx, expected)
        _inputs.check_devices(input, self._flat_weights, hx)
        if hx is None:
            return torch.zeros(expected, dtype=input.dtype, device=input.device)
        _inputs.check_hx_dtype(hx, input)
        return hx

    def _run(self, x: Tensor, hx: Tensor, layer_fn):
        """The layer loop; layer_fn(x, hx [D, B, H], LayerWeights) -> (output, h_n [D, B, H])
        runs one layer on x's layout (padded, or ragged rows [N, D*H])."""
        D = self.num_directions
        dtype = _autocast_dtype(x, hx) if _inputs.autocast_on(x.device) else x.dtype
        x, hx = x.to(dtype), hx.to(dtype)
        h_n = []
        for layer in range(self.num_layers):
            x, h = layer_fn(x, hx[layer * D : (layer + 1) * D], self._layer_weights(layer, dtype))
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

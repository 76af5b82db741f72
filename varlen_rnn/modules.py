"""varlen_rnn.GRU, LSTM and RNN: drop-ins for torch.nn.GRU, LSTM and RNN that take
per-sequence lengths.

Same constructors, parameter names, shapes, initialisation, state_dicts and error messages
as torch.nn's; forward(input, hx=None, lengths=None) runs the fused kernels of
varlen_rnn.ops one layer at a time. Padded input is never sorted: lengths are given in the
caller's order and everything comes back in that order. The machinery shared by the three
is varlen_rnn._base.RNNBase; argument checks live in _inputs.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _inputs
from ._autocast import cudnn_autocast
from ._base import RNNBase

__all__ = ["GRU", "LSTM", "RNN", "convert"]


class GRU(RNNBase):
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

    _cell = "gru"
    _torch_cls = nn.GRU

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
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
        )


class LSTM(RNNBase):
    """Multi-layer LSTM (gates i|f|g|o, optional projection) over variable-length batches;
    see torch.nn.LSTM.

    forward(input, hx=None, lengths=None): input and lengths as varlen_rnn.GRU's;
      hx = (h_0 [num_layers * D, B, P], c_0 [num_layers * D, B, H]) (without the batch
      dimension for unbatched input), default zeros; P = proj_size, or H without one.
    Returns output like input with D*P features (0 past each length) and (h_n, c_n):
    h_n [num_layers * D, B, P], c_n [num_layers * D, B, H], each sequence's state after
    its own last valid step (h_0, c_0 for a zero-length sequence).
    """

    _cell = "lstm"
    _torch_cls = nn.LSTM
    _state_messages = ("Expected hidden[0] size", "Expected hidden[1] size")
    # nn.LSTM's versions of RNNBase's helpers (a state pair; see RNNBase.check_input)
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
        )

    def _config(self) -> dict:
        return {**RNNBase._config(self), "proj_size": self.proj_size}

    def _states_of(self, hx, batched: bool):
        return _inputs.check_lstm_hx(hx, batched)

    def _result(self, finals: tuple[Tensor, ...]):
        return finals[0], finals[1]

    def _run(self, x: Tensor, states: tuple[Tensor, ...], index: tuple, tail: tuple, flat):
        """With a projection and autocast off cuDNN on the CPU, nn.LSTM's h is the output of
        an autocast GEMM (w_hr): output and h_n come back in the autocast dtype, c_n in c_0's.
        The kernels run in the state's dtype; output and h_n are cast to match. (On CUDA
        the base rule already gives the autocast dtype throughout.)"""
        out, (h_n, c_n) = super()._run(x, states, index, tail, flat)
        if (
            self.proj_size
            and _inputs.autocast_on(out.device)
            and out.dtype != torch.float64
            and cudnn_autocast(x) is None
        ):
            low = torch.get_autocast_dtype(out.device.type)
            out, h_n = out.to(low), h_n.to(low)
        return out, (h_n, c_n)


class RNN(RNNBase):
    """Multi-layer Elman RNN (tanh or ReLU) over variable-length batches; see torch.nn.RNN.

    forward(input, hx=None, lengths=None): as varlen_rnn.GRU's, returning (output, h_n).
    """

    _cell = "rnn"
    _torch_cls = nn.RNN
    _rank_message = "{}: Expected input to be 2D or 3D, got {}D tensor instead"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
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
            raise TypeError(f"RNN got unexpected keyword arguments: {sorted(kwargs)}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
        )

    def _config(self) -> dict:
        return {**RNNBase._config(self), "nonlinearity": self.nonlinearity}

    def _options(self) -> tuple:
        return (self.nonlinearity,)

    def _autocast_dtype(self, x: Tensor, hx: Tensor) -> torch.dtype:
        """Without cuDNN, nn.RNN's steps are autocast GEMMs whose results carry the state:
        it returns the autocast dtype (a float64 input stays float64)."""
        if x.dtype == torch.float64:
            return torch.float64
        return cudnn_autocast(x) or torch.get_autocast_dtype(x.device.type)


_REPLACEMENTS = ((nn.GRU, GRU), (nn.LSTM, LSTM), (nn.RNN, RNN))


def convert(module: nn.Module) -> nn.Module:
    """Replace every torch.nn.GRU, LSTM and RNN inside `module` by its varlen_rnn twin with
    the same weights, device, dtype and training mode. Returns the module (a new one if
    `module` itself is one of them); other modules are changed in place."""
    for nn_cls, cls in _REPLACEMENTS:
        if isinstance(module, nn_cls):
            return cls.from_torch(module)
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module

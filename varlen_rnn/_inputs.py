"""Argument checks and conversions of varlen_rnn.GRU, LSTM and RNN, kept apart from the
modules themselves.

Wherever torch.nn.GRU / LSTM / RNN has a message for the same mistake, the same exception
type and text come first (code that matches torch.nn's errors keeps working); anything after
it is our hint. `lengths` is ours alone and accepts what pack_padded_sequence accepts.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

try:  # NumPy is optional for torch; data loaders hand out its arrays as lengths
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_LENGTHS_KINDS = "a list or tuple of ints, a NumPy integer array or an integer tensor"


def check_constructor_args(
    input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size=0
):
    """torch.nn.RNNBase's constructor checks, in its order, with its types and wording."""
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
            stacklevel=4,  # the caller of GRU/LSTM/RNN(...)
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
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")


_CPU = torch.device("cpu")


def autocast_on(device: torch.device) -> bool:
    """torch.is_autocast_enabled for device, False where autocast does not exist (meta).
    With autocast off everywhere (the common case) one C call answers for the CPU and
    CUDA, which torch._C._is_any_autocast_enabled covers (with XPU, IPU, XLA, HPU and
    PrivateUse1, not MPS), and device.type, a new string at every call, is never made."""
    if not torch._C._is_any_autocast_enabled() and (device == _CPU or device.type == "cuda"):
        return False
    kind = device.type
    if kind in ("cpu", "cuda"):  # always available; torch 2.11's dynamo cannot trace the check
        return torch.is_autocast_enabled(kind)
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def check_hx_rank(hx: Tensor | None, batched: bool) -> None:
    want = 3 if batched else 2
    if hx is not None and hx.dim() != want:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise RuntimeError(
            f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor"
        )


def check_lstm_hx(hx, batched: bool) -> tuple[Tensor, Tensor] | None:
    """The LSTM's hx: None or a pair (h_0, c_0) of the input's rank (nn.LSTM's message)."""
    if hx is None:
        return None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"hx must be a tuple (h_0, c_0) for an LSTM, got {type(hx).__name__}"
            + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else "")
        )
    h, c = hx
    want = 3 if batched else 2
    if h.dim() != want or c.dim() != want:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise RuntimeError(
            f"For {kind} input, hx and cx should also be {want}-D but got "
            f"({h.dim()}-D, {c.dim()}-D) tensors"
        )
    return h, c


def check_input(input: Tensor, weight: Tensor, input_size: int) -> None:
    """input [..., I] against the module's first weight: dtype, then feature size."""
    if input.dtype != weight.dtype and not autocast_on(input.device):
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})"
        )
    if input.shape[-1] != input_size:
        raise RuntimeError(
            "input.size(-1) must be equal to input_size. "
            f"Expected {input_size}, got {input.size(-1)}"
        )


def check_hx_shape(
    hx: Tensor, expected: tuple[int, int, int], what: str = "Expected hidden size"
) -> None:
    """what: nn's words, "Expected hidden size" or the LSTM's "Expected hidden[k] size"."""
    if hx.shape != expected:  # torch.Size is a tuple
        raise RuntimeError(f"{what} {expected}, got {list(hx.shape)}")


def check_devices(input: Tensor, params: Iterable[Tensor], states: Iterable[Tensor]) -> None:
    """Before any kernel runs (a meta tensor never reaches one by mistake)."""
    device = input.device
    for p in params:
        if p.device != device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor "
                f"at {input.device} and parameter tensor at {p.device}"
            )
    for hx in states:
        if hx.device != device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {hx.device}"
            )


def check_hx_dtype(hx: Tensor, input: Tensor, name: str = "hx") -> None:
    # nn.GRU fails later, in a GEMM, with a RuntimeError that names neither argument.
    if hx.dtype != input.dtype and not autocast_on(input.device):
        raise RuntimeError(
            f"{name} dtype ({hx.dtype}) does not match input dtype ({input.dtype}): "
            f"convert {name} with {name}.to({input.dtype})"
        )


def as_lengths(lengths, B: int, T: int, device: torch.device) -> Tensor:
    """lengths as an int64/int32 [B] tensor. Lengths that live on the CPU (a list, tuple,
    NumPy array or CPU tensor) stay there, so the backend checks their values on the host
    before any kernel runs; a device tensor moves to `device`. None: T for every row,
    made on `device`. A list is range-checked here; tensor values by the kernels."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    if np is not None and isinstance(lengths, np.ndarray):
        if not np.issubdtype(lengths.dtype, np.integer):
            got = f"a NumPy array of {lengths.dtype}"
            raise TypeError(f"lengths must be {_LENGTHS_KINDS}, got {got}")
        lengths = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))
    if isinstance(lengths, Tensor):
        return _tensor_lengths(lengths, B, device)
    # A list or tuple of plain ints (the common case) needs none of the abstract-base-class
    # isinstance checks below (numbers.Integral, Sequence): they cost more than making the
    # tensor (B=8: this function took about 4x as long with them on the development machine).
    plain = type(lengths) in (list, tuple) and all(type(v) is int for v in lengths)
    if not plain and isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
        lengths = [lengths]
    if not plain and (
        not isinstance(lengths, Sequence)
        or isinstance(lengths, str)
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in lengths)
    ):
        shown = f" {list(lengths)!r}" if isinstance(lengths, (list, tuple)) else ""
        raise TypeError(f"lengths must be {_LENGTHS_KINDS}, got {type(lengths).__name__}{shown}")
    if len(lengths) != B:
        raise ValueError(f"lengths must have one entry per sequence (B={B}), got {len(lengths)}")
    for i, v in enumerate(lengths):
        if not 0 <= v <= T:
            raise ValueError(f"lengths must be in [0, T] with T={T}, got lengths[{i}]={v}")
    return torch.tensor(lengths if plain else [int(v) for v in lengths], dtype=torch.int64)


def _tensor_lengths(lengths: Tensor, B: int, device: torch.device) -> Tensor:
    if lengths.dtype not in _INT_DTYPES:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.dim() == 0:
        lengths = lengths.reshape(1)
    if lengths.dim() != 1 or lengths.numel() != B:
        raise ValueError(
            f"lengths must be 1-D with one entry per sequence (B={B}), "
            f"got shape {tuple(lengths.shape)}"
        )
    if lengths.dtype not in (torch.int64, torch.int32):
        lengths = lengths.to(torch.int64)
    if lengths.device.type != "cpu" and lengths.device != device:
        lengths = lengths.to(device)
    return lengths


def jagged_parts(input: Tensor) -> tuple[Tensor, Tensor, int]:
    """A jagged nested tensor [B, j, I] as values [N, I], offsets [B+1] and max_len, the
    step-loop bound: the nested tensor's cached max seqlen when it has one (nested_tensor,
    as_nested_tensor and this GRU's outputs have it; under torch.compile it is a SymInt),
    else offsets.diff().max(), which reads a value back to the host (a sync on CUDA)."""
    if input.layout != torch.jagged:
        raise ValueError(
            f"a nested tensor input must have layout=torch.jagged, got {input.layout}: "
            "build it with torch.nested.nested_tensor(..., layout=torch.jagged)"
        )
    if input.dim() != 3 or input._ragged_idx != 1:
        raise ValueError(
            "a nested tensor input must be [B, j, I] with the ragged dimension second "
            f"(whatever batch_first says), got {input.dim()}-D with the ragged dimension "
            f"at {input._ragged_idx}"
        )
    if input._lengths is not None:
        raise ValueError(
            "a nested tensor input with holes (offsets and lengths) is not supported: "
            "call input.contiguous() first"
        )
    offsets = input.offsets()  # [B+1]
    max_len = input._maybe_max_seqlen
    if max_len is None:
        max_len = int(offsets.diff().max()) if offsets.numel() > 1 else 0
    return input.values(), offsets, max_len


# Devices whose training calls on a padded batch with host-known lengths run on the valid rows
# only (valid_rows): the CUDA backend keeps its per-position buffers (the workspace the backward
# reads, the gate gradients, the gathered states) for every position of its input, padded ones
# included, while the CPU backend keeps them for the valid positions already. Tests add "cpu"
# to run the same route through the CPU kernels.
VALID_ROWS_DEVICES = {"cuda"}


def valid_rows(lengths: Tensor, input: Tensor, T: int, B: int, batch_first: bool, grads: bool):
    """For a padded batch input [T, B, I] (or [B, T, I]) whose lengths live on the CPU, in a
    call that records a backward (grads): (rows, offsets, max_len) to run it as ragged rows,
    rows [N] on input's device the valid positions' rows of input.reshape(-1, I) sequence by
    sequence, offsets [B+1] on the CPU, max_len = max(lengths). None where the call keeps the
    padded layout: other devices, lengths on the device (reading them would wait for the
    GPU), no padding, nothing valid, values out of range (the padded op raises its error),
    inside a CUDA graph capture (a copy from the CPU cannot be captured), torch.compile,
    tracing and torch.func (their graphs keep the padded op, whose shapes do not depend on
    the lengths' values)."""
    if (
        not grads
        or input.device.type not in VALID_ROWS_DEVICES
        or lengths.device.type != "cpu"
        or type(input) is not Tensor  # fake, functional or other subclasses: export's tracing
        or type(lengths) is not Tensor
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._functorch.get_interpreter_stack()
        or (input.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    ):
        return None
    lengths = lengths.to(torch.int64)
    if B == 0 or bool((lengths < 0).any()) or bool((lengths > T).any()):
        return None
    n = int(lengths.sum())
    if n == 0 or n == T * B:
        return None
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    # The valid (b, t), sequence by sequence: [N] each.
    b, t = (torch.arange(T) < lengths[:, None]).nonzero(as_tuple=True)
    rows = b * T + t if batch_first else t * B + b
    if input.device.type == "cuda":  # from pinned memory: no wait for the queued kernels
        rows = rows.pin_memory().to(input.device, non_blocking=True)
    else:
        rows = rows.to(input.device)
    return rows, offsets, int(lengths.max())

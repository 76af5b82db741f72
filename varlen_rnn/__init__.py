"""varlen_rnn: fused GRU, LSTM and RNN layers over variable-length batches, drop-ins for
torch.nn.GRU, torch.nn.LSTM and torch.nn.RNN.

from varlen_rnn import GRU, LSTM, RNN
out, h_n = GRU(input_size, hidden_size)(x, lengths=lengths)
out, (h_n, c_n) = LSTM(input_size, hidden_size)(x, lengths=lengths)
varlen_rnn.onnx.export(model, args)  # ONNX (pip install 'varlen_rnn[onnx]'); see varlen_rnn/onnx.py
"""

import torch

try:
    from ._build_info import TORCH_VERSION as _BUILT_TORCH
    from ._build_info import WITH_CUDA
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "varlen_rnn's C++ extension is not built. Build it with: pip install --no-build-isolation ."
    ) from e

if torch.__version__ != _BUILT_TORCH:
    raise ImportError(
        f"varlen_rnn was built against torch {_BUILT_TORCH} but torch {torch.__version__} "
        "is running. Rebuild it for this torch: "
        "pip install --no-build-isolation --no-deps --force-reinstall ."
    )

from . import (
    _C,  # noqa: E402,F401  registers torch.ops.varlen_rnn.*
    ops,  # noqa: E402  autograd + fake kernels
)
from ._base import RNNBase  # noqa: E402  the base of all three, for isinstance checks
from .modules import GRU, LSTM, RNN, convert  # noqa: E402

__all__ = ["GRU", "LSTM", "RNN", "RNNBase", "convert", "ops", "WITH_CUDA"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """varlen_rnn.onnx (ONNX export) on first use: it needs the optional onnxscript, so
    `import varlen_rnn` never imports it."""
    if name == "onnx":
        import importlib

        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

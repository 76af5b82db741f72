"""varlen_rnn: a fused GRU over variable-length batches, a drop-in for torch.nn.GRU.

from varlen_rnn import GRU
out, h_n = GRU(input_size, hidden_size)(x, lengths=lengths)
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
from .modules import GRU, convert  # noqa: E402

__all__ = ["GRU", "convert", "ops", "WITH_CUDA"]
__version__ = "0.1.0"

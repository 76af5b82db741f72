"""The dtypes of varlen_rnn's modules under autocast: torch.nn's policy for its RNNs (cuDNN's
float16, the CPU's GEMM-only autocast), and whether this CPU runs bfloat16 layers in bfloat16.
Read by varlen_rnn._base.RNNBase and the LSTM's and RNN's own rules (varlen_rnn.modules)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Read once: dynamo cannot trace the call (a torch.* function returning a bool).
HAS_CUDNN = torch.backends.cudnn.is_available()


def probe_cpu_bf16() -> bool:
    """Whether bfloat16 layers run their products in bfloat16 on this CPU (its matrix units,
    AMX, or AVX512-BF16's dot products: csrc/cpu/bf16_gemm.h) and VARLEN_RNNCPU_BF16 allows
    it (the kernels read it at every call; this is read once, at import, as dynamo cannot
    trace the probe)."""
    if os.environ.get("VARLEN_RNNCPU_BF16", "auto") == "float":
        return False
    a, b = torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(2, 1)
    try:
        torch.ops.varlen_rnn._bf16_gemm(a, b, None, None, False)
    except RuntimeError:
        return False
    return True


CPU_BF16 = probe_cpu_bf16()


def cpu_autocast_compute(x: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype the layer ops run in under autocast, given the results' dtype. On a CPU whose
    bfloat16 layers take their products in bfloat16 (AMX or AVX512-BF16), float32 results
    under bfloat16 autocast come from bfloat16 layers cast back: products with bfloat16
    operands and float32 accumulation, state and gates float32 inside the layer, what
    torch.nn's autocast GEMMs do (its state stays float32 between steps too; here the layers'
    inputs, initial states and results pass through bfloat16). Elsewhere the layers run in
    the results' dtype."""
    if (
        CPU_BF16
        and x.device.type == "cpu"
        and dtype == torch.float32
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ):
        return torch.bfloat16
    return dtype


def cudnn_autocast(x: Tensor) -> torch.dtype | None:
    """The dtype of torch.nn's RNNs under autocast when they run cuDNN (CUDA input, cuDNN
    enabled; torch >= 2.11's cudnn_is_acceptable takes bfloat16 too, as the H200's first run
    showed): autocast's _cudnn_rnn wrapper casts input, hx and weights to float16 (whatever
    the autocast dtype; float64 is left alone). None when cuDNN would not run."""
    if (
        x.device.type == "cuda"
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        and x.numel() > 0
        and torch.backends.cudnn.enabled
        and HAS_CUDNN
    ):
        return torch.float64 if x.dtype == torch.float64 else torch.float16
    return None

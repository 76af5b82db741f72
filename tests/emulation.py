"""Builds tests/cuda_emulation/emu.cpp (the CUDA kernels on CPU threads) once per test process,
for every test module that runs it (test_cuda_emulated.py, test_cuda_emulated_cells.py)."""

import functools
import os
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")

# Why the emulation cannot run here, or None.
SKIP_REASON = (
    "emulation skipped (VARLEN_RNN_SKIP_EMULATION=1, no C++ compiler, or no csrc/cuda)"
    if os.environ.get("VARLEN_RNN_SKIP_EMULATION") == "1"
    or shutil.which("c++") is None
    or not os.path.isdir(os.path.join(CSRC, "cuda"))
    else None
)


@functools.cache
def load_emulation():
    from torch.utils.cpp_extension import load

    import varlen_rnn  # noqa: F401  the CPU kernels are the oracle

    build = tempfile.mkdtemp(prefix="varlen_rnn_emu_build_")
    return load(
        name="varlen_rnn_cuda_emulation",
        sources=[os.path.join(HERE, "cuda_emulation", "emu.cpp")],
        build_directory=build,
        extra_include_paths=[CSRC],
        extra_cflags=["-O1", "-std=c++20"],
    )

"""Fixtures shared by the test files (pytest finds them here)."""

import hashlib
import importlib.util
import os
import tempfile

import pytest
import torch


def _inductor_cache_dir() -> str:
    """torch.compile's on-disk caches, one directory per build of varlen_rnn: Inductor keys a
    cached graph by its code, which names our ops but not their implementation, so a graph
    compiled against an earlier build (whose op returned another shape) would be reused. Keyed
    by the extension's size and time and the Python layer's sources; shared by the test
    processes of one run and by later runs of the same build."""
    spec = importlib.util.find_spec("varlen_rnn")
    key = hashlib.sha256()
    if spec is not None and spec.submodule_search_locations:
        where = list(spec.submodule_search_locations)[0]
        for name in sorted(os.listdir(where)):
            path = os.path.join(where, name)
            if name.endswith(".py"):
                with open(path, "rb") as f:
                    key.update(name.encode() + f.read())
            elif name.startswith("_C") and name.endswith((".so", ".pyd")):
                st = os.stat(path)
                key.update(f"{name} {st.st_size} {st.st_mtime_ns}".encode())
    return os.path.join(tempfile.gettempdir(), f"varlen_rnn_inductor_{key.hexdigest()[:16]}")


# Before anything compiles; a directory the caller chose is kept.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())


@pytest.fixture(params=[2, 3], ids=["2threads", "3threads"])
def threads(request):
    """torch's intra-op thread count set for the test (the CPU split loops' team size)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 comparisons mean float32: TF32 off on both sides (cuBLAS, cuDNN and ours) for
    every test, restored after. torch's default has cuDNN's on, so nn.GRU on cuDNN and our
    float32 GEMMs would round to TF32 (about 5e-4 relative) in every float32 CUDA case; the
    tests of the TF32 policy turn it on themselves."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# VARLEN_RNN_TEST_CUDA_EMULATED=auto|persistent|fallback: every test runs with the ops' CPU
# kernels replaced by the CUDA backend on the emulation (emulation.cuda_backend_on_cpu; a pretend
# device of 8 SMs, that path), so the CPU tests exercise the CUDA backend's code without a GPU.
# For runs by hand over the files whose tests are not about the CPU kernels themselves.
_EMULATED_PATH = os.environ.get("VARLEN_RNN_TEST_CUDA_EMULATED")


@pytest.fixture(autouse=_EMULATED_PATH is not None)
def cuda_backend_emulated():
    import emulation

    emu_mod = emulation.load_emulation()
    emu_mod.backend.set_device(8, 227 * 1024, 9)
    emu_mod.backend.set_knobs(_EMULATED_PATH, 0, False, 2, True)
    with emulation.cuda_backend_on_cpu(emu_mod):
        yield

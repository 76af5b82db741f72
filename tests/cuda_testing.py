"""The CUDA tests' shared setup (test_cuda.py, test_cuda_cells.py, test_cuda_ragged.py): the
path knobs and the fixtures that set and reset them (TF32 off is conftest.py's), a child
process for what must not touch this one's CUDA context, and the GRU layer's results by name
with their comparison (which the emulated kernels' tests use too). varlen_rnn is imported
where a knob is set, not here: the emulated tests import this module and must collect without
the build."""

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch


def nvcc_path():
    """The nvcc that compiles: the toolkit's when torch's CUDA_HOME holds one, else PATH's."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PATHS = ["persistent", "fallback"]
# A GRU layer's forward results and gradients, in the order of the ops' outputs.
GRU_RESULTS = [
    "output",
    "h_n",
    "grad input",
    "grad hx",
    "grad w_ih",
    "grad w_hh",
    "grad b_ih",
    "grad b_hh",
]


def assert_each_close(names, got, expected, tol):
    """torch.testing.assert_close on each pair (on the CPU), the message naming the tensor; tol:
    assert_close's keyword arguments, or a function of the expected tensor that gives them. None
    stands where a cell has no such tensor, and must on both sides."""
    for n, a, e in zip(names, got, expected, strict=True):
        assert (a is None) == (e is None), n
        if a is not None:
            kw = tol(e) if callable(tol) else tol
            torch.testing.assert_close(a.cpu(), e.cpu(), **kw, msg=lambda m: f"{n}: {m}")


def knob_hook():
    import varlen_rnn

    f = ctypes.CDLL(varlen_rnn._C.__file__).varlen_rnn_cuda_set_knobs_for_testing
    f.argtypes, f.restype = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int], ctypes.c_int
    return f


def set_knobs(path="auto", max_kc=0, oversubscribe=False):
    """VARLEN_RNN_CUDA_PATH and VARLEN_RNN_PERSISTENT_MAX_KC for this process, from now on."""
    assert knob_hook()(path.encode(), max_kc, int(oversubscribe)) == 0


# The fixtures below are used by assigning them in a test module (`path = cuda_testing.path`);
# the autouse ones then run around every test of that module.
@pytest.fixture(autouse=True)
def auto_knobs_after():
    import varlen_rnn

    yield
    if varlen_rnn.WITH_CUDA:
        set_knobs()


@pytest.fixture
def path(request):
    """The recurrence path as an indirect parameter: set for the test."""
    set_knobs(request.param)
    return request.param


def child(code, env=None, timeout=45):
    """Runs `code` in a fresh Python process (a cold plan cache, its own warnings and knobs).
    The timeout stays under the GPU check's 60 s a test, so a hung child fails its own test."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        check=False,
    )


def assert_device_assert(code):
    """`code` ends in a device-side assert: run in a child process, since an assert leaves the
    CUDA context unusable."""
    r = child(code)
    assert r.returncode != 0
    assert "assert" in r.stderr.lower(), r.stderr[-2000:]

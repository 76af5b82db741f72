"""The tensor-core wrapper csrc/cuda/mma.cuh on a GPU, before any kernel that uses it: the warp
GEMM test kernel of tests/cuda_emulation/mma_tile.cuh (the one test_mma_emulated.py runs on CPU
threads) against float64 products of the rounded inputs, the element conversions bit for bit,
and deliberately wrong fragment layouts, which must fail. A wrong fragment layout in mma.cuh
shows here in seconds. Built with nvcc alone (no torch headers) and called through ctypes.
Run: python -m pytest tests/test_mma_gpu.py -q"""

import ctypes
import os
import subprocess

import pytest
import torch
from cuda_testing import nvcc_path
from emulation import CSRC, EMU_SRC
from mma_testing import (
    GEMM_CASES,
    KINDS,
    MATVEC_CASES,
    WRONG_VARIANTS,
    assert_matvec_within_bound,
    assert_tile_gemm_within_bound,
    assert_wrong_layout_fails,
    conversion_values,
    element_bits,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class _Lib:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        i, p = ctypes.c_int, ctypes.c_void_p
        lib.mma_tile_gemm.argtypes = [i, i, p, p, p, p, i, i, i]
        lib.mma_to_bits.argtypes = [i, p, p, i]
        lib.mma_matvec.argtypes = [i, p, p, p, i, i, i, i, i]
        lib.mma_error_string.argtypes = [i]
        lib.mma_error_string.restype = ctypes.c_char_p
        self.lib = lib

    def _check(self, err, what):
        assert err == 0, f"{what}: {self.lib.mma_error_string(err).decode()}"

    def tile_gemm(self, kind, variant, a, b, c):
        a, b, c = (t.float().contiguous() for t in (a, b, c))
        (M, K), N = a.shape, b.shape[1]
        d = torch.empty(M, N)
        err = self.lib.mma_tile_gemm(
            kind, variant, a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), M, N, K
        )
        self._check(err, "mma_tile_gemm")
        return d

    def to_bits(self, kind, x):
        x = x.float().contiguous()
        y = torch.empty(x.numel(), dtype=torch.int32)
        self._check(
            self.lib.mma_to_bits(kind, x.data_ptr(), y.data_ptr(), x.numel()), "mma_to_bits"
        )
        return y.long() & 0xFFFFFFFF

    def matvec(self, kind, w, x, U, g_major, kc_max):
        w, x = w.contiguous(), x.float().contiguous()
        rows, K = x.shape
        acc = torch.empty(rows // 8, U, 3, 8)
        err = self.lib.mma_matvec(
            kind, w.data_ptr(), x.data_ptr(), acc.data_ptr(), U, int(g_major), K, rows, kc_max
        )
        self._check(err, "mma_matvec")
        return acc


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"mma.sync for TF32/bf16 needs sm_80 or newer; the device is sm_{major}{minor}")
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME/bin or PATH)")
    so = str(tmp_path_factory.mktemp("mma_gpu_build") / "libmma_gpu.so")
    cmd = [
        nvcc,
        "-std=c++17",
        "-O2",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        "-I",
        CSRC,
        "-I",
        EMU_SRC,
        "-o",
        so,
        os.path.join(EMU_SRC, "mma_gpu.cu"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return _Lib(so)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpu_element_conversions_match_the_ptx_roundings(gpu, kind):
    x = conversion_values()
    got, want = gpu.to_bits(KINDS[kind], x), element_bits(kind, x)
    bad = (got != want).nonzero().flatten()[:5].tolist()
    assert not bad, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad]


@pytest.mark.parametrize("M,N,steps", GEMM_CASES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpu_tile_gemm_matches_float64_within_fp32_accumulation(gpu, kind, M, N, steps):
    assert_tile_gemm_within_bound(gpu, kind, M, N, steps)


@pytest.mark.parametrize("variant", sorted(WRONG_VARIANTS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpu_wrong_fragment_layout_fails_the_check(gpu, kind, variant):
    assert_wrong_layout_fails(gpu, kind, variant)


@pytest.mark.parametrize("g_major", [True, False], ids=["forward-order", "backward-order"])
@pytest.mark.parametrize("U,K,rows,kc_max", MATVEC_CASES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpu_tile_matvec_mma_matches_float64(gpu, kind, U, K, rows, kc_max, g_major):
    assert_matvec_within_bound(gpu, kind, U, K, rows, kc_max, g_major)

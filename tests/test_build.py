"""The build: import-time version check, and what the extension registers."""

import os
import subprocess
import sys
import sysconfig

import pytest
import torch

import varlen_rnn


def test_import_refuses_a_different_torch_with_a_clear_message():
    code = "import torch; torch.__version__ = '0.0.1'; import varlen_rnn"
    env = dict(os.environ)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(varlen_rnn.__file__)),
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert f"built against torch {torch.__version__}" in r.stderr
    assert "torch 0.0.1 is running" in r.stderr and "pip install" in r.stderr


def test_cpu_kernels_registered():
    for op in ("gru_layer_forward", "gru_layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CPU")


def _aarch64_compiler():
    import shutil

    return next(
        (c for c in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-g++-12") if shutil.which(c)),
        None,
    )


@pytest.mark.skipif(
    _aarch64_compiler() is None,
    reason="no aarch64 cross compiler (apt install g++-12-aarch64-linux-gnu; CI installs it)",
)
def test_cpu_sources_compile_for_aarch64(tmp_path):
    """`pip install .` on an ARM Linux machine (Graviton, Ampere, Apple silicon under Linux):
    every C++ source of the CPU build compiles for aarch64 with setup.py's flags, the
    x86-only kernels (AVX-512, AVX2, AMX) behind their guards. Syntax and templates only
    (-fsyntax-only): nothing here runs the result; a source with an unguarded x86 intrinsic
    fails, as the control below shows the compiler does. ATen's and torch.library's headers
    are parsed once, into a precompiled header each source is compiled after (-include): on
    CI's 2 cores, 175 s of compiler time in all without it, 88 s with it (-Winvalid-pch: an
    unusable one is reported and the headers parsed as text instead, as correct and slower)."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parents[1]
    sources = sorted(root.glob("csrc/*.cpp")) + sorted(root.glob("csrc/cpu/*.cpp"))
    assert len(sources) >= 9
    flags = ["-std=c++20", "-O3", "-fno-trapping-math", "-fopenmp"]
    includes = [f"-I{root / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    includes += [f"-I{p}" for p in include_paths()]
    compiler = _aarch64_compiler()
    header = tmp_path / "torch_headers.h"
    header.write_text(
        "#include <ATen/ATen.h>\n#include <ATen/Parallel.h>\n#include <torch/library.h>\n"
    )
    pch = subprocess.run(
        [compiler, *flags, *includes, "-x", "c++-header", str(header), "-o", f"{header}.gch"],
        capture_output=True,
        text=True,
    )
    assert pch.returncode == 0, pch.stderr[-3000:]

    def compile_one(source):
        r = subprocess.run(
            [compiler, "-fsyntax-only", *flags, *includes, "-include", str(header)]
            + ["-Winvalid-pch", str(source)],
            capture_output=True,
            text=True,
        )
        return source.name, r.returncode, r.stderr[-3000:]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, sources))
    failed = [f"{name}:\n{err}" for name, rc, err in results if rc != 0]
    assert not failed, "\n".join(failed)
    unused = [name for name, rc, err in results if "invalid-pch" in err or ".gch" in err]
    assert not unused, f"the precompiled header was not used for {unused}"
    # The control: an x86 intrinsic outside the guards does not compile for aarch64.
    bad = subprocess.run(
        [compiler, "-fsyntax-only", *flags, "-x", "c++", "-"],
        input="#include <immintrin.h>\nfloat f() { return _mm512_reduce_add_ps(_mm512_setzero_ps()); }\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "immintrin.h" in bad.stderr


def _cuda_build_reason():
    from cuda_testing import nvcc_path

    if torch.version.cuda is None:
        return "torch has no CUDA (a CPU build of torch)"
    if nvcc_path() is None:
        return "no nvcc (CUDA_HOME/bin or PATH)"
    return None


_NO_CUDA_BUILD = _cuda_build_reason()


@pytest.mark.skipif(_NO_CUDA_BUILD is not None, reason=str(_NO_CUDA_BUILD))
def test_the_cuda_kernels_are_built_where_they_can_be():
    """With a CUDA torch and nvcc, the build has the CUDA kernels unless it was asked not to
    (VARLEN_RNN_CUDA=0): CI has no GPU, so every CUDA test there skips, and this is what fails
    if the CUDA build is lost (setup.py deciding wrongly, a wheel without the kernels)."""
    from varlen_rnn import _build_info

    left_out = getattr(_build_info, "CUDA_LEFT_OUT", "not recorded (an older build)")
    if not varlen_rnn.WITH_CUDA and str(left_out).startswith("VARLEN_RNN_CUDA="):
        pytest.skip(f"built with {left_out}")
    assert varlen_rnn.WITH_CUDA, f"the CUDA kernels were left out: {left_out}"
    for op in ("gru_layer_forward", "lstm_layer_backward", "rnn_layer_ragged_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"varlen_rnn::{op}", "CUDA"), op


def _cuobjdump():
    """cuobjdump: the toolkit's, else the nvidia-cuda-cuobjdump wheel's beside torch (setup.sh
    installs it with a CUDA torch: this machine's toolkit has nvcc and ptxas only)."""
    import shutil
    from pathlib import Path

    from torch.utils.cpp_extension import CUDA_HOME

    found = [Path(CUDA_HOME) / "bin" / "cuobjdump"] if CUDA_HOME else []
    try:
        import nvidia

        found += sorted(p for base in nvidia.__path__ for p in Path(base).glob("*/bin/cuobjdump"))
    except ImportError:
        pass
    found = [str(p) for p in found if p.is_file()] or [shutil.which("cuobjdump")]
    return found[0]


def _built_archs():
    """The architectures the build compiled for: TORCH_CUDA_ARCH_LIST, else setup.py's default
    where no GPU is visible (sm_80 and sm_90)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not env:
        return None if torch.cuda.is_available() else {"sm_80", "sm_90"}
    return {"sm_" + a.split("+")[0].replace(".", "") for a in env.replace(",", ";").split(";") if a}


@pytest.mark.skipif(_NO_CUDA_BUILD is not None, reason=str(_NO_CUDA_BUILD))
def test_cuda_kernels_do_not_spill_registers():
    """Every kernel of the built extension keeps its values in registers on every architecture
    it was built for (sm_80 and sm_90 by default): cuobjdump's resource report of the installed
    binary shows no stack frame (where ptxas puts spills) and no local memory for any kernel. A
    persistent kernel runs every step of a layer in one launch, so local memory would be paid on
    every step of every layer. Without __launch_bounds__'s one block per SM
    (kPersistMinBlocks), 14 persistent kernels spilled on sm_90 and 26 on sm_80 with nvcc 13.0.
    (Until 2026-11-30 this test recompiled ops_cuda.cu with ptxas -v for both architectures,
    87 s on CI's 2 cores; the binary itself is read in a second.)"""
    from pathlib import Path

    from varlen_rnn import _build_info

    if not varlen_rnn.WITH_CUDA:
        pytest.skip(f"the build has no CUDA kernels: {_build_info.CUDA_LEFT_OUT}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (pip install nvidia-cuda-cuobjdump; setup.sh does)")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from gpu_resources import demangle, parse_resources

    so = varlen_rnn._C.__file__
    r = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # One report per architecture's cubin, each starting at its "arch = sm_XY" line.
    parts = r.stdout.split("\narch = ")[1:]
    reports = {p.split(None, 1)[0]: parse_resources("arch = " + p) for p in parts}
    expected = _built_archs()
    if expected is not None:
        assert set(reports) == expected, (so, sorted(reports))
    assert reports, f"no cubin in {so}"
    for arch, kernels in reports.items():
        # Every kernel reported, the persistent ones among them: 4 cells x 7 dtype variants x
        # forward/backward (an empty or truncated report must not pass).
        persistent = [n for n in kernels if "persistent_" in n]
        assert len(persistent) == 56, (arch, len(persistent))
        assert all("STACK" in v and "LOCAL" in v for v in kernels.values()), arch
        spilled = {n: v for n, v in kernels.items() if v["STACK"] or v["LOCAL"]}
        names = demangle(sorted(spilled))
        assert not spilled, f"{arch}: " + "; ".join(
            f"{names[n]}: {v['STACK']} bytes of stack, {v['LOCAL']} of local memory"
            for n, v in sorted(spilled.items())
        )

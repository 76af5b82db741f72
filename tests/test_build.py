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
def test_cpu_sources_compile_for_aarch64():
    """`pip install .` on an ARM Linux machine (Graviton, Ampere, Apple silicon under Linux):
    every C++ source of the CPU build compiles for aarch64 with setup.py's flags, the
    x86-only kernels (AVX-512, AVX2, AMX) behind their guards. Syntax and templates only
    (-fsyntax-only): nothing here runs the result; a source with an unguarded x86 intrinsic
    fails, as the control below shows the compiler does."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parents[1]
    sources = sorted(root.glob("csrc/*.cpp")) + sorted(root.glob("csrc/cpu/*.cpp"))
    assert len(sources) >= 9
    flags = ["-fsyntax-only", "-std=c++20", "-O3", "-fno-trapping-math", "-fopenmp"]
    includes = [f"-I{root / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    includes += [f"-I{p}" for p in include_paths()]
    compiler = _aarch64_compiler()

    def compile_one(source):
        r = subprocess.run(
            [compiler, *flags, *includes, str(source)], capture_output=True, text=True
        )
        return source.name, r.returncode, r.stderr[-3000:]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, sources))
    failed = [f"{name}:\n{err}" for name, rc, err in results if rc != 0]
    assert not failed, "\n".join(failed)
    # The control: an x86 intrinsic outside the guards does not compile for aarch64.
    bad = subprocess.run(
        [compiler, *flags, "-x", "c++", "-"],
        input="#include <immintrin.h>\nfloat f() { return _mm512_reduce_add_ps(_mm512_setzero_ps()); }\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "immintrin.h" in bad.stderr

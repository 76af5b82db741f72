"""Build varlen_rnn's C++ (always) and CUDA (when possible) kernels.

Environment variables:
  VARLEN_RNN_CUDA=0|1   force the CUDA kernels off or on (default: on when
                        torch has CUDA and a toolkit is found)
  CUDA_HOME             the CUDA toolkit; found from nvcc when unset
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS              parallel compile jobs (ninja)
  CC, CXX               the compiler, as for any extension: GCC, or clang (CC=clang
                        CXX=clang++; scripts/check_clang.sh builds and tests that build)
  VARLEN_RNN_FAST_MATH=1  nvcc --use_fast_math (off by default: parity with nn.GRU first)
  DEBUG=1               a build for a debugger: C++ -O0 -g, nvcc -O0 -g -lineinfo
                        (the default is -O3 without debug information, -g0 overriding
                        the -g of Python's own CFLAGS, with -lineinfo for nvcc's profilers)
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The real toolkit folder: the nvcc on PATH may be a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: ask the real nvcc where it lives
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for tok in head.split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def _want_cuda():
    """(build the CUDA kernels?, why not: None when they are built). The reason goes into
    _build_info.py, so the tests can tell a CUDA build left out on request from one lost."""
    flag = os.environ.get("VARLEN_RNN_CUDA")
    if flag is not None and flag.strip() not in ("", "auto"):
        on = flag.strip().lower() not in ("0", "false", "no", "off")
        return on, None if on else f"VARLEN_RNN_CUDA={flag.strip()}"
    import torch

    if torch.version.cuda is None:
        return False, "torch has no CUDA (a CPU build of torch)"
    if _find_cuda_home() is None:
        return False, "no CUDA toolkit found (nvcc, CUDA_HOME)"
    return True, None


WITH_CUDA, CUDA_LEFT_OUT = _want_cuda()
if WITH_CUDA:
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        sys.exit("VARLEN_RNN_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
    # cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extra_cuda_includes():
    """cuBLAS/cuSPARSE headers shipped in the nvidia pip wheels beside torch."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in list(nvidia.__path__):
        for sub in ("cu13/include", "cu12/include", "cublas/include", "cusparse/include"):
            p = os.path.join(base, sub)
            if os.path.isdir(p):
                found.append(p)
    return found


def _cxx_version():
    """The first line of `--version` of the C++ compiler the build runs (CXX, else c++, as
    cpp_extension picks), or "" where it does not answer."""
    try:
        cxx = shlex.split(os.environ.get("CXX", "c++"))
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, ValueError, subprocess.SubprocessError):
        return ""
    return (version.stdout.splitlines() or [""])[0].strip()


CXX_VERSION = _cxx_version()


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    debug = os.environ.get("DEBUG", "0") == "1"
    # -g0: Python's CFLAGS (sysconfig), which cpp_extension puts first, hold -g; debug
    # information doubled the C++ compile time (gru_cpu.cpp: 75 s with it, 38 s without, Zen 3).
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fno-trapping-math changes no result; it lets GCC vectorize the gate loops.
    cxx = opt + ["-fno-trapping-math"]
    # GCC's OpenMP is libgomp, the runtime torch's Linux wheels load. Clang's -fopenmp would
    # bring LLVM's runtime beside it: a clang build has no -fopenmp, and its thread teams
    # call that loaded runtime's entry points themselves (csrc/cpu/team.h).
    clang = "clang" in CXX_VERSION.lower()
    if sys.platform.startswith("linux") and not clang:
        cxx.append("-fopenmp")
    if clang:
        # Clang splits 512-bit vectors in two by default (GCC does not): its AVX-512 micro-kernel
        # ran on ymm halves. The float64 gate loops call libm: scalar, though told they may
        # vectorize (cpu/rows.cpp).
        cxx += ["-mprefer-vector-width=512", "-Wno-pass-failed"]
    kwargs = dict(
        name="varlen_rnn._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=False,
    )
    if not WITH_CUDA:
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["include_dirs"] += _extra_cuda_includes()
    nvcc = (["-O0", "-g"] if debug else ["-O3"]) + ["-lineinfo", "--expt-relaxed-constexpr"]
    nvcc.append("--threads=0")  # one thread per architecture built (sm_80 and sm_90 at once)
    if os.environ.get("VARLEN_RNN_FAST_MATH") == "1":  # an experiment: changes results slightly
        nvcc.append("--use_fast_math")
    return [CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]


def _build_info():
    """Record what this build was made against, for the import-time check."""
    path = os.path.join(HERE, "varlen_rnn", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")
        f.write(f"CUDA_LEFT_OUT = {CUDA_LEFT_OUT!r}  # why the CUDA kernels were not built\n")
        f.write(f"CXX = {CXX_VERSION!r}  # the C++ compiler\n")


class _BuildExt(BuildExtension):
    """torch's BuildExtension, compiling the CUDA sources first. setuptools sorts the sources
    and ninja starts them in that order, so ops_cuda.cu, the longest compile (143 s of a 2-core
    build's 270 s for sm_80 alone), came after csrc/cpu/ and ran alone at the end while the other
    core idled. First, the C++ files fill the other core beside it.

    On Linux it links with --as-needed (Debian's GCC does by default, clang and other
    distributions' GCC do not): only the libraries the extension uses become its dependencies,
    so a C++ program that loads it without Python (an AOTInductor package's runner) needs no
    libtorch_python.so."""

    def build_extension(self, ext):
        compile_ = self.compiler.compile
        link_ = self.compiler.link_shared_object

        def cuda_first(sources, *args, **kwargs):  # a stable sort: the rest stay in order
            return compile_(sorted(sources, key=lambda s: not s.endswith(".cu")), *args, **kwargs)

        def as_needed(*args, **kwargs):  # before the libraries, which come before extra_postargs
            kwargs["extra_preargs"] = ["-Wl,--as-needed", *(kwargs.get("extra_preargs") or [])]
            return link_(*args, **kwargs)

        self.compiler.compile = cuda_first
        if sys.platform.startswith("linux"):
            self.compiler.link_shared_object = as_needed
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_
            self.compiler.link_shared_object = link_


_build_info()
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
)

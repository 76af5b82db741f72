"""test_cpu_fuzz.py's random draws on a GPU: each draw's cell, shapes, layers, directions,
batch_first, bias, hx and input form (lengths on the CPU or the device, PackedSequence, jagged
nested tensor) run on CUDA in float32 (exact: the tests turn TF32 off), bfloat16 or float16,
with the CUDA knobs drawn too (the recurrence path: auto, persistent or fallback; tensor cores:
the dtype's policy, off, or wherever it allows; the K-chunk cap), against torch.nn in float64
(+ packing) on the CPU, with test_cpu_fuzz.py's bounds (the half types: the largest error within
5% of the largest value). Skipped without a CUDA device; the GPU check runs it (its tests_rest
stage).

The same draws, made small (emulated_draw), also run without a GPU: through the CUDA backend's
own op entries on the emulation (tests/emulation.py's cuda_backend_on_cpu: ops_cuda.cu's code on
CPU tensors, its kernels on CPU threads, a pretend device of 1 to 8 SMs), the module, autograd
and every input form around them as they are.

    python tests/test_cuda_fuzz.py --seeds 1000:2000   # more draws; prints each failing draw
    python tests/test_cuda_fuzz.py --emulated --seeds 0:500   # on the emulation"""

from __future__ import annotations

import ctypes
import dataclasses
import random
import sys

import emulation
import pytest
import torch
from test_cpu_fuzz import draw, mismatches, run_seeds

import varlen_rnn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SEEDS = range(24)
EMULATED_SEEDS = range(40)
emu = emulation.emu
KNOBS = {
    "path": ["auto", "auto", "persistent", "fallback"],
    "tensor_cores": [2, 2, 0, 1],  # 2: the dtype's policy, VARLEN_RNN_TENSOR_CORES=auto (launch.h)
    "max_kc": [0, 0, 32, 64],
}


def cuda_draw(seed: int):
    """(test_cpu_fuzz.draw(seed) for CUDA, its knobs): a quarter of the float32 draws in
    float16 (not relu, as bfloat16 is not), the lengths on the device half the time, and the
    CPU's threads and switches left unset (they do not reach the CUDA kernels)."""
    d = draw(seed)
    rng = random.Random(seed + 7_000_000)
    dtype = d.dtype
    if dtype == torch.float32 and d.kwargs.get("nonlinearity") != "relu" and rng.random() < 0.25:
        dtype = torch.float16
    d = dataclasses.replace(
        d,
        dtype=dtype,
        threads=torch.get_num_threads(),
        switches={},
        lengths_device=rng.choice(["cpu", "cuda"]),
    )
    return d, {k: rng.choice(v) for k, v in KNOBS.items()}


# The emulated draws' sizes: the emulation runs every CUDA thread of the persistent kernels as a
# fiber, step by step.
EMULATED_MAX = dict(I=24, H=40, B=12, T=8)


def emulated_draw(seed: int):
    """(cuda_draw(seed) within EMULATED_MAX, its knobs with the pretend device's SM count): the
    lengths cut at the new T (one still reaching it), proj_size below the new H, lengths on the
    CPU (the emulation's device)."""
    d, k = cuda_draw(seed)
    m = EMULATED_MAX
    I, H, B, T = min(d.I, m["I"]), min(d.H, m["H"]), min(d.B, m["B"]), min(d.T, m["T"])
    lengths = [min(n, T) for n in d.lengths[:B]]
    lengths[lengths.index(max(lengths))] = T
    kwargs = dict(d.kwargs)
    if "proj_size" in kwargs:
        kwargs["proj_size"] = min(kwargs["proj_size"], H - 1)
    d = dataclasses.replace(
        d, I=I, H=H, B=B, T=T, lengths=lengths, kwargs=kwargs, lengths_device="cpu"
    )
    return d, {**k, "sms": random.Random(seed + 8_000_000).choice([1, 2, 4, 8])}


def check_emulated(emu_mod, seed: int) -> tuple:
    """(draw, knobs, mismatches) of emulated_draw(seed) through the emulated CUDA backend."""
    d, k = emulated_draw(seed)
    emu_mod.backend.set_device(k["sms"], 227 * 1024, 9)
    emu_mod.backend.set_knobs(k["path"], k["max_kc"], False, k["tensor_cores"], True)
    with emulation.cuda_backend_on_cpu(emu_mod):
        return d, k, mismatches(d, device="cpu")


@emulation.needs_emulation
@pytest.mark.parametrize("seed", EMULATED_SEEDS)
def test_emulated_cuda_drawn_cases_match_nn(emu, seed):
    d, k, bad = check_emulated(emu, seed)
    assert not bad, f"{d}\n{k}:\n" + "\n".join(bad)


def _hooks():
    lib = ctypes.CDLL(varlen_rnn._C.__file__)
    knobs, tc = (
        lib.varlen_rnn_cuda_set_knobs_for_testing,
        lib.varlen_rnn_cuda_set_tensor_cores_for_testing,
    )
    knobs.argtypes, knobs.restype = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int], ctypes.c_int
    tc.argtypes, tc.restype = [ctypes.c_int], ctypes.c_int
    return knobs, tc


def check(seed: int) -> tuple:
    """(draw, knobs, mismatches) with the knobs set for the draw, then put back."""
    d, k = cuda_draw(seed)
    set_knobs, set_tc = _hooks()
    before = set_tc(k["tensor_cores"])
    assert set_knobs(k["path"].encode(), k["max_kc"], 0) == 0
    try:
        return d, k, mismatches(d, device="cuda")
    finally:
        set_tc(before)
        set_knobs(b"auto", 0, 0)


@needs_cuda
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_drawn_cases_match_nn(seed):
    d, k, bad = check(seed)
    assert not bad, f"{d}\n{k}:\n" + "\n".join(bad)


def main(argv=None) -> int:
    # As the tests (conftest.py): TF32 off, so that float32 is exact.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    argv = list(sys.argv[1:] if argv is None else argv)
    emulated = "--emulated" in argv
    if emulated:
        argv.remove("--emulated")
        emu_mod = emulation.load_emulation()

    def check_one(seed):
        d, k, bad = check_emulated(emu_mod, seed) if emulated else check(seed)
        return f"{d}\n  {k}", bad

    return run_seeds(argv, check_one, __doc__, default="0:200")


if __name__ == "__main__":
    raise SystemExit(main())

"""The CUDA kernels' logic on a machine without a GPU: tests/cuda_emulation/emu.cpp runs the real
kernel code of csrc/cuda/*.cuh on CPU threads, in every dtype the CUDA build dispatches, and must
agree with the CPU kernels.

What it checks: indexing, padding zeros, h_n, the length sort, the tiling and K chunks, the warp
reduction, the half-type loads and stores, and the persistent kernels' one-barrier-per-step
exchange. What it cannot: anything about the GPU itself (memory model, occupancy, cooperative
launch), which tests/test_cuda.py covers on a GPU. Compiles a small extension (~60 s);
VARLEN_RNN_SKIP_EMULATION=1 skips it.

The reference is always the CPU op in float64. For float64 the kernels must match it to rounding
(1e-12). For float32, float16 and bfloat16 the reference runs on the same inputs rounded to the
dtype, so the only differences left are the kernels' own roundings: gx, the outputs, dgx, dgh
and hprev are stored in the dtype (relative error eps/2 each), the fallback's gh is a GEMM
rounded to the dtype, and the backward reads the rounded outputs as its previous state. Each is
a few eps relative to the values involved, propagated through T steps of a contracting
recurrence and summed over T*B rows by the weight-gradient GEMMs. The bound is
C * eps * (|ref| + max(1, max|ref|)) with C = TOL_EPS below, about five times the largest C
these cases need (float32 1.7, float16 0.7, bfloat16 0.6: for the half types the storage
roundings dominate, for float32 its own sums over up to 3H terms in the kernels and T*B rows in
the GEMMs). A wrong bit-cast, index or missing term gives errors of order max|ref|, far above
the bound for every dtype (bfloat16: 4 * 2^-7 ~ 0.03 of max|ref|)."""
import os
import shutil

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")

pytestmark = pytest.mark.skipif(
    os.environ.get("VARLEN_RNN_SKIP_EMULATION") == "1" or shutil.which("c++") is None
    or not os.path.isdir(os.path.join(CSRC, "cuda")),
    reason="emulation skipped (VARLEN_RNN_SKIP_EMULATION=1, no C++ compiler, or no csrc/cuda)")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import varlen_rnn  # noqa: F401  the CPU kernels are the oracle
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("emu_build")
    return load(name="varlen_rnn_cuda_emulation",
                sources=[os.path.join(HERE, "cuda_emulation", "emu.cpp")],
                build_directory=str(build), extra_include_paths=[CSRC],
                extra_cflags=["-O1", "-std=c++20"])


CASES = {
    "uni-basic": dict(T=5, B=3, I=2, H=4, D=1, bias=True, bf=False, lengths=[5, 2, 0]),
    "bi-bf-zeros": dict(T=6, B=11, I=3, H=5, D=2, bias=True, bf=True,
                        lengths=[6, 0, 3, 1, 6, 2, 5, 4, 0, 6, 1]),
    "two-tiles-nobias": dict(T=4, B=20, I=3, H=7, D=2, bias=False, bf=False,
                             lengths=[(i * 7) % 5 for i in range(20)]),
    "K-chunks-tail-block": dict(T=7, B=9, I=4, H=37, D=2, bias=True, bf=False,
                                lengths=[7, 6, 5, 4, 3, 2, 1, 0, 7], kc=32),
    "K-chunks-small": dict(T=3, B=9, I=2, H=13, D=2, bias=True, bf=True,
                           lengths=[3, 2, 0, 1, 3, 1, 2, 0, 3], kc=8),
    "one-row-per-warp-tiles": dict(T=3, B=17, I=2, H=9, D=1, bias=True, bf=True,
                                   lengths=[3] * 17, R=1),
    "all-zero": dict(T=3, B=2, I=2, H=3, D=2, bias=True, bf=False, lengths=[0, 0]),
    "T1-B1-H1": dict(T=1, B=1, I=1, H=1, D=1, bias=True, bf=False, lengths=[1]),
}
# The lower-precision dtypes run the cases that reach every code path between them (D=1 and 2,
# zero lengths, batch_first, several row tiles, K chunks with a tail, a block past H), to keep
# the emulation's run time down.
HALF_CASES = ["uni-basic", "two-tiles-nobias", "K-chunks-small"]
TOL_EPS = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 4}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
             torch.bfloat16: "bf16"}
PARAMS = [(n, torch.float64) for n in sorted(CASES)] + [
    (n, dt) for dt in (torch.float32, torch.float16, torch.bfloat16) for n in HALF_CASES]


def run_case(emu, c, dtype, persistent, mma=False):
    """(got, ref): the emulated kernels' results in `dtype` with the launchers' GEMMs around
    them, and the CPU op's in float64 on the same (rounded) inputs. mma: the persistent kernels'
    tensor-core path."""
    T, B, I, H, D, bias, bf = (c[k] for k in ("T", "B", "I", "H", "D", "bias", "bf"))
    g = torch.Generator().manual_seed(0)

    def f(*s):  # float64 values that are exact in `dtype`
        return torch.randn(*s, dtype=torch.float64, generator=g).to(dtype).double()

    x = f(B, T, I) if bf else f(T, B, I)
    L = torch.tensor(c["lengths"], dtype=torch.long)
    hx, w_ih, w_hh = f(D, B, H), f(D, 3 * H, I) * 0.5, f(D, 3 * H, H) * 0.5
    b_ih, b_hh = (f(D, 3 * H), f(D, 3 * H)) if bias else (None, None)
    ops = torch.ops.varlen_rnn
    out_r, hn_r, ws_r = ops.gru_layer_forward(x, L, hx, w_ih, w_hh, b_ih, b_hh, bf, True)
    go, ghn = f(*out_r.shape), f(*hn_r.shape)
    ref = [out_r, hn_r, *ops.gru_layer_backward(go, ghn, x, L, hx, w_ih, w_hh, out_r, ws_r, bf)]

    # The launchers' GEMMs (gru_cuda.cu), in the storage dtype around the emulated kernels.
    x, hx, w_ih, w_hh, go, ghn = (t.to(dtype) for t in (x, hx, w_ih, w_hh, go, ghn))
    b_ih, b_hh = (None, None) if not bias else (b_ih.to(dtype), b_hh.to(dtype))
    knobs = (4, c.get("kc", 0), c.get("R", 0))  # 4 pretend SMs: several units per block
    x2d, w2d = x.reshape(T * B, I), w_ih.reshape(D * 3 * H, I)
    gx = torch.addmm(b_ih.reshape(-1), x2d, w2d.T) if bias else x2d @ w2d.T
    out, hn, ws = emu.forward(gx.contiguous(), w_hh, b_hh, hx, L, T, bf, persistent, *knobs, mma)
    dgx, dgh, hprev, ghx = emu.backward(go, ghn, out, hx, ws, w_hh, L, T, bf, persistent, *knobs,
                                        mma)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = [out, hn, (dgx @ w2d).view(x.shape), ghx, (dgx.T @ x2d).view(D, 3 * H, I),
           torch.bmm(dgh.transpose(1, 2), hprev), dgx.sum(0, dtype=acc).view(D, 3 * H),
           dgh.sum(1, dtype=acc)]
    return [t.double() for t in got], ref


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fallback"])
@pytest.mark.parametrize("name,dtype", PARAMS, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in PARAMS])
def test_emulated_cuda_kernels_match_cpu_kernels(emu, name, dtype, persistent):
    got, ref = run_case(emu, CASES[name], dtype, persistent)
    names = ["output", "h_n", "grad input", "grad hx", "grad w_ih", "grad w_hh", "grad b_ih",
             "grad b_hh"]
    for n, a, e in zip(names, got, ref):
        # Every element is written: the kernels' outputs start at 777.
        if dtype == torch.float64:
            tol = dict(atol=1e-12, rtol=1e-12)
        else:
            c_eps = TOL_EPS[dtype] * torch.finfo(dtype).eps
            tol = dict(atol=c_eps * max(1.0, e.abs().max().item()), rtol=c_eps)  # see top
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_emulated_persistent_kernels_are_deterministic(emu, dtype):
    # The emulated threads interleave differently every run, so equal bits show that no sum
    # (the warp reduction, the K chunks, the dh updates) depends on timing.
    runs = [run_case(emu, CASES["two-tiles-nobias"], dtype, True)[0] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# The persistent kernels' tensor-core path (kMma): the recurrent products on the emulated
# mma.sync, with h (forward) rounded to the operand type - TF32 for float32 (the policy that
# torch.backends.cudnn.allow_tf32 allows), the storage type for the half types, as the
# fallback's cuBLAS GEMMs do - and fp32 sums. The bound is the one above with the operand
# type's eps (TF32: 2^-10) and C about five times the largest these cases need (TF32 0.45,
# float16 0.64, bfloat16 0.44).
MMA_CASES = ["uni-basic", "bi-bf-zeros", "two-tiles-nobias", "K-chunks-small"]
MMA_EPS = {torch.float32: 2.0**-10, torch.float16: torch.finfo(torch.float16).eps,
           torch.bfloat16: torch.finfo(torch.bfloat16).eps}
MMA_TOL_EPS = {torch.float32: 2, torch.float16: 4, torch.bfloat16: 4}
MMA_PARAMS = [(n, dt) for dt in MMA_EPS for n in MMA_CASES]


@pytest.mark.parametrize("name,dtype", MMA_PARAMS,
                         ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in MMA_PARAMS])
def test_emulated_tensor_core_path_matches_cpu_kernels(emu, name, dtype):
    got, ref = run_case(emu, CASES[name], dtype, True, mma=True)
    names = ["output", "h_n", "grad input", "grad hx", "grad w_ih", "grad w_hh", "grad b_ih",
             "grad b_hh"]
    for n, a, e in zip(names, got, ref):
        c_eps = MMA_TOL_EPS[dtype] * MMA_EPS[dtype]
        tol = dict(atol=c_eps * max(1.0, e.abs().max().item()), rtol=c_eps)
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{n}: {m}")


def test_emulated_tensor_core_path_rounds_float32_to_tf32(emu):
    # The TF32 path is not the exact one: its results differ from the exact kernels' by far
    # more than float32 rounding (and by less than bfloat16's).
    exact, _ = run_case(emu, CASES["two-tiles-nobias"], torch.float32, True)
    tf32, _ = run_case(emu, CASES["two-tiles-nobias"], torch.float32, True, mma=True)
    rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(tf32, exact))
    assert 2.0**-20 < rel < 2.0**-7, rel

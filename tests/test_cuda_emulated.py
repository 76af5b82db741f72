"""The CUDA kernels' logic on a machine without a GPU: tests/cuda_emulation/emu.cpp runs the real
kernel code of csrc/cuda/*.cuh on CPU threads (float64) and must agree with the CPU kernels.

What it checks: indexing, padding zeros, h_n, the length sort, the tiling and K chunks, and
the persistent kernels' one-barrier-per-step exchange. What it cannot: anything about the GPU
itself (memory model, occupancy, cooperative launch), which tests/test_cuda.py covers on a GPU.
Compiles a small extension (~25 s); VARLEN_RNN_SKIP_EMULATION=1 skips it."""
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
    return load(name="varlen_rnn_cuda_emulation", sources=[os.path.join(HERE, "cuda_emulation", "emu.cpp")],
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
    "one-row-per-warp-tiles": dict(T=3, B=17, I=2, H=9, D=1, bias=True, bf=True, lengths=[3] * 17, R=1),
    "all-zero": dict(T=3, B=2, I=2, H=3, D=2, bias=True, bf=False, lengths=[0, 0]),
    "T1-B1-H1": dict(T=1, B=1, I=1, H=1, D=1, bias=True, bf=False, lengths=[1]),
}


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fallback"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_cuda_kernels_match_cpu_kernels(emu, name, persistent):
    c = CASES[name]
    T, B, I, H, D, bias, bf = (c[k] for k in ("T", "B", "I", "H", "D", "bias", "bf"))
    g = torch.Generator().manual_seed(0)
    f = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    x = f(B, T, I) if bf else f(T, B, I)
    L = torch.tensor(c["lengths"], dtype=torch.long)
    hx, w_ih, w_hh = f(D, B, H), f(D, 3 * H, I) * 0.5, f(D, 3 * H, H) * 0.5
    b_ih, b_hh = (f(D, 3 * H), f(D, 3 * H)) if bias else (None, None)
    ops = torch.ops.varlen_rnn
    out_r, hn_r, ws_r = ops.gru_layer_forward(x, L, hx, w_ih, w_hh, b_ih, b_hh, bf, True)
    go, ghn = f(*out_r.shape), f(*hn_r.shape)
    ref = ops.gru_layer_backward(go, ghn, x, L, hx, w_ih, w_hh, out_r, ws_r, bf)

    # The launchers' GEMMs (gru_cuda.cu), here in plain torch around the emulated kernels.
    knobs = (4, c.get("kc", 0), c.get("R", 0))  # 4 pretend SMs: several units per block
    x2d, w2d = x.reshape(T * B, I), w_ih.reshape(D * 3 * H, I)
    gx = (x2d @ w2d.T + (b_ih.reshape(-1) if bias else 0)).contiguous()
    out, hn, ws = emu.forward(gx, w_hh, b_hh, hx, L, T, bf, persistent, *knobs)
    dgx, dgh, hprev, ghx = emu.backward(go, ghn, out, hx, ws, w_hh, L, T, bf, persistent, *knobs)
    got = [(dgx @ w2d).view(x.shape), ghx, (dgx.T @ x2d).view(D, 3 * H, I),
           torch.bmm(dgh.transpose(1, 2), hprev), dgx.sum(0).view(D, 3 * H), dgh.sum(1)]
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, out_r, **tol)  # every element written: outputs start at 777
    torch.testing.assert_close(hn, hn_r, **tol)
    names = ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"]
    for n, a, e in zip(names, got, ref):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"grad {n}: {m}")

"""The CPU step loops' per-step product: the float32 micro-kernel (csrc/cpu/small_gemm.h) against
the single-threaded BLAS call it replaces, then the whole layer forward through each.

    python benchmarks/bench_small_gemm.py [--part gemm|layer|stored|dots|both] [--repeats 15]
                                          [--peak GFLOPS] [--threads 1 2]

gemm: c[n, N] = h[n, K] @ panel[K, N], one thread, the shapes of the split step loop at 2 threads
(N = 3 * Hs, Hs = H / 2, K = H), timed inside one op call (`_small_gemm` with `repeats`), so
neither Python nor packing is counted: (t(R) - t(0)) / R, min over --repeats tries.
layer: varlen_rnn.X inference, float32, 2 threads, lengths uniform in [1, T], with
VARLEN_RNN_CPU_GEMM=mkl and =kernel (both through the split step loop), min over --repeats; GFLOP/s
on valid tokens as bench.py counts them, and % of a 1024^3 torch.mm timed in the same run.
stored: a few-step call's backward products on the weights as stored (csrc/cpu/dot_rows.h row
tiles), 2 threads, against the BLAS they replace, for weights [G*H, H] of the GRU and LSTM at
H=256 and 512: dh = dG W_hh over m rows (f32_rows_times, `_small_gemm` kernel "rows", against
kernel "blas", both timed inside the op as above), and a weight's gradient dG^T h over n positions
(f32_weight_grad through `_weight_grad`, less the NaN fill of its output timed alone, against
`torch.mm(dG.t(), h, out=c)`), min over --repeats of 20 calls each, us per call.
dots: a few-step call's forward products on the weights as stored (f32_dot_rows, cpu/dot_rows.h:
`_small_gemm` kernel "dots", timed inside the op as above) against `torch.mm(a, w.t(), out=c)`, the
BLAS call they replace, for the same weights and m = 1 to 256 rows, with 1 and 2 threads (--threads).
Every table line carries the load average at the time (`uptime`): other work on the machine shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import torch  # noqa: E402

ops = torch.ops.varlen_rnn
# The recurrent weights [G*H, H] the stored and dots parts time (W_hh of a GRU and an LSTM).
WEIGHTS = {"GRU H=256": (768, 256), "LSTM H=256": (1024, 256)}
WEIGHTS |= {"GRU H=512": (1536, 512), "LSTM H=512": (2048, 512)}


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_part(repeats: int, peak: float | None, kernels: list[str]) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"single thread, GFLOP/s (% of {peak} GFLOP/s per-core peak)" if peak else "GFLOP/s")
    print("K    N    n    " + "  ".join(f"{k:>14}" for k in kernels) + "  load")
    for K in (256, 512):
        N = 3 * (K // 2)
        b = torch.randn(K, N, generator=g)
        for n in (8, 16, 32, 64, 128):
            a = torch.randn(n, K, generator=g)
            flop = 2.0 * n * N * K
            reps = max(4, int(0.003 * 150e9 / flop))  # ~3 ms: short enough to run unpreempted
            cells = []
            for k in kernels:
                base = best_of(lambda: ops._small_gemm(a, b, None, k, 0), repeats)
                t = best_of(lambda: ops._small_gemm(a, b, None, k, reps), repeats)
                gf = flop * reps / max(t - base, 1e-9) / 1e9
                cells.append(f"{gf:7.1f}" + (f" ({100 * gf / peak:3.0f}%)" if peak else "       "))
            print(f"{K:<4} {N:<4} {n:<4} " + "  ".join(f"{c:>14}" for c in cells) + "  " + load())


def layer_part(repeats: int, cells: list[str]) -> None:
    from bench_cases import Bench, Case, layer_flops

    torch.set_num_threads(2)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    gemm = 2 * n**3 / best_of(lambda: torch.mm(a, b), 20) / 1e9
    print(f"2 threads; torch.mm {n}^3: {gemm:.0f} GFLOP/s ({load()})")
    os.environ["VARLEN_RNN_CPU_STEPS"] = "split"
    print(
        "case                      cell  mkl ms  kernel ms  speedup  kernel GFLOP/s (% GEMM)  load"
    )
    for B, T, I, H in ((64, 100, 256, 256), (16, 200, 256, 512)):
        for cell in cells:
            case = Case(B=B, T=T, I=I, H=H, cell=cell, modes=("infer",), competitors=("varlen",))
            bench = Bench(case)
            step = bench.step("infer", "varlen")
            times = {}
            for _ in range(2):  # alternate, so drift hits both alike
                for mode in ("mkl", "kernel"):
                    os.environ["VARLEN_RNN_CPU_GEMM"] = mode
                    step()
                    t = best_of(step, repeats)
                    times[mode] = min(times.get(mode, t), t)
            flops = layer_flops(case, bench.lengths)
            gf = flops / times["kernel"] / 1e9
            print(
                f"B={B:<3} T={T:<3} I={I} H={H:<4}  {cell:<4} {1e3 * times['mkl']:7.2f} "
                f"{1e3 * times['kernel']:9.2f}  {times['mkl'] / times['kernel']:6.2f}x "
                f"{gf:10.0f} ({100 * gf / gemm:3.0f}%)          {load()}"
            )
    os.environ.pop("VARLEN_RNN_CPU_GEMM")


def in_op_us(a, w, kernel: str, reps: int, repeats: int) -> float:
    """us per product timed inside one `_small_gemm` call: (t(reps) - t(0)) / reps, min over
    `repeats`. A try whose difference is not positive (a preemption during the t(0) call) measured
    nothing and is dropped; up to 5 rounds are made before giving up with nan."""
    for _ in range(5):
        base = best_of(lambda: ops._small_gemm(a, w, None, kernel, 0), repeats)
        run = best_of(lambda: ops._small_gemm(a, w, None, kernel, reps), repeats)
        if run > base:
            return 1e6 * (run - base) / reps
    return float("nan")


def per_call(fn, calls: int, repeats: int) -> float:
    """us per call: the min over `repeats` of `calls` calls."""
    return 1e6 * best_of(lambda: [fn() for _ in range(calls)], repeats) / calls


def stored_part(repeats: int) -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    print(
        f"2 threads, us per call (min of {repeats} x 20 calls); ours / BLAS as 'x' (>1: ours faster)"
    )
    print("dh = dG W_hh: m rows, f32_rows_times ('rows') against the BLAS ('blas')")
    print("weight   " + "".join(f"{'m=' + str(m):>22}" for m in (1, 4, 8, 16, 32, 64)) + "  load")
    for name, (G, P) in WEIGHTS.items():
        w = torch.randn(G, P, generator=g)
        cells = []
        for m in (1, 4, 8, 16, 32, 64):
            a = torch.randn(m, G, generator=g)
            reps = max(2, int(2e7 / (2 * m * G * P)))
            t = {}
            for k in ("blas", "rows", "blas", "rows"):  # alternated: drift hits both alike
                t[k] = min(t.get(k, float("inf")), in_op_us(a, w, k, reps, repeats))
            cells.append(f"{t['rows']:6.1f} vs {t['blas']:6.1f} {t['blas'] / t['rows']:4.2f}x")
        print(f"{name:<10}" + "".join(f"{c:>22}" for c in cells) + "  " + load())
    try:
        ops._weight_grad(torch.ones(1, 1), torch.ones(1, 1))
    except RuntimeError:
        print("dW = dG^T h: f32_weight_grad does not run on this CPU (AVX-512 only)")
        return
    print("dW = dG^T h: n positions, f32_weight_grad against torch.mm(dG.t(), h)")
    print("weight   " + "".join(f"{'n=' + str(n):>22}" for n in (1, 2, 4, 8, 16)) + "  load")
    for name, (G, P) in WEIGHTS.items():
        cells = []
        for n in (1, 2, 4, 8, 16):
            a, b = torch.randn(n, G, generator=g), torch.randn(n, P, generator=g)
            c = torch.empty(G, P)
            t = {}
            for _ in range(2):
                fill = per_call(lambda: torch.full((G + 1, P + 5), float("nan")), 20, repeats)
                ours = per_call(lambda: ops._weight_grad(a, b), 20, repeats) - fill
                mm = per_call(lambda: torch.mm(a.t(), b, out=c), 20, repeats)
                t["ours"], t["mm"] = min(t.get("ours", ours), ours), min(t.get("mm", mm), mm)
            cells.append(f"{t['ours']:6.1f} vs {t['mm']:6.1f} {t['mm'] / t['ours']:4.2f}x")
        print(f"{name:<10}" + "".join(f"{c:>22}" for c in cells) + "  " + load())


def dots_part(repeats: int, threads: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    rows = (1, 8, 16, 32, 64, 128, 256)
    for n in threads:
        torch.set_num_threads(n)
        print(
            f"{n} thread(s), us per call (min of {repeats}); f32_dot_rows ('dots') against "
            "torch.mm(a, w.t()) as 'x' (>1: ours faster)"
        )
        print("weight   " + "".join(f"{'m=' + str(m):>22}" for m in rows) + "  load")
        for name, (J, K) in WEIGHTS.items():
            w = torch.randn(J, K, generator=g)
            cells = []
            for m in rows:
                a, c = torch.randn(m, K, generator=g), torch.empty(m, J)
                reps = max(2, int(2e7 / (2 * m * J * K)))
                t = {}
                for k in ("mm", "dots", "mm", "dots"):  # alternated: drift hits both alike
                    if k == "dots":
                        us = in_op_us(a, w.t(), "dots", reps, repeats)
                    else:
                        us = per_call(lambda: torch.mm(a, w.t(), out=c), reps, repeats)
                    t[k] = min(t.get(k, float("inf")), us)
                cells.append(f"{t['dots']:6.1f} vs {t['mm']:6.1f} {t['mm'] / t['dots']:4.2f}x")
            print(f"{name:<10}" + "".join(f"{c:>22}" for c in cells) + "  " + load())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=("gemm", "layer", "stored", "dots", "both"), default="both")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--peak", type=float, default=None, help="per-core FP32 peak GFLOP/s, for %%")
    p.add_argument("--kernels", default="blas,auto", help="_small_gemm kernels, comma-separated")
    p.add_argument("--cells", default="gru,lstm,rnn")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="dots: thread counts")
    a = p.parse_args(argv)
    import varlen_rnn  # noqa: F401  (registers the ops)

    if a.part in ("gemm", "both"):
        gemm_part(a.repeats, a.peak, a.kernels.split(","))
    if a.part in ("layer", "both"):
        layer_part(a.repeats, a.cells.split(","))
    if a.part == "stored":
        stored_part(a.repeats)
    if a.part == "dots":
        dots_part(a.repeats, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

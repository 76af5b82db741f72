"""The forward split loop's chunked input projection (csrc/cpu/chunked_projection.h) against the
whole-projection GEMM (VARLEN_RNN_CPU_PROJECTION=whole) and torch.nn without lengths, bfloat16
(or --dtype float32) inference: time (min of interleaved repeats) and peak memory of one forward
(bench_memory.cpu_peak: torch's CPU allocator as the profiler records it).

    python benchmarks/bench_chunked_projection.py --threads 1 --repeats 30
    python benchmarks/bench_chunked_projection.py --memory
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import varlen_rnn  # noqa: E402


def cases(args):
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.steps
    full = torch.full((B,), T, dtype=torch.int64)
    uniform = torch.randint(1, T + 1, (B,), generator=g)
    dtype = getattr(torch, args.dtype)
    for cell in args.cells:
        torch.manual_seed(0)
        nn_cls = getattr(torch.nn, cell)
        nn_m = nn_cls(args.hidden, args.hidden).to(dtype).eval()
        ours = getattr(varlen_rnn, cell).from_torch(nn_m).eval()
        x = torch.randn(T, B, args.hidden, generator=g).to(dtype)
        for name, lengths in [("full", full), ("uniform", uniform)]:
            yield cell, name, nn_m, ours, x, lengths


def steps_of(nn_m, ours, x, lengths):
    def nn_step():
        with torch.no_grad():
            nn_m(x)

    def ours_step(mode):
        def step():
            os.environ["VARLEN_RNN_CPU_PROJECTION"] = mode
            with torch.no_grad():
                ours(x, lengths=lengths)

        return step

    return {"nn": nn_step, "whole": ours_step("whole"), "chunked": ours_step("chunked")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cells", nargs="+", default=["LSTM", "GRU"])
    p.add_argument("--memory", action="store_true", help="peak memory instead of time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f} at start")
    for cell, name, nn_m, ours, x, lengths in cases(args):
        steps = steps_of(nn_m, ours, x, lengths)
        for step in steps.values():
            step()  # warm-up: thread pools, oneDNN primitives
        if args.memory:
            from bench_memory import cpu_peak

            peaks = {k: cpu_peak(s) / 2**20 for k, s in steps.items()}
            line = "  ".join(f"{k} {v:6.2f} MiB" for k, v in peaks.items())
        else:
            best = {k: float("inf") for k in steps}
            for _ in range(args.repeats):
                for k, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    best[k] = min(best[k], time.perf_counter() - t0)
            line = "  ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in best.items())
            line += f"  chunked/whole {best['whole'] / best['chunked']:.2f}x"
            line += f"  nn/chunked {best['nn'] / best['chunked']:.2f}x"
        print(f"{cell:4} {name:7} {line}  (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()

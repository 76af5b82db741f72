"""A decoder's loop, one call per step: out, h = rnn(x_t, h) for t in range(T), the state
carried between calls. Training (the default): then the loss of every step's output
differentiated back through the chain (teacher forcing), x_t requiring grad as an embedding's
output does. --inference: the loop alone under torch.inference_mode (greedy decoding's calls),
e.g. in bfloat16 (--dtype bfloat16). varlen_rnn against torch.nn on the same inputs (T=1 calls
need no lengths, so nn runs without packing); medians of torch.utils.benchmark, the two
interleaved; a markdown table on stdout and in benchmarks/results/decoder-loop_cpu_<date>.md
(decoder-loop-inference_... with --inference).

    python benchmarks/bench_decoder_loop.py --threads 2
    python benchmarks/bench_decoder_loop.py --inference --dtype bfloat16 --batches 1 8 32 64
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import varlen_rnn  # noqa: E402


def loop_of(module, xs, inference: bool):
    def step():
        h, outs = None, []
        for x in xs:
            out, h = module(x, h)
            outs.append(out)
        torch.stack(outs).sum().backward()

    def decode():
        with torch.inference_mode():
            h = None
            for x in xs:
                _, h = module(x, h)

    return decode if inference else step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cells", nargs="+", default=["GRU", "LSTM"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--inference", action="store_true", help="no backward, inference mode")
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, T = args.hidden, args.steps
    rows = []
    for cell in args.cells:
        for B in args.batches:
            torch.manual_seed(0)
            dtype = getattr(torch, args.dtype)
            ref = getattr(torch.nn, cell)(H, H).to(dtype)
            ours = getattr(varlen_rnn, cell).from_torch(ref)
            xs = torch.randn(T, 1, B, H).to(dtype).requires_grad_(not args.inference).unbind(0)
            times = {}
            for name, module in (("nn", ref), ("ours", ours)):
                t = Timer(
                    "step()",
                    globals={"step": loop_of(module, xs, args.inference)},
                    num_threads=args.threads,
                )
                times[name] = t.blocked_autorange(min_run_time=args.min_run_time).median / T
            print(
                f"{cell} B={B} H={H}: nn {times['nn'] * 1e6:.0f} us, ours {times['ours'] * 1e6:.0f} us"
            )
            rows.append((cell, B, times))
    what = (
        "under torch.inference_mode; median time per step, us."
        if args.inference
        else "forward and backward through the chain; median time\nper step (forward + its"
        " share of the backward), us."
    )
    lines = [
        f"T={T} calls of one step (I=H={H}, {args.dtype}), {what}",
        "",
        "| cell | B | torch.nn | varlen_rnn | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for cell, B, t in rows:
        lines.append(
            f"| {cell} | {B} | {t['nn'] * 1e6:.0f} | {t['ours'] * 1e6:.0f} | "
            f"{t['nn'] / t['ours']:.2f}x |"
        )
    kind, title = (
        ("decoder-loop-inference", "A decoder's inference loop, one call per step")
        if args.inference
        else ("decoder-loop", "A decoder's training loop, one call per step")
    )
    return bench_report.write_table(
        args.out,
        kind,
        title,
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()

"""Gradients of gradients: a gradient-penalty step (g = d loss / d x with create_graph=True, then
the backward of |g|^2 to the input and every weight), varlen_rnn against nn +
pack_padded_sequence on the same inputs, float32, lengths uniform in [1, T]. varlen_rnn runs
this through its differentiable path (varlen_rnn.reference, recomputed in the backward), nn
through its autograd graph. Medians of torch.utils.benchmark, interleaved; a markdown table on
stdout and in benchmarks/results/double-backward_cpu_<date>.md.

    python benchmarks/bench_double_backward.py --threads 2
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import step_cases  # noqa: E402

SHAPES = [("GRU", 16, 50, 64, 128), ("GRU", 64, 100, 128, 128), ("LSTM", 16, 50, 64, 128)]


def penalty_step(module, x, lengths, packed: bool):
    def step():
        out = step_cases.padded_output(module, x, lengths, packed)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        g.square().sum().backward()

    return step


def main(argv=None):
    args = step_cases.parser(__doc__).parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for label, ref, ours, x, lengths in step_cases.cases(
        step_cases.QUICK if args.quick else SHAPES
    ):
        x.requires_grad_()
        times = {}
        for name, module in (("nn", ref), ("ours", ours)):
            step = penalty_step(module, x, lengths, packed=name == "nn")
            t = Timer("step()", globals={"step": step}, num_threads=args.threads)
            times[name] = t.blocked_autorange(min_run_time=args.min_run_time).median
        print(f"{label}: nn {times['nn'] * 1e3:.1f} ms, ours {times['ours'] * 1e3:.1f}")
        rows.append((label, times))
    lines = [
        "Median ms per step: forward, d|out|^2/dx with create_graph=True, backward of |dx|^2.",
        "",
        "| case | nn + packing | varlen_rnn | speedup |",
        "|---|---:|---:|---:|",
    ]
    for label, t in rows:
        lines.append(
            f"| {label} | {t['nn'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | {t['nn'] / t['ours']:.2f}x |"
        )
    return bench_report.write_table(
        args.out,
        "double-backward",
        "Gradients of gradients: a gradient-penalty step",
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()

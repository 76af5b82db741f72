"""Gradients of gradients: a gradient-penalty step (g = d loss / d x with create_graph=True, then
the backward of |g|^2 to the input and every weight), varlen_rnn against nn +
pack_padded_sequence on the same inputs, float32, lengths uniform in [1, T]. varlen_rnn runs
this through its differentiable path (varlen_rnn.reference, recomputed in the backward), nn
through its autograd graph. Medians of torch.utils.benchmark, interleaved; a markdown table on
stdout and in benchmarks/results/double-backward_cpu_<date>.md.

    python benchmarks/bench_double_backward.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import varlen_rnn  # noqa: E402

SHAPES = [("GRU", 16, 50, 64, 128), ("GRU", 64, 100, 128, 128), ("LSTM", 16, 50, 64, 128)]


def penalty_step(module, x, lengths, packed: bool):
    T = x.shape[0]

    def step():
        if packed:
            p = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, _ = pad_packed_sequence(module(p)[0], total_length=T)
        else:
            out, _ = module(x, lengths=lengths)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        g.square().sum().backward()

    return step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [("GRU", 3, 4, 2, 5), ("LSTM", 3, 4, 2, 5)] if args.quick else SHAPES
    rows = []
    for cell, B, T, I, H in shapes:
        torch.manual_seed(0)
        ref = getattr(torch.nn, cell)(I, H)
        ours = getattr(varlen_rnn, cell).from_torch(ref)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, I, generator=g).requires_grad_()
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        times = {}
        for name, module in (("nn", ref), ("ours", ours)):
            step = penalty_step(module, x, lengths, packed=name == "nn")
            t = Timer("step()", globals={"step": step}, num_threads=args.threads)
            times[name] = t.blocked_autorange(min_run_time=args.min_run_time).median
        print(
            f"{cell} B={B} T={T} H={H}: nn {times['nn'] * 1e3:.1f} ms, ours {times['ours'] * 1e3:.1f}"
        )
        rows.append((f"{cell} B={B} T={T} I={I} H={H}", times))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=checkout.ROOT
    ).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Gradients of gradients: a gradient-penalty step",
        "",
        f"{args.threads} threads; torch {torch.__version__}; {now.isoformat(timespec='seconds')};"
        f" commit {commit}; load average {os.getloadavg()[0]:.1f}",
        "",
        "Median ms per step: forward, d|out|^2/dx with create_graph=True, backward of |dx|^2.",
        "",
        "| case | nn + packing | varlen_rnn | speedup |",
        "|---|---:|---:|---:|",
    ]
    for label, t in rows:
        lines.append(
            f"| {label} | {t['nn'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | {t['nn'] / t['ours']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"double-backward_cpu_{now.strftime('%Y%m%d-%H%M%S')}.md")
    with open(path, "w") as f:
        f.write(text)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
